"""Logging set-up shared by every command: JSON lines for machines, plain lines for terminals."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time

#: Longest text a log line quotes from a peer (a client's or an agent's): a refusal's reason, an rsync
#: command line. Longer text is cut (`cut`); the router's own reasons are under 200 characters.
MAX_QUOTED = 512


def cut(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` cut to `limit` characters, the cut marked with an ellipsis: what a log line may quote of
    what a peer sent (a message up to --max-message-size would otherwise make one line of megabytes)."""
    return text if len(text) <= limit else text[:limit] + "..."


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with structured `fields` merged in."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as a JSON line."""
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """A readable line, with structured `fields` as key=value pairs."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as a text line."""
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure the root logger on stderr; fmt is json, text or auto (text on a terminal)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def fingerprint(key: str) -> str:
    """A session key as logs show it: 12 hex digits of its SHA-256, which names the key without revealing it.

    A prefix of the key would reveal most of a short key an orchestrator chose.
    """
    return hashlib.sha256(key.encode()).hexdigest()[:12]
