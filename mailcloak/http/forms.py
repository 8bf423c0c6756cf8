"""Small request bodies for the Dovecot endpoints: size-limited, form-encoded, strictly decoded."""

from __future__ import annotations

from urllib.parse import parse_qsl

from aiohttp import web

# Dovecot sends a few hundred bytes (a JWT access token is a few KiB): anything larger is refused.
MAX_BODY = 64 * 1024
MAX_FIELDS = 32
FORM_TYPE = "application/x-www-form-urlencoded"


class FormError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(request: web.BaseRequest, limit: int = MAX_BODY) -> bool:
    return request.content_length is not None and request.content_length > limit


async def read_form(request: web.BaseRequest, limit: int = MAX_BODY) -> dict[str, str]:
    """The body as a dict; FormError(413) past `limit`, FormError(400) for anything malformed."""
    if request.content_type != FORM_TYPE:
        raise FormError(400, f"expected Content-Type {FORM_TYPE}")
    if too_large(request, limit):
        raise FormError(413, f"request body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > limit:
            raise FormError(413, f"request body larger than {limit} bytes")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                          errors="strict", max_num_fields=MAX_FIELDS)
    except ValueError:  # UnicodeDecodeError is one too
        raise FormError(400, "malformed form body (not UTF-8 key=value pairs)") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise FormError(400, f"field {key!r} given more than once")
        form[key] = value
    return form
