"""Numbering the frames of a resumable session, and the replay buffer of what is not acknowledged.

Units (docs/resume.md): a data or stderr frame counts its payload bytes, every other numbered
frame counts 1, and Ack, Resume and Detach frames are not numbered. Counting payload bytes rather
than frames keeps the numbering intact when the router merges queued data frames into one message
(router/core/coalesce.py): a merge never crosses a control frame, so every offset a receiver
acknowledges falls on a boundary the sender can resend from (slicing a data frame when it must).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Final

from osmo_router.wire.codec import encode_data_message, payload_offset
from osmo_router.wire.protocol import pb

#: Frame kinds that are about the stream itself, not the session: never numbered or replayed.
UNNUMBERED: Final = frozenset({"ack", "resume", "detach"})
#: Frames after which the receiver acknowledges at once (the sender waits for that ack to end).
TERMINAL: Final = frozenset({"half_close", "exit_status", "error"})
#: Bytes a receiver takes before it acknowledges, when nothing else makes it acknowledge sooner.
ACK_EVERY: Final = 256 * 1024
#: ...or a quarter of the peer's replay buffer when the peer says how large it is (Resume.window_bytes,
#: ResumeToken.window_bytes), at most this: a bulk transfer then costs one ack per few data frames
#: rather than one per frame (every ack is one more message through every hop).
ACK_MAX: Final = 2 * 1024 * 1024
#: Longest a receiver holds an acknowledgement back once it received something.
ACK_DELAY: Final = 0.2
#: Bytes one side keeps for the other until acknowledged (per direction, per session).
DEFAULT_REPLAY_BYTES: Final = 8 * 1024 * 1024
#: What a frame costs the replay buffer beyond its payload (protobuf objects, deque entry).
ENTRY_OVERHEAD: Final = 128


def ack_interval(peer_window: int) -> int:
    """Units a receiver takes before it acknowledges, for a sender that holds `peer_window` bytes.

    A quarter of the sender's window keeps it sending while the acknowledgement travels, at most
    ACK_MAX (an ack per 1 MiB data frame doubled the messages of a bulk transfer); 0 (an end that
    does not say) means ACK_EVERY.
    """
    if peer_window <= 0:
        return ACK_EVERY
    return max(4096, min(ACK_MAX, peer_window // 4))


def units_of(frame: pb.Frame) -> int:
    """How many units `frame` takes in the numbering (0 for Ack, Resume and Detach)."""
    kind = frame.WhichOneof("kind")
    if kind == "data":
        return len(frame.data)
    if kind == "stderr":
        return len(frame.stderr)
    return 0 if kind in UNNUMBERED or kind is None else 1


Item = pb.Frame | bytes


@dataclass(slots=True)
class Entry:
    """One frame sent: where it starts in the numbering, how many units, and the frame itself."""

    start: int
    units: int
    item: Item
    size: int
    #: Position among the frames appended (tells a resent frame from one not written yet).
    seq: int


def slice_from(entry: Entry, offset: int) -> Item:
    """The part of `entry` from unit `offset` on (a data frame cut; anything else whole)."""
    skip = offset - entry.start
    if skip <= 0:
        return entry.item
    if isinstance(entry.item, bytes):
        return encode_data_message(entry.item[payload_offset(entry.item) + skip :])
    frame = entry.item
    if frame.WhichOneof("kind") == "stderr":
        return pb.Frame(stderr=frame.stderr[skip:])
    return pb.Frame(data=frame.data[skip:])


class SharedWindow:
    """Bytes all the replay buffers of one process may hold together (the agent's total)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._blocked: set[asyncio.Event] = set()

    def fits(self, size: int) -> bool:
        """True if `size` more bytes fit."""
        return self.used + size <= self.limit

    def take(self, size: int) -> None:
        """Count `size` bytes held."""
        self.used += size

    def give(self, size: int) -> None:
        """Count `size` bytes freed; wake the buffers waiting for room."""
        self.used -= size
        if size and self._blocked:
            for event in self._blocked:
                event.set()
            self._blocked.clear()

    def wait_on(self, event: asyncio.Event) -> None:
        """Set `event` the next time bytes are freed."""
        self._blocked.add(event)


class UserWindow(SharedWindow):
    """One user's share of a SharedWindow: fits only what fits both her own limit and the total.

    `total` is a plain SharedWindow (the process's); `fits` and `take` read and count it in place
    rather than through its methods: they run for every message a forward sends (issue 18).
    """

    def __init__(self, limit_bytes: int, total: SharedWindow) -> None:
        super().__init__(limit_bytes)
        self.total = total

    def fits(self, size: int) -> bool:
        total = self.total
        return self.used + size <= self.limit and total.used + size <= total.limit

    def take(self, size: int) -> None:
        self.used += size
        self.total.used += size

    def give(self, size: int) -> None:
        super().give(size)
        self.total.give(size)

    def wait_on(self, event: asyncio.Event) -> None:
        super().wait_on(event)
        self.total.wait_on(event)


class InputBudget:
    """Bytes of the peers' frames that sessions took and their handlers did not consume yet, per user
    and in total (the agent's: a client may send up to twice its window ahead of a command that does
    not read its input, and one user's sessions must not fill the agent's memory for everyone).

    A frame costs its units plus ENTRY_OVERHEAD (its objects), so a flood of tiny frames is counted
    as what it holds. `take` refuses (returns the reason) what does not fit; the session then ends.
    """

    def __init__(self, user_limit: int, total_limit: int) -> None:
        self.user_limit = user_limit
        self.total_limit = total_limit
        self.used = 0
        self._users: dict[str, int] = {}

    def of(self, user: str) -> int:
        """What `user`'s sessions hold."""
        return self._users.get(user, 0)

    def take(self, user: str, cost: int) -> str | None:
        """Count `cost` bytes for `user`; None if they fit, else why not (nothing counted)."""
        held = self._users.get(user, 0)
        if held + cost > self.user_limit:
            return f"the agent holds its maximum of {self.user_limit} bytes of input not yet read for {user}"
        if self.used + cost > self.total_limit:
            return f"the agent holds its maximum of {self.total_limit} bytes of input not yet read"
        self._users[user] = held + cost
        self.used += cost
        return None

    def give(self, user: str, cost: int) -> None:
        """Count `cost` bytes of `user`'s freed."""
        if cost <= 0:
            return
        left = self._users.get(user, 0) - cost
        if left > 0:
            self._users[user] = left
        else:
            self._users.pop(user, None)
        self.used -= cost


class ReplayBuffer:
    """What this side sent and the other side has not acknowledged, bounded in bytes.

    `reserve` waits while the buffer is full: a peer that stops acknowledging (a break, a slow
    reader) stops this side's sender, it never grows the buffer. One frame larger than the whole
    limit is still taken when the buffer is empty, so nothing can wedge.
    """

    def __init__(self, limit_bytes: int = DEFAULT_REPLAY_BYTES, shared: SharedWindow | None = None) -> None:
        self.limit = limit_bytes
        self.shared = shared
        self._entries: deque[Entry] = deque()
        #: First unit still held, and the next unit to be numbered.
        self.base = 0
        self.end = 0
        self.bytes = 0
        self.appended = 0
        self.closed = False
        self._space = asyncio.Event()
        self._space.set()
        self._settled = asyncio.Event()
        self._settled.set()

    def __len__(self) -> int:
        return len(self._entries)

    async def reserve(self, size: int) -> None:
        """Wait until `size` more bytes fit (or the buffer is empty)."""
        while not self.fits_now(size):
            self._space.clear()
            if self.shared is not None:
                self.shared.wait_on(self._space)
            await self._space.wait()

    def fits_now(self, size: int) -> bool:
        """Whether `reserve(size)` would return at once."""
        if not self._entries or self.closed:
            return True
        return self.bytes + size <= self.limit and (self.shared is None or self.shared.fits(size))

    async def wait_settled(self) -> None:
        """Wait until the peer acknowledged everything sent (or the buffer was closed)."""
        if self._entries and not self.closed:
            self._settled.clear()
            await self._settled.wait()

    def close(self) -> None:
        """Wake every waiter for good and give the shared window back: the session is over."""
        self.closed = True
        if self.shared is not None:
            self.shared.give(self.bytes)
        self.bytes = 0
        self._entries.clear()
        self._space.set()
        self._settled.set()

    def append(self, item: Item, units: int, size: int) -> Entry:
        """Number `item` and hold it (a closed buffer numbers it and holds nothing: the session is over)."""
        entry = Entry(self.end, units, item, size + ENTRY_OVERHEAD, self.appended)
        self.appended += 1
        self.end += units
        if self.closed:
            # Held now, it would never be acknowledged nor given back to the shared window, and
            # `settled` would stay False for good under a `wait_settled` that returns at once.
            return entry
        if not self._entries:
            self._settled.clear()  # (it is set exactly while nothing is held: see ack and close)
        self._entries.append(entry)
        self.bytes += entry.size
        if self.shared is not None:
            self.shared.take(entry.size)
        return entry

    def ack(self, received: int) -> int:
        """Forget what the peer received (everything before unit `received`); returns bytes freed."""
        received = min(received, self.end)
        freed = 0
        while self._entries:
            head = self._entries[0]
            if head.start + head.units > received or (head.units == 0 and head.start >= received):
                break
            self._entries.popleft()
            freed += head.size
        if received > self.base:
            self.base = received
        self.bytes -= freed
        if self.shared is not None:
            self.shared.give(freed)
        if freed:
            self._space.set()
        if not self._entries:
            self._settled.set()
        return freed

    def holds(self, offset: int) -> bool:
        """True if the buffer can resend from unit `offset`."""
        first = self._entries[0].start if self._entries else self.end
        return first <= offset <= self.end

    def first_held(self) -> int:
        """The oldest unit still held (what an attach replays from)."""
        return self._entries[0].start if self._entries else self.end

    def since(self, offset: int) -> list[tuple[Entry, Item]]:
        """Everything from unit `offset` on, the first frame cut if `offset` falls inside it."""
        out: list[tuple[Entry, Item]] = []
        for entry in self._entries:
            if entry.start + entry.units <= offset and not (entry.units == 0 and entry.start >= offset):
                continue
            out.append((entry, slice_from(entry, offset)))
        return out

    @property
    def settled(self) -> bool:
        """True when the peer acknowledged everything sent."""
        return not self._entries


class AckClock:
    """When a receiver owes its peer an acknowledgement."""

    def __init__(self, every: int = ACK_EVERY) -> None:
        #: Units taken before an ack is due (a quarter of the peer's window once it said: ack_interval).
        self.every = every
        self.received = 0
        self.acked = 0

    def take(self, units: int) -> bool:
        """Count `units` received; True if an acknowledgement is due at once."""
        self.received += units
        return self.received - self.acked >= self.every

    @property
    def owed(self) -> bool:
        """True if something received is not acknowledged yet."""
        return self.received > self.acked

    def frame(self) -> pb.Frame:
        """The Ack frame to send now (and count it sent)."""
        self.acked = self.received
        return pb.Frame(ack=pb.Ack(received=self.received))


__all__ = [
    "ACK_DELAY",
    "ACK_EVERY",
    "ACK_MAX",
    "DEFAULT_REPLAY_BYTES",
    "ENTRY_OVERHEAD",
    "TERMINAL",
    "UNNUMBERED",
    "AckClock",
    "Entry",
    "InputBudget",
    "ReplayBuffer",
    "SharedWindow",
    "UserWindow",
    "ack_interval",
    "slice_from",
    "units_of",
]
