"""Evidence that this client stopped reading: what tells a flow-control timeout from a lost agent.

Why (issue 15). The router ends a session whose client stops reading for `--flow-control-timeout`
with RESOURCE_EXHAUSTED, sent with a bounded wait: the status goes out behind the data the client
has not read yet. A client that was paused (SIGSTOP) and resumes reads that data, and the status
comes after it; but if it was also writing (stdin, an upload, rsync), its pending write meets the
call the router has finished, grpc.aio replaces the call's status with INTERNAL ("Internal error from
Core", execute_batch) and every later read raises that: the RESOURCE_EXHAUSTED that was on its way is
never read. The router cannot prevent it (any status it sends queues behind the unread data), so the
client reads the cause from its own side: `StallMeter` measures how long this process did not read.

- The event loop's lag, sampled every PERIOD: a paused process shows as one long lag, measured on
  demand too (a stall still in progress when the error is handled counts).
- Time spent delivering a frame locally (`note`): a full stdout (exec; written from a thread, so the
  loop runs on meanwhile), rsync not reading its stdin, a local application not reading a forwarded
  connection (kept per connection by the caller: one slow connection says nothing about another).

A session the router ended while this client was writing is reported as the flow-control timeout
when a stall of at least MIN_STALL happened within MEMORY seconds; otherwise as before (the agent
or the router went away). The wording says "most likely": the client infers, the router decided.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Final

#: How often the event loop's lag is sampled.
PERIOD: Final = 0.2
#: The shortest stall reported as the likely cause (the router's own bound is its --flow-control-timeout).
MIN_STALL: Final = 1.0
#: How long a stall is remembered.
MEMORY: Final = 120.0


class StallMeter:
    """The longest recent time this process did not read (see the module docstring)."""

    def __init__(self) -> None:
        self._stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=32)
        self._tick = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling the running loop's lag (once per loop)."""
        if self._task is not None and not self._task.done():
            return
        self._tick = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._sample())

    def note(self, duration: float) -> None:
        """Remember a stall of `duration` seconds that just ended (shorter ones than MIN_STALL are dropped)."""
        if duration >= MIN_STALL:
            self._stalls.append((time.monotonic(), duration))

    def longest(self) -> float:
        """The longest stall within MEMORY seconds, the one in progress included (seconds)."""
        now = time.monotonic()
        ongoing = now - self._tick - PERIOD if self._task is not None and not self._task.done() else 0.0
        recent = [duration for at, duration in self._stalls if now - at <= MEMORY]
        return max([ongoing, *recent], default=0.0)

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            now = time.monotonic()
            self.note(now - self._tick - PERIOD)
            self._tick = now


#: The process's meter: one event loop, one reading pace.
METER: Final = StallMeter()


__all__ = ["MEMORY", "METER", "MIN_STALL", "PERIOD", "StallMeter"]
