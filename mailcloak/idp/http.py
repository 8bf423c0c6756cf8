"""The HTTP side of the IdP clients: one session, bounded waits and reads, every failure an IdPError.

One `aiohttp.ClientSession` per provider (connections are reused), created lazily inside the
running event loop and closed by `close()`. Each request is bounded by the connect and total
timeouts of the config; a body is read up to `MAX_BODY` bytes, never more. Failures become
`IdPRequestError` with a short `kind` ("unreachable", "timeout", "http 500", ...) used for logs
and counters. Nothing here logs request bodies, headers or URLs with secrets.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import aiohttp
from yarl import URL

from mailcloak.errors import IdPError

MAX_BODY = 4 * 1024 * 1024  # users/introspection answers are a few KB; a larger one is a fault

UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
MALFORMED = "malformed answer"
TOO_LARGE = "answer too large"


class IdPRequestError(IdPError):
    """An IdP request failed; `kind` is short and stable, the message adds what helps an admin."""

    def __init__(self, provider: str, kind: str, detail: str = ""):
        self.provider = provider
        self.kind = kind
        self.detail = detail
        super().__init__(f"{provider}: {kind}" + (f" ({detail})" if detail else ""))


class HttpClient:
    def __init__(self, provider: str, connect_timeout: float, request_timeout: float,
                 max_body: int = MAX_BODY):
        self.provider = provider
        self.max_body = max_body
        self._timeout = aiohttp.ClientTimeout(total=request_timeout or None,
                                              connect=connect_timeout or None)
        self._request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self.requests: dict[str, int] = {}  # requests sent, per endpoint label

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        return self._session

    def error(self, kind: str, detail: str = "") -> IdPRequestError:
        return IdPRequestError(self.provider, kind, detail)

    async def request(self, label: str, method: str, url: str, *,
                      params: Mapping[str, str] | None = None, data: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of one request; raises IdPRequestError when there is no complete answer."""
        self.requests[label] = self.requests.get(label, 0) + 1
        where = _origin(url)
        try:
            async with self._get_session().request(method, url, params=params, data=data,
                                                   headers=headers, allow_redirects=False) as resp:
                body = await self._read(resp)
                if 300 <= resp.status < 400:
                    target = _origin(resp.headers.get("Location", ""))
                    raise self.error(f"http {resp.status}",
                                     f"{where} redirects to {target or 'elsewhere'}: check base_url")
                return resp.status, body
        except IdPRequestError:
            raise
        except aiohttp.ConnectionTimeoutError:
            raise self.error(UNREACHABLE, f"cannot connect to {where}: connect timed out") from None
        except TimeoutError:
            raise self.error(TIMEOUT, f"no answer from {where} within {self._request_timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            raise self.error(UNREACHABLE, f"cannot connect to {where}: {reason}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise self.error(UNREACHABLE, f"{where} closed the connection ({type(exc).__name__})") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise self.error(UNREACHABLE, f"request to {where} failed ({type(exc).__name__})") from None

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        length = resp.content_length
        if length is not None and length > self.max_body:
            resp.close()
            raise self.error(TOO_LARGE, f"{length} bytes announced, at most {self.max_body} read")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_body:
                resp.close()
                # The error's traceback keeps this frame alive until the cyclic GC runs, which
                # a quiet daemon may not do for a long time: drop the body read so far now.
                chunks.clear()
                raise self.error(TOO_LARGE, f"more than {self.max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def json(self, body: bytes, expect: type) -> Any:
        """The JSON document in `body`, of type `expect` (dict or list), or a "malformed answer"."""
        try:
            doc = json.loads(body)
        except ValueError:
            raise self.error(MALFORMED, "not JSON") from None
        if not isinstance(doc, expect):
            raise self.error(MALFORMED, f"expected a JSON {'object' if expect is dict else 'array'}")
        return doc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _origin(url: str) -> str:
    """scheme://host:port of a URL, for messages (never its path, query or credentials)."""
    try:
        parsed = URL(url)
        return str(parsed.origin()) if parsed.host else ""
    except (ValueError, TypeError):
        return ""


def error_field(body: bytes) -> tuple[str, str]:
    """(error, error_description) of an OAuth2/Keycloak error body, "" when absent or unreadable."""
    try:
        doc = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    error = doc.get("error", doc.get("detail", ""))
    description = doc.get("error_description", "")
    return (error if isinstance(error, str) else "", description if isinstance(description, str) else "")
