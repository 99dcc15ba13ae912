"""The numbered stream under `ResumableStream` (issue 17, docs/resume.md): state, sending, breaks.

`StreamCore` holds what a resumable session stream keeps (the replay buffer, the acknowledgement
clock, the stream under it and its generation), sends through it (each frame numbered and held
until the peer acknowledges it), and when it breaks gets a new one from `_reconnect` and sends again
everything the peer lacks. `ResumableStream` (resume/stream.py) adds the handlers' side: the
`SessionStream` methods, the reader and what it takes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from osmo_router.h2.front import LaneTarget
from osmo_router.resume.acks import Acknowledger
from osmo_router.resume.breaks import BREAKS, ENDS, SessionLost, describe
from osmo_router.resume.window import (
    DEFAULT_REPLAY_BYTES,
    AckClock,
    InputBudget,
    Item,
    ReplayBuffer,
    SharedWindow,
)
from osmo_router.transport import SessionStream
from osmo_router.wire.codec import as_frame
from osmo_router.wire.protocol import pb

#: The most of a peer's announced window that the overrun check believes (`_incoming_limit`): the
#: peer says it, so a hostile one could otherwise make this side hold what it likes. Agents keep
#: 16 MiB by default; windows up to about twice this still fit the check's slack.
MAX_PEER_WINDOW = 64 * 1024 * 1024

log = logging.getLogger(__name__)


class StreamCore:
    """A stream of numbered frames over a replaceable stream: held until acknowledged, resent after a break."""

    def __init__(
        self, inner: SessionStream, *, replay_bytes: int = DEFAULT_REPLAY_BYTES, shared: SharedWindow | None = None
    ) -> None:
        self._inner: SessionStream | None = inner
        self._raw = inner.raw
        self._generation = 0
        self.buffer = ReplayBuffer(replay_bytes, shared)
        self._acks = AckClock()
        self._write_lock = asyncio.Lock()
        self._next_seq = 0  # the first frame of the buffer not written to the current stream
        self._incoming: deque[pb.Frame] = deque()
        self._incoming_units = 0
        #: What the queued frames hold: their units plus ENTRY_OVERHEAD each (a flood of tiny frames
        #: holds far more than its units); the overrun check and the budget count this.
        self._incoming_cost = 0
        #: The process's budget for frames taken and not consumed (the agent's, per user and in total).
        self.input_budget: InputBudget | None = None
        self.input_user = ""
        self._peer_window = 0  # what the peer keeps unacknowledged at most, once it said (set_peer_window)
        self._arrived = asyncio.Event()
        self._room_to_take = asyncio.Event()  # set when the reader may take frames again (_holding_back)
        self._handler_waiting = False  # the handler waits in recv for the reader's next frame
        self._sink: Callable[[pb.Frame], bool] | None = None  # see set_sink
        self._data_sink: Callable[[memoryview], bool] | None = None  # see set_sink
        self._direct_sender: Any = None  # see set_direct_sender
        #: Whether a data frame may go to the data sink with no more than `_take` checks for data (a
        #: subclass that must look at every frame first, the client until the agent's answer, clears it).
        self._data_lane = True
        self._sending = 0  # sends in progress (_send_item), which a try_send_data_message must not pass
        #: The stream under it whose at-once data sender `_direct` is (ResumableStream.try_send_data_message).
        self._direct_of: SessionStream | None = None
        self._direct: Callable[[bytes], bool] | None = None
        #: Whether `_room_now` is the replay buffer's `fits_now` alone (a subclass whose `_room` waits for
        #: more, the client until the agent answered, clears it until then).
        self._room_by_buffer = True
        self._connected = asyncio.Event()
        self._connected.set()
        self._ended = False
        self._lost: SessionLost | None = None
        self._lost_event = asyncio.Event()  # set once lost (wait_lost)
        self._lost_reported = False
        self._acker = Acknowledger(self._acks, self._write_ack)
        self._tasks: set[asyncio.Task[None]] = set()
        #: False once the peer turned out not to resume (an older agent): frames pass straight through.
        self.resumable = True
        #: True while the peer takes acknowledgements (it numbers what it sends).
        self.acking = True
        self.local_closed = False
        self.remote_half_closed = False
        self.remote_final = False
        self.resumes = 0
        self.replayed_units = 0
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    # --- what a side provides ---------------------------------------------------------------------

    @property
    def taken(self) -> int:
        """Units of the peer's frames taken off the streams (consumed or waiting): where a resume starts."""
        return self._acks.received + self._incoming_units

    async def _reconnect(self, cause: str) -> tuple[SessionStream, int]:
        """A new stream and how much of this side's frames the peer received; raises SessionLost."""
        raise SessionLost(f"the session broke: {cause}")

    @property
    def connected(self) -> bool:
        """True while a stream is in place: not between a break and its resume, nor lost."""
        return self._inner is not None and self._lost is None

    def _ended_cleanly(self) -> bool:
        """True if the stream under us may end now without a resume."""
        if not self.resumable:
            return True
        return self.remote_final or (self.remote_half_closed and self.local_closed and self.buffer.settled)

    def set_peer_window(self, window_bytes: int) -> None:
        """Acknowledge often enough for a peer that keeps at most `window_bytes` unacknowledged."""
        self._acker.set_peer_window(window_bytes)
        self._peer_window = window_bytes

    @property
    def _incoming_limit(self) -> int:
        """Units taken and not consumed past which the peer overran its window (twice it, with slack: a
        peer's window is its own, the agent's larger than the client's; believed up to MAX_PEER_WINDOW)."""
        return 2 * max(self.buffer.limit, min(self._peer_window, MAX_PEER_WINDOW)) + 1024 * 1024

    # --- the stream under it ----------------------------------------------------------------------

    def _listen_to(self, inner: SessionStream, generation: int) -> None:
        """Take `inner`'s frames as they arrive where it can hand them over (FrameStream.set_listener):
        the reader task, woken otherwise for each, then sees only the end or a break."""
        set_listener = getattr(inner, "set_listener", None)
        if set_listener is not None:
            pushed = functools.partial(self._pushed, generation)
            if getattr(inner, "raw", False):  # data frames as bytes: no message object per frame
                set_listener(pushed, data=functools.partial(self._pushed_data, generation))
                if self._direct_sender is not None:
                    self._open_lane(inner, generation)
            else:
                set_listener(pushed)

    def _open_lane(self, inner: SessionStream, generation: int) -> None:
        """Let `inner`'s native front (h2/front.py) pass its data frames to the direct sender, if it can."""
        open_lane = getattr(inner, "open_lane", None)
        if open_lane is not None:
            sender = self._direct_sender
            open_lane(None if sender is None else LaneTarget(self, generation, sender, self._data_consumed))

    def _pushed(self, generation: int, frame: pb.Frame) -> bool:
        # As _read_forever's loop: a frame off a stream already given up is dropped (a resume asks for it again).
        if generation == self._generation and not self._ended:
            if not self.resumable and self._holding_back():  # (one check per message while resumable)
                return False  # left on the stream under it, for the reader once the handler caught up
            self._take(frame)
        return True

    def _pushed_data(self, generation: int, payload: memoryview) -> bool:
        """As `_pushed`, for a data frame given as its payload (a raw stream's, issue 18): to the handler's
        data sink when `_take` would give the frame to its sink, acknowledged as `_consumed` does; else
        `_take` as a frame."""
        if generation != self._generation or self._ended:
            return True
        if not self.resumable and self._holding_back():
            return False
        sink = self._data_sink
        if (
            sink is not None
            and self._data_lane
            and self._handler_waiting
            and not self._incoming
            and self._lost is None
            and sink(payload)
        ):
            if self.acking:
                self._data_consumed(len(payload))
            return True
        self._take(as_frame(payload))
        return True

    def _data_consumed(self, size: int) -> None:
        """The data sink took `size` payload bytes: acknowledged as `_consumed` does (Acknowledger.consumed,
        called only when it has something to do: a call less per message)."""
        if self.acking:
            acker = self._acker
            clock = acker.clock
            clock.received += size
            if not acker.quiet or clock.received - clock.acked >= clock.every:
                acker.consumed(0, False)

    def _holding_back(self) -> bool:
        """Whether to take no more of the peer's frames for now. A peer that does not resume keeps no
        replay window, so nothing holds it back but the stream under us: what the handler has not
        consumed is then bounded here, at `replay_bytes`, and the stream's own flow control (its
        window, the router's limits behind it) holds the peer back meanwhile."""
        return not self.resumable and self._incoming_cost >= self.buffer.limit

    def _take(self, frame: pb.Frame) -> None:
        """Take one of the peer's frames off the stream under it (ResumableStream)."""
        raise NotImplementedError

    # --- sending ----------------------------------------------------------------------------------

    async def _send_item(self, item: Item, units: int, size: int) -> None:
        if self._lost is not None:
            return
        self._sending += 1
        try:
            await self._send_item_now(item, units, size)
        finally:
            self._sending -= 1

    async def _send_item_now(self, item: Item, units: int, size: int) -> None:
        if not self.resumable:
            async with self._write_lock:
                if self._inner is not None:
                    try:
                        await self._put(self._inner, item)
                    except BREAKS as err:
                        self._broken(self._generation, err)
            return
        await self._room(size)
        if not self.resumable:  # gave up on resume while waiting for room
            await self._send_item_now(item, units, size)
            return
        entry = self.buffer.append(item, units, size)
        async with self._write_lock:
            inner = self._inner
            if inner is None or entry.seq < self._next_seq:
                return  # sent again by a resume already, or waiting for one
            self._next_seq = entry.seq + 1
            generation = self._generation
            try:
                await self._put(inner, item)
            except BREAKS as err:
                self._broken(generation, err)

    async def _room(self, size: int) -> None:
        """Wait until the replay buffer takes `size` more bytes."""
        await self.buffer.reserve(size)

    @staticmethod
    async def _put(inner: SessionStream, item: Item) -> None:
        if isinstance(item, bytes):
            await inner.send_data_message(item)
        else:
            await inner.send(item)

    async def _write_ack(self) -> None:
        async with self._write_lock:
            inner, generation = self._inner, self._generation
            if inner is None:
                return
            try:
                await inner.send(self._acks.frame())
            except BREAKS as err:
                self._broken(generation, err)

    # --- losing -----------------------------------------------------------------------------------

    async def wait_lost(self) -> None:
        """Until the session is lost (its grace passed, a limit ended it): nothing will resume it."""
        await self._lost_event.wait()

    def _lose(self, lost: SessionLost) -> None:
        if self._lost is None:
            self._lost = lost
            self._lost_event.set()
            log.info("session lost: %s", lost.message)
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.abort()
        self._stop()
        self._connected.set()
        self._arrived.set()

    def _stop(self) -> None:
        self._ended = True
        if self.input_budget is not None:  # what is still queued is the handler's to drop now
            self.input_budget.give(self.input_user, self._incoming_cost)
            self.input_budget = None
        self.buffer.close()
        self._acker.close()
        self._room_to_take.set()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._arrived.set()

    # --- breaks and resumes -----------------------------------------------------------------------

    def _broken(self, generation: int, cause: object) -> None:
        """The stream of `generation` broke: drop it and resume (once, whoever noticed first)."""
        if generation != self._generation or self._inner is None or self._lost is not None:
            return
        text = describe(cause)
        if not self.resumable or self._ended_cleanly():
            # Nothing to resume: the peer's last word (an exit status or error) is here, or both
            # sides ended and everything was acknowledged. (Closing our transport after it aborts
            # the call under the reader: that is not a break to tell the user of.)
            self._lose(SessionLost(text))
            if self.resumable:
                # The handler takes the peer's last word and then the end, as when the reader saw the
                # break: a write that failed first (the acknowledgement sent at once for an exit
                # status) must not add an error behind it, which made exec exit 255 after the status.
                self._lost_reported = True
            return
        if isinstance(cause, grpc.aio.AioRpcError) and cause.code() in ENDS:
            # The router ended the session on purpose (a write can hear it before the reader does).
            self._lose(SessionLost(cause.details() or cause.code().name, cause.code()))
            return
        inner, self._inner = self._inner, None
        self._generation += 1
        self._connected.clear()
        inner.abort()
        log.info("session stream broke (%s); resuming", text)
        task = asyncio.create_task(self._recover(text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self, cause: str) -> None:
        try:
            inner, peer_received = await self._reconnect(cause)
        except SessionLost as lost:
            self._lose(lost)
            return
        await self._adopt(inner, peer_received)

    async def _adopt(self, inner: SessionStream, peer_received: int) -> None:
        """Put `inner` in place: forget what the peer has, send again what it lacks."""
        async with self._write_lock:
            if self._lost is not None:
                inner.abort()
                return
            if not self.buffer.holds(peer_received):
                inner.abort()
                self._lose(
                    SessionLost(
                        f"cannot resume: the peer received {peer_received} units, this side holds "
                        f"{self.buffer.first_held()}-{self.buffer.end}",
                        grpc.StatusCode.DATA_LOSS,
                    )
                )
                return
            self.buffer.ack(peer_received)
            generation = self._generation
            self._inner = inner
            if self._reader is not None:
                self._listen_to(inner, generation)
            self.resumes += 1
            resent = self.buffer.since(peer_received)
            self._next_seq = resent[-1][0].seq + 1 if resent else self.buffer.appended
            try:
                for entry, item in resent:
                    self.replayed_units += entry.units
                    await self._put(inner, item)
                if self._acks.owed:
                    await inner.send(self._acks.frame())
            except BREAKS as err:
                self._connected.set()
                self._broken(generation, err)
                return
        self._connected.set()
