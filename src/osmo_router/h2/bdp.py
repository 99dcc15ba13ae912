"""Growing a connection's stream receive window to the link's bandwidth-delay product (issue 18).

A fixed stream window caps one stream at window / round trip: 2 MiB over a 40 ms path is 50 MiB/s,
where grpc (which sizes its windows this way) measured 108 MiB/s on the same path. So, as grpc
does, the receiving side measures: when data starts arriving it sends a PING, and counts the bytes
that arrive until the ack. A sample that reaches 2/3 of the window, at a bandwidth (sample / round
trip) clearly higher than any measured before, means the window is what limits the link: the window grows
to twice the sample, at most `max_window`. The bandwidth rule keeps a peer that delays its acks
from growing the window (a longer round trip with the same rate is no higher bandwidth).

Our stream windows are given back only as the reader takes messages (stream.py), so a grown window
only fills for a reader that keeps up, and a stalled stream holds at most `max_window`. A sample
that does not grow the window puts the next ping off (doubling, up to MAX_PING_GAP), so a long
transfer at its final window costs about one ping a second rather than one per round trip.

Between samples nothing need be told of the data (issue 18: `on_data` and its clock read were two
calls per DATA frame in every process): `active` says when it must. Given a scheduler (`later`, the
loop's call_later), a sample that puts the next ping off turns `active` off until then, as grpc marks
its next ping due from a timer rather than reading the clock per frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

#: The payload of our window-sizing pings (keepalive pings carry a timestamp, never this).
BDP_PING: Final = b"osmo-bdp"
#: A sample that reaches this share of the window says the window, not the sender, is the limit.
FULL_SHARE: Final = 2 / 3
#: The window grows to this many times a full sample (room for the bandwidth to grow further).
GROWTH: Final = 2
#: ...and only when its bandwidth beats the best measured by this factor (a doubled window on a link
#: that carries it roughly doubles the bandwidth; timing noise, or a peer delaying its acks, does not).
BANDWIDTH_STEP: Final = 1.25
#: Longest gap between pings while the window no longer grows (seconds).
MAX_PING_GAP: Final = 1.0


class BdpEstimator:
    """When to send a window-sizing PING, and the window its ack calls for."""

    def __init__(
        self,
        window: int,
        max_window: int,
        clock: Callable[[], float] = time.monotonic,
        later: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        self.window = window
        self.max_window = max_window
        self._clock = clock
        self._later = later  # (delay, callback) -> a handle with cancel(); None: `active` stays True
        self._timer: Any = None
        #: Whether `on_data` must be told of arriving data now: a sample is under way, or a ping may be
        #: due. False only while the next ping is put off (its timer turns it on) or the window is at
        #: its limit; callers skip `on_data` then (the clock's own check stays in `on_data`).
        self.active = window < max_window
        self._sent_at: float | None = None
        self._sample = 0
        self._best_bandwidth = 0.0
        self._gap = 0.0
        self._next_ping = 0.0
        #: The last round trip measured (seconds), None before the first ack.
        self.rtt: float | None = None

    def on_data(self, size: int) -> bool:
        """`size` bytes of DATA arrived; True when a BDP_PING should go out now."""
        if self._sent_at is not None:
            self._sample += size
            return False
        if self.window >= self.max_window:
            return False
        now = self._clock()
        if now < self._next_ping:
            return False
        self._sent_at = now
        self._sample = size
        return True

    def on_ack(self) -> int | None:
        """Our BDP_PING was acked: the new window if the sample calls for a larger one, else None."""
        if self._sent_at is None:
            return None  # an ack we did not ask for (a peer echoing our payload twice)
        now = self._clock()
        rtt = max(now - self._sent_at, 1e-6)
        self._sent_at = None
        self.rtt = rtt
        bandwidth = self._sample / rtt
        if self._sample >= self.window * FULL_SHARE and bandwidth > self._best_bandwidth * BANDWIDTH_STEP:
            self._best_bandwidth = bandwidth
            grown = min(self.max_window, max(self.window, int(self._sample * GROWTH)))
            if grown > self.window:
                self.window = grown
                self._gap = 0.0
                self.active = grown < self.max_window  # the next ping at once, up to the limit
                return grown
        self._gap = min(MAX_PING_GAP, max(2 * self._gap, rtt))
        self._next_ping = now + self._gap
        if self._later is not None:
            self.active = False
            self._timer = self._later(self._gap, self._due)
        return None

    def _due(self) -> None:
        self._timer = None
        self.active = self.window < self.max_window

    def cancel(self) -> None:
        """The connection is over: no timer left behind."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.active = False


__all__ = ["BANDWIDTH_STEP", "BDP_PING", "FULL_SHARE", "GROWTH", "MAX_PING_GAP", "BdpEstimator"]
