"""What a request reads: the config and IdP in force, and the database state.

`Runtime` is immutable; a SIGHUP builds a new one and `RuntimeRef.current` is swapped in one
assignment, so a request sees either the old or the new setup, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailcloak.config import Config
from mailcloak.idp.base import IdentityProvider
from mailcloak.policy.decision import DUNNO, IDP_TEMPFAIL
from mailcloak.state import StateCache


@dataclass(frozen=True)
class Runtime:
    config: Config
    idp: IdentityProvider
    state: StateCache

    @property
    def failure_action(self) -> str:
        return IDP_TEMPFAIL if self.config.policy.idp_failure_mode == "tempfail" else DUNNO


class RuntimeRef:
    """The one place that holds the current Runtime; owned by the daemon, passed to services."""

    def __init__(self, runtime: Runtime):
        self.current = runtime
