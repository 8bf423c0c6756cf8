"""`POST /dovecot/passdb`: the endpoint `dovecot/mailcloak.lua` asks for every PLAIN/LOGIN attempt.

Request: `Content-Type: application/x-www-form-urlencoded`, fields `user`, `password`, `service`
(required; `service` is Dovecot's `%s`, `smtp` for Postfix SASL), `remote_ip` (optional; empty
for doveadm), and optionally `local_ip`, `mechanism`, `session` (ignored, allowed for logs).
With `http.shared_secret_file` configured the request must carry
`Authorization: Bearer <contents of that file, surrounding whitespace stripped>`.

Answer: Dovecot's Lua has no JSON, so the body is `key=value` lines (`text/plain`):

    result=ok|password_mismatch|user_unknown|user_disabled|internal_failure
    reason=<one line of text, for Dovecot's log; absent for ok>

with status 200 for every decision. Anything else is not a decision and the Lua script maps it to
PASSDB_RESULT_INTERNAL_FAILURE (Dovecot: temporary failure): 400 malformed request (missing field,
wrong content type, bad encoding), 401 missing or wrong bearer secret, 413 body over 64 KiB,
405 wrong method. Those carry `result=internal_failure` too, so a reader of the body alone still
cannot mistake them for an answer.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from mailcloak.appkeys import RUNTIME
from mailcloak.apps_auth import AppAuthenticator, Result
from mailcloak.errors import ConfigError
from mailcloak.http.forms import MAX_BODY, FormError, read_form, too_large
from mailcloak.runtime import Runtime

log = logging.getLogger(__name__)

PATH = "/dovecot/passdb"


class SharedSecret:
    """The bearer secret the Lua script must present; read at start, re-read after a SIGHUP.

    After the privilege drop the file may no longer be readable (0600 root): then the secret read
    at start stays in force and the failure is logged once per reload.
    """

    def __init__(self, path: str):
        self.path = path
        self._value: bytes | None = None
        self._seen_runtime: Runtime | None = None

    @property
    def required(self) -> bool:
        return bool(self.path)

    def load(self) -> None:
        """Read the file; ConfigError (one clear line) when it is missing, unreadable or empty."""
        if not self.path:
            return
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"http.shared_secret_file not found: {self.path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"cannot read http.shared_secret_file {self.path}: {reason}") from None
        value = text.strip()
        if not value:
            raise ConfigError(f"http.shared_secret_file {self.path} is empty")
        if any(c.isspace() for c in value):
            raise ConfigError(f"http.shared_secret_file {self.path} must hold one token without spaces")
        self._value = value.encode("utf-8")

    def refresh(self, runtime: Runtime) -> None:
        """Re-read the file once after each SIGHUP (a SIGHUP swaps in a new Runtime)."""
        if self._seen_runtime is None:
            self._seen_runtime = runtime
            return
        if runtime is self._seen_runtime:
            return
        self._seen_runtime = runtime
        try:
            self.load()
            log.info("http.shared_secret_file re-read")
        except ConfigError as exc:
            log.error("keeping the previous shared secret: %s", exc)

    def authorized(self, header: str | None) -> bool:
        if self._value is None:
            return not self.required
        if not header:
            return False
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._value)


class PassdbEndpoint:
    def __init__(self, authenticator: AppAuthenticator, secret: SharedSecret):
        self.authenticator = authenticator
        self.secret = secret

    def _check_auth(self, request: web.Request) -> web.Response | None:
        self.secret.refresh(request.app[RUNTIME].current)
        if self.secret.authorized(request.headers.get("Authorization")):
            return None
        log.warning("passdb: refused a request from %s: missing or wrong bearer secret",
                    request.remote or "?")
        return answer(Result.INTERNAL_FAILURE, "unauthorized", status=401,
                      headers={"WWW-Authenticate": 'Bearer realm="mailcloak"'})

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue` (Dovecot 2.3 always sends it): refuse before the body comes."""
        refused = self._check_auth(request)
        if refused is not None:
            return refused
        if too_large(request):
            return answer(Result.INTERNAL_FAILURE, f"request body larger than {MAX_BODY} bytes",
                          status=413)
        return await _default_expect_handler(request)

    async def handle(self, request: web.Request) -> web.Response:
        refused = self._check_auth(request)
        if refused is not None:
            return refused
        try:
            form = await read_form(request)
        except FormError as exc:
            return answer(Result.INTERNAL_FAILURE, exc.message, status=exc.status)
        user, password, service = form.get("user"), form.get("password"), form.get("service")
        if not user or password is None or not service:
            return answer(Result.INTERNAL_FAILURE, "fields user, password and service are required",
                          status=400)
        runtime = request.app[RUNTIME].current
        outcome = await self.authenticator.authenticate(
            runtime.state.snapshot, user, password, service, form.get("remote_ip", ""))
        return answer(outcome.result, outcome.reason)


def answer(result: Result, reason: str = "", status: int = 200,
           headers: dict[str, str] | None = None) -> web.Response:
    lines = [f"result={result.value}"]
    if reason:
        lines.append("reason=" + " ".join(reason.split()))
    return web.Response(status=status, text="\n".join(lines) + "\n", content_type="text/plain",
                        headers=headers)
