"""How the client tries again after a break: `attempts`, doubling waits up to a deadline.

Shared by a session's resume (client/resume.py `ResumingStream._reconnect`, for the resume grace) and
`attach` (client/attach.py `open_attach`, for --connect-timeout). What to try, how long one attempt may
take and which failure to report stay with the caller.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

#: First and longest wait between two attempts. The first is short: the first attempt often meets the
#: old connection before gRPC has noticed it is gone ("Stream removed"), and the second one, on a new
#: connection, succeeds. The longest is short too: a router restart is over in a second or two, and a
#: 4 s step was what a resume waited for.
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 1.0


async def attempts(within: float, *, jitter: bool = False) -> AsyncIterator[float]:
    """Yield once per attempt, with the seconds left until the deadline `within` seconds from now.

    The first attempt comes at once; each further one after a wait that doubles from BACKOFF_INITIAL up
    to BACKOFF_MAX. It ends once the next wait would end past the deadline (no attempt could follow it),
    or a wait did.
    `jitter`: each wait is 50-100% of its step, so the clients of a restarted router do not all come
    back in the same instant.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    step, remaining = BACKOFF_INITIAL, within
    while True:
        yield remaining
        wait = step * (0.5 + random.random() / 2) if jitter else step
        if loop.time() + wait > deadline:
            return
        await asyncio.sleep(wait)
        step = min(step * 2, BACKOFF_MAX)
        if (remaining := deadline - loop.time()) <= 0:  # woken late (a loaded machine): no time left
            return


__all__ = ["BACKOFF_INITIAL", "BACKOFF_MAX", "attempts"]
