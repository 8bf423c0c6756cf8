"""Logging set-up: text or JSON lines on stderr; mailcloak's level apart from the libraries'.

A record may carry structured fields (`extra={"fields": {...}}`): JSON output puts them as
top-level keys, text output appends them as `key=value`, so a decision line is searchable by
queue id, client, SASL user, sender, recipient, action and rule in either format.
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "\"=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def configure(log_format: str = "text") -> None:
    """Install one stderr handler with the chosen format (replacing earlier ones)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def set_level(level: str) -> None:
    """mailcloak's own loggers at `level`; libraries (aiosqlite, asyncio, aiohttp) never below INFO."""
    logging.getLogger("mailcloak").setLevel(level.upper())
    logging.getLogger().setLevel(max(logging.INFO, logging.getLevelName(level.upper())))
