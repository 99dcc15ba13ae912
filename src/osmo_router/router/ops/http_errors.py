"""How the router's HTTP ports (WebSocket, metrics) log a request a client got wrong.

aiohttp logs every request it cannot parse (a header over its 8 KiB line limit, bytes that are not
HTTP, a broken WebSocket frame after the upgrade) at ERROR with a traceback of its parser and the
offending bytes: kilobytes per request, an alert per bad client. That is the client's error, not the
router's: one INFO line naming the peer and the cause, cut to LOGGED_CAUSE characters. Errors of the
router's own handlers are still logged as aiohttp logs them.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

#: Longest cause kept in the log line (the parser's message quotes what the client sent).
LOGGED_CAUSE = 200


class QuietBadRequests(web.RequestHandler):
    """A RequestHandler that logs requests it could not parse as one line (see the module docstring)."""

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's hook for handler and parser errors."""
        exc = kw.get("exc_info")
        if not isinstance(exc, HttpProcessingError):
            super().log_exception(*args, **kw)
            return
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        cause = " ".join(str(exc.message or type(exc).__name__).split())
        if len(cause) > LOGGED_CAUSE:
            cause = cause[:LOGGED_CAUSE] + "..."
        log.info(
            "bad HTTP request from %s: %s %s",
            peer[0] if peer else "?",
            exc.code,
            cause,
            extra={"fields": {"event": "bad http request", "status": exc.code}},
        )
