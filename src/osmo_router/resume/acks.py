"""When a receiver of a resumable session acknowledges, and how the acknowledgement goes out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from osmo_router.resume.window import ACK_DELAY, AckClock, ack_interval


class Acknowledger:
    """Acknowledges what the handler consumed: every `every` units, at once after a terminal frame,
    within ACK_DELAY otherwise.

    Acks go out from a task of their own, one at a time (one wanted while another is written goes
    right after it, with the count of that moment): a receiver never waits for a write, which would
    wait behind this side's own data (a 1 MiB send holds the stream until the peer's window takes it).
    """

    def __init__(self, clock: AckClock, write: Callable[[], Awaitable[None]]) -> None:
        """`write` sends `clock.frame()` on the current stream (or nothing when there is none)."""
        self.clock = clock
        self._write = write
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._wanted = False
        self._closed = False
        #: True while a frame consumed that leaves less than `every` owed needs nothing done here: a timer
        #: will acknowledge it, or acknowledgements are over. (Read by the receive path before it calls
        #: `consumed`: a call less per message received, issue 18.)
        self.quiet = False

    def set_peer_window(self, window_bytes: int) -> None:
        """Acknowledge often enough for a peer that keeps at most `window_bytes` unacknowledged."""
        self.clock.every = ack_interval(window_bytes)

    def consumed(self, units: int, terminal: bool) -> None:
        """The handler consumed a frame of `units`; `terminal`: a half-close, exit status or error."""
        clock = self.clock
        clock.received += units  # (AckClock.take, inline: once per message received)
        if clock.received - clock.acked >= clock.every or terminal:
            self.now()
        elif self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._soon)
            self.quiet = True

    def now(self) -> None:
        """Acknowledge as soon as the stream takes it."""
        self._cancel_timer()
        self._wanted = True
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())

    def close(self) -> None:
        """No more acknowledgements (the session is over)."""
        self._closed = True
        self._cancel_timer()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def _soon(self) -> None:
        self._timer = None
        self.quiet = self._closed
        if self.clock.owed:
            self.now()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.quiet = self._closed

    async def _run(self) -> None:
        while self._wanted and not self._closed:
            self._wanted = False
            await self._write()


__all__ = ["Acknowledger"]
