"""Checks the IdP questions of mailcloak/policy/facts.py after issue 6: answers at once, two
waiting questions concurrent, the deadline, a failing IdP, cancellation of the request.

    python bench/check_facts.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from types import MappingProxyType

from mailcloak.errors import IdPError
from mailcloak.idp.base import IdentityProvider, IdPUser
from mailcloak.policy.codec import PolicyRequest
from mailcloak.policy.decision import UNAVAILABLE
from mailcloak.policy.facts import gather_facts
from mailcloak.store.model import Domain, Rows, Snapshot


class SlowIdP(IdentityProvider):
    """Answers after `delay` (0: without waiting at all); `fail`: user_by_address raises."""

    name = "slow"

    def __init__(self, delay: float, fail: bool = False):
        self.delay, self.fail = delay, fail

    async def user_by_address(self, address: str) -> IdPUser | None:
        if self.delay:
            await asyncio.sleep(self.delay)
            async with asyncio.timeout(10):  # a context bound to the task, inside the IdP code
                await asyncio.sleep(0)
        if self.fail:
            raise IdPError("boom")
        return IdPUser("bob", address) if address.startswith("bob") else None

    async def user_by_username(self, username: str) -> IdPUser | None:
        if self.delay:
            await asyncio.sleep(self.delay)
        return IdPUser(username, username + "@d1.test")


SNAPSHOT = Snapshot.from_rows(Rows((Domain("d1.test", True, 0),), (), ()))
# XOAUTH2 to a local recipient: both IdP questions.
REQUEST = PolicyRequest(MappingProxyType({
    "request": "smtpd_access_policy", "protocol_state": "RCPT", "sender": "alice@d1.test",
    "recipient": "bob@d1.test", "sasl_method": "XOAUTH2", "sasl_username": "alice"}))


async def main() -> int:
    loop = asyncio.get_running_loop()
    failures = 0
    # delay, deadline, fail -> (exists, login is a user, longest time)
    cases = [
        (0.0, 1.0, False, True, True, 0.05),           # answered at once
        (0.2, 1.0, False, True, True, 0.35),           # both wait, concurrently (not 0.4 s)
        (0.2, 0.1, False, UNAVAILABLE, False, 0.25),   # the deadline passes first
        (0.05, 1.0, True, UNAVAILABLE, True, 0.3),     # the address question fails
    ]
    for delay, deadline, fail, exists, login_ok, longest in cases:
        started = time.monotonic()
        facts = await gather_facts(REQUEST, SNAPSHOT, SlowIdP(delay, fail), "+", loop.time() + deadline)
        took = time.monotonic() - started
        ok = (facts.recipient_exists == exists and isinstance(facts.login_user, IdPUser) == login_ok
              and took < longest)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} delay {delay} deadline {deadline} fail {fail}: {took:.2f} s, "
              f"exists={facts.recipient_exists} login={facts.login_user}")
    task = asyncio.ensure_future(gather_facts(REQUEST, SNAPSHOT, SlowIdP(5), "+", loop.time() + 10))
    await asyncio.sleep(0.1)
    task.cancel()
    try:
        await task
        failures += 1
        print("FAIL cancellation: the request finished")
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        failures += bool(left)
        print(f"{'FAIL' if left else 'ok  '} cancellation: {len(left)} task(s) left behind")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
