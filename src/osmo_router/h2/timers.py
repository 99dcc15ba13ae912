"""A connection's timers: handshake, keepalive pings, the peer's ping rate, max idle, max age."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from osmo_router.h2 import frames as fr

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection

log = logging.getLogger(__name__)

#: Keepalive rounds an unanswered PING is forgiven while our unsent data sits in the kernel only (no
#: writer of ours waits): about 90 s with the defaults, time for a starved session's writer to get
#: data again and meet the flow-control limits; a lost peer is then cut as before.
KERNEL_ONLY_ROUNDS = 3


class Timers:
    """A connection's timers: handshake, keepalive pings, ping tolerance, max idle, max age."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._handles: dict[str, asyncio.TimerHandle] = {}
        self._ping_payload: bytes | None = None
        self._unanswered = 0  # keepalive rounds in a row left unanswered behind data in the kernel only
        self._last_peer_ping = 0.0
        #: The peer's pings too soon in a row since we last sent HEADERS or DATA (set to 0 inline by the
        #: per-message send paths in flow.py: `sent_data`'s body).
        self.strikes = 0
        self._reset_tokens = 10 * conn.config.max_peer_resets_per_second
        self._reset_at = time.monotonic()

    def _later(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._stop(name)
        if delay > 0:
            self._handles[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _stop(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.cancel()

    def start(self) -> None:
        """At connection_made."""
        config = self.conn.config
        self._later("handshake", config.handshake_timeout, self.conn.close)
        self._later("keepalive", config.keepalive_time, self._ping)
        if self.conn.role == "server":
            self.idle()
            if config.max_connection_age > 0:
                self._later("age", config.max_connection_age, self._aged)

    def handshake_done(self) -> None:
        """The peer's first SETTINGS arrived."""
        self._stop("handshake")

    def busy(self) -> None:
        """A stream was opened: the connection is not idle."""
        self._stop("idle")

    def idle(self) -> None:
        """No stream left: close after max_connection_idle (server role)."""
        if self.conn.role == "server" and not self.conn.closed:
            self._later("idle", self.conn.config.max_connection_idle, self._idle_expired)

    def _idle_expired(self) -> None:
        if not self.conn.streams:
            self.conn.goaway(fr.ErrorCode.NO_ERROR, "max_idle")

    def _aged(self) -> None:
        self.conn.goaway(fr.ErrorCode.NO_ERROR, "max_age")
        self._later("age_grace", self.conn.config.max_connection_age_grace, self.conn.close)

    def _ping(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        self._ping_payload = time.monotonic_ns().to_bytes(8, "big")
        conn.write_frame(fr.encode(fr.PING, 0, 0, self._ping_payload))
        self._later("ping_timeout", conn.config.keepalive_timeout, self._ping_timed_out)

    def _ping_timed_out(self) -> None:
        conn = self.conn
        # Server role only: the router's flow-control limits end a non-reading peer's sessions. A
        # client (CLI, agent) has no such limits and must notice a lost path to resume from it.
        if conn.role == "server" and self._peer_holds_us_up():
            # Our data waits for the peer (its windows or our transport's buffer are full): the PING is
            # queued behind it, so no ack says nothing of a lost peer, only of one that does not read,
            # and its sessions' writers are held back, which the flow-control limits judge and end
            # with their reason (issue 14: a trickle reader was cut here as "the client's stream broke"
            # before its drain-rate limit fired). Ping again later; a peer lost for good stays bounded
            # by those limits, then by this keepalive once nothing waits.
            log.debug("h2 keepalive: no ping ack, but data waits for the peer: leaving it to the flow-control limits")
            self._ping_payload = None
            self._later("keepalive", conn.config.keepalive_time, self._ping)
            return
        log.info("h2 keepalive: no ping ack within %gs, closing", conn.config.keepalive_timeout)
        conn.abort()

    def _peer_holds_us_up(self) -> bool:
        """Whether our data waits for the peer: in-process (always), or in the kernel only (the last
        writes fit its buffer; the session's writer waits for more) for KERNEL_ONLY_ROUNDS rounds."""
        if _peer_not_reading(self.conn):
            return True
        if _unsent_in_kernel(self.conn) > 0 and self._unanswered < KERNEL_ONLY_ROUNDS:
            self._unanswered += 1
            return True
        return False

    def ping_acked(self, payload: bytes) -> None:
        """A PING ack: the peer is alive."""
        self._unanswered = 0
        if payload == self._ping_payload:
            self._ping_payload = None
            self._stop("ping_timeout")
            self._later("keepalive", self.conn.config.keepalive_time, self._ping)

    def ping_received(self) -> bool:
        """The peer's PING: False (and GOAWAY ENHANCE_YOUR_CALM) when it pings too often, as grpc servers do."""
        now = time.monotonic()
        interval = self.conn.config.min_ping_interval
        if interval > 0 and now - self._last_peer_ping < interval:
            self.strikes += 1
            if self.strikes > 2:
                self.conn.fail(fr.ErrorCode.ENHANCE_YOUR_CALM, "too_many_pings")
                return False
        self._last_peer_ping = now
        return True

    def peer_reset_allowed(self) -> bool:
        """Count a stream the peer reset: False once it resets faster than max_peer_resets_per_second."""
        rate = self.conn.config.max_peer_resets_per_second
        if rate <= 0:
            return True
        now = time.monotonic()
        burst = 10 * rate
        self._reset_tokens = min(burst, self._reset_tokens + (now - self._reset_at) * rate) - 1
        self._reset_at = now
        return self._reset_tokens >= 0

    def sent_data(self) -> None:
        """We sent HEADERS or DATA: the peer's pings are welcome again (grpc's rule)."""
        self.strikes = 0

    def cancel(self) -> None:
        """At connection_lost."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()


def _peer_not_reading(conn: Connection) -> bool:
    """Whether data of ours waits for the peer: a stream blocked on a window or the transport, or the
    transport's own buffer paused or not empty."""
    transport = conn.transport
    buffered = transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0
    return bool(conn._blocked) or conn.write_paused or buffered > 0


def _unsent_in_kernel(conn: Connection) -> int:
    """Bytes the kernel holds for the peer not yet acknowledged (TIOCOUTQ); 0 when unknown."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)), sys.byteorder, signed=True)
    except (OSError, ValueError):
        return 0
