"""`POST /oauth2/introspect`: RFC 7662 token introspection for Dovecot's `oauth2` passdb (2.3) /
`oauth2 {}` block (2.4), `introspection_mode = post`.

Request: form body `token=<access token>` (Dovecot 2.3 sends `token=…&client_id=&client_secret=`;
extra fields are ignored). The token goes to the IdP (`IdentityProvider.introspect_token`).

Answers (JSON):

- 200 `{"active": true, "username": <preferred_username>, "email": <primary email>}` for an
  active token of an enabled IdP user. Dovecot compares `username_attribute` (`username`, or
  `email`) with the login name.
- 200 `{"active": false}` for everything not accepted: unknown, expired or malformed tokens, a
  missing `token` field, a body that is not a form, app passwords (apps are never accepted here:
  Dovecot's introspection request carries no service, so the app rules could not be enforced).
- The same 200 `{"active": false}` when the IdP cannot answer (down, slow, malformed reply) or on
  an unexpected error, as SPEC §8 fixes ("always 200"), logged as a warning. Dovecot then refuses
  the login as it would a bad token. A 503 would make Dovecot report a temporary failure instead
  (IMAP `[UNAVAILABLE]`, no "wrong password" prompt in mail clients during an IdP outage); that is
  a contract change to propose, not one to make here. Tokens of users in the positive
  introspection cache keep working through a short outage.

No shared secret is required here: Dovecot's oauth2 client sends none, the listener is loopback or
a unix socket, and the endpoint only confirms what the IdP itself would confirm for the token.
"""

from __future__ import annotations

import logging

from aiohttp import web

from mailcloak.appkeys import RUNTIME
from mailcloak.errors import IdPError
from mailcloak.http.forms import FormError, read_form

log = logging.getLogger(__name__)

PATH = "/oauth2/introspect"

INACTIVE = {"active": False}


async def handle(request: web.Request) -> web.Response:
    try:
        form = await read_form(request)
    except FormError as exc:
        log.info("introspect: %s", exc.message)
        return web.json_response(INACTIVE)
    token = form.get("token", "").strip()
    if not token:
        return web.json_response(INACTIVE)
    idp = request.app[RUNTIME].current.idp
    try:
        user = await idp.introspect_token(token)
    except IdPError as exc:
        log.warning("introspect: identity provider cannot answer, token refused: %s", exc)
        return web.json_response(INACTIVE)
    except Exception:
        log.exception("introspect: unexpected error, token refused")
        return web.json_response(INACTIVE)
    if user is None:
        return web.json_response(INACTIVE)
    body = {"active": True, "username": user.username}
    if user.email:
        body["email"] = user.email
    return web.json_response(body)
