"""A session stream that outlives the gRPC streams under it (issue 17, docs/resume.md).

`ResumableStream` is a `SessionStream` for the handlers (exec, port-forward, rsync on either side):
they send and receive frames as before, and never see a break. Under it, each frame sent is
numbered and held in a `ReplayBuffer` until the peer acknowledges it; a reader task takes the
peer's frames off the current stream at once (so acknowledgements never wait behind data the
handler has not consumed) and acknowledges what the handler consumed. Where the stream under it
can, frames are pushed to it as they arrive instead (`_listen_to`), and a handler that keeps up
takes them through its sink (`set_sink`) and sends through `try_send_data_message`: a forwarded
message then crosses a client or an agent without a task waking (issue 18). When the stream under it
breaks, `_reconnect` (the client dials again; the agent waits for the client's attach) gives a
new one and the position the peer received, and everything after it is sent again. The numbered
stream itself (state, sending, breaks and resumes) is `StreamCore` (resume/core.py); this module is
the handlers' side of it.

Memory: the replay buffer holds at most `replay_bytes`; what the reader took and the handler has
not consumed is bounded by the peer's replay buffer (the peer cannot send more unacknowledged),
and a peer that sends more than twice its window (or `replay_bytes`, the larger) unacknowledged ends
the session. A peer that does not resume (an older agent) keeps no replay buffer: the reader then
stops taking frames at `replay_bytes` not consumed, and the stream under it holds the peer back
(`_holding_back`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc

from osmo_router.resume.breaks import BREAKS, ENDS, SessionLost, being_cancelled
from osmo_router.resume.core import StreamCore
from osmo_router.resume.window import ENTRY_OVERHEAD, TERMINAL, units_of
from osmo_router.wire.codec import encode_data_message, payload_offset
from osmo_router.wire.protocol import pb

log = logging.getLogger(__name__)


class ResumableStream(StreamCore):
    """A `SessionStream` over a replaceable stream: numbered, acknowledged, resent after a break."""

    # --- SessionStream ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start taking the peer's frames (call once the first stream is in place)."""
        if self._reader is None:
            if self._inner is not None:
                self._listen_to(self._inner, self._generation)
            self._reader = asyncio.create_task(self._read_forever())

    def set_sink(
        self, sink: Callable[[pb.Frame], bool] | None, data: Callable[[memoryview], bool] | None = None
    ) -> None:
        """While the handler waits in `recv` with nothing queued, offer it each frame as it is taken:
        `sink(frame)` delivers it at once and returns True (it counts as received by `recv`), or
        returns False having done nothing (then `recv` gets it). The sink must not raise or wait. So a
        handler that keeps up is not woken per frame (issue 18). `data(payload)`, the same for a data
        frame given as its payload, is offered those that arrive so (no frame object is built)."""
        self._sink = sink
        self._data_sink = data if sink is not None else None

    def set_direct_sender(self, sender: Any) -> None:
        """The DirectSender (io/socket_pumps.py) whose `offer_data` is the data sink, or None: a stream under
        this one on HTTP/2 may then pass data frames to its socket from C (h2/front.py)."""
        self._direct_sender = sender
        if self._inner is not None and self._reader is not None:  # (else start() or a resume opens it)
            self._open_lane(self._inner, self._generation)

    @property
    def raw(self) -> bool:
        """As the stream under it: pre-encoded data messages are taken (and held as they are)."""
        return self._raw

    async def send(self, frame: pb.Frame) -> None:
        """Number, hold and send one frame (waits while the replay buffer is full)."""
        await self._send_item(frame, units_of(frame), frame.ByteSize())

    async def send_data(self, payload: bytes) -> None:
        """Send a data frame."""
        if self._raw:
            await self.send_data_message(encode_data_message(payload))
        else:
            await self.send(pb.Frame(data=payload))

    async def send_data_message(self, message: bytes) -> None:
        """Send a pre-encoded data-frame message."""
        await self._send_item(message, len(message) - payload_offset(message), len(message))

    def try_send_data_message(self, message: bytes, units: int = -1) -> bool:
        """Send a pre-encoded data-frame message at once if it can all go now: no send in progress, room
        in the replay buffer, the stream under it taking it without waiting. False, with nothing done,
        otherwise (then use `send_data_message`). Never raises or waits (issue 18: a pump sends from
        its socket's readiness callback without being woken). `units`: the payload's size, when the
        caller knows it (a socket pump: what it read), else read from the message."""
        if self._lost is not None or self._sending or self._write_lock.locked():
            return False
        inner = self._inner
        if inner is not self._direct_of:  # (looked up once per stream under it, not per message)
            self._direct_of, self._direct = inner, _direct_sender(inner)
        try_send = self._direct
        if try_send is None:
            return False
        if not self.resumable:
            return bool(try_send(message))
        size = len(message)
        # (`_room_now` is the replay buffer's answer unless a subclass said otherwise: a call less per message)
        room = self.buffer.fits_now(size) if self._room_by_buffer else self._room_now(size)
        if not room or not try_send(message):
            return False
        if units < 0:
            units = size - payload_offset(message)
        # Numbered and held after the write: nothing ran in between, so it is as if held first.
        self._next_seq = self.buffer.append(message, units, size).seq + 1
        return True

    def held_after_send(self, message: bytes, units: int) -> None:
        """A data message the native front sent on the stream under this one as `try_send_data_message`
        would have (h2/front.py): numbered and held, as that does after its write."""
        self._next_seq = self.buffer.append(message, units, len(message)).seq + 1

    def _room_now(self, size: int) -> bool:
        """Whether `_room(size)` would return at once."""
        return self.buffer.fits_now(size)

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        """Report an error to the far side."""
        await self.send(pb.Frame(error=pb.Error(code=code.value[0], message=message)))

    async def recv(self) -> pb.Frame | None:
        """The peer's next frame; None at the end. A lost session gives one Error frame saying why."""
        while not self._incoming:
            if self._failure is not None:
                raise self._failure
            if self._lost is not None:
                if self._lost_reported:
                    return None
                self._lost_reported = True
                return pb.Frame(error=pb.Error(code=self._lost.code.value[0], message=self._lost.message))
            if self._ended:
                return None
            self._arrived.clear()
            self._handler_waiting = True
            try:
                await self._arrived.wait()
            finally:
                self._handler_waiting = False
        frame = self._incoming.popleft()
        units = units_of(frame)
        self._incoming_units -= units
        self._incoming_cost -= units + ENTRY_OVERHEAD
        if self.input_budget is not None:
            self.input_budget.give(self.input_user, units + ENTRY_OVERHEAD)
        self._consumed(units, frame.WhichOneof("kind"))
        if not self._room_to_take.is_set() and not self._holding_back():
            self._room_to_take.set()
        return frame

    def _consumed(self, units: int, kind: str | None) -> None:
        """The handler consumed a frame (from `recv`, or through its sink): acknowledge it in time."""
        if self.acking:
            self._acker.consumed(units, kind in TERMINAL)

    async def close(self) -> None:
        """This side sends nothing more; the stream under it stays open for acknowledgements."""
        self.local_closed = True

    def abort(self) -> None:
        """End the session at once, here and (by cancelling the stream) for the peer."""
        self._lose(SessionLost("the session was aborted", grpc.StatusCode.CANCELLED))

    # --- ending -----------------------------------------------------------------------------------

    async def finish(self, timeout: float) -> bool:
        """Wait (at most `timeout` s, across resumes) until the peer acknowledged everything, then end.

        Returns True if everything was acknowledged.
        """
        settled = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.buffer.settled and self._lost is None:
                    await self.buffer.wait_settled()
                settled = self.buffer.settled
        inner = self._inner
        if inner is not None:
            with contextlib.suppress(*BREAKS):
                await inner.close()
        self._stop()
        return settled

    # --- receiving --------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        while not self._ended:
            inner, generation = self._inner, self._generation
            if inner is None:
                if self._connected.is_set():
                    self._connected.clear()
                await self._connected.wait()
                continue
            if self._holding_back():
                self._room_to_take.clear()
                await self._room_to_take.wait()
                continue
            try:
                frame = await inner.recv()
            except asyncio.CancelledError:
                if being_cancelled():
                    raise
                # The call under us was cancelled, not this task: a failed write's `_broken` aborted
                # it while this read waited (grpc.aio's calls, and the native ones, raise so then).
                self._broken(generation, "the stream was aborted")
                continue
            except BREAKS as err:
                if not self.resumable:
                    self._failure = err  # raised to the handler as it is, as without resume
                    break
                if self._ended_cleanly():
                    break
                if isinstance(err, grpc.aio.AioRpcError) and err.code() in ENDS:
                    # The router ended the session on purpose: not a break to resume from.
                    self._lose(SessionLost(err.details() or err.code().name, err.code()))
                    break
                self._broken(generation, err)
                continue
            if frame is None:
                if self._ended_cleanly():
                    break
                self._broken(generation, "the router ended the stream")
                continue
            if generation != self._generation:
                # Read off a stream already given up (a write to it failed meanwhile): the resume
                # asks for it again from what was taken before, so taking it here would repeat it.
                continue
            handler_waiting = self._handler_waiting
            self._take(frame)
            if handler_waiting and self._incoming:
                # Let the handler deliver the frame before this task asks gRPC for the next one:
                # starting a read costs tens of microseconds, on every round trip's critical path.
                await asyncio.sleep(0)
        self._ended = True
        self._arrived.set()

    def _take(self, frame: pb.Frame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "ack":
            self.buffer.ack(frame.ack.received)
            return
        if kind in ("resume", "detach"):
            self._on_control(frame)
            return
        if kind == "half_close":
            self.remote_half_closed = True
        elif kind in ("exit_status", "error"):
            self.remote_final = True
        units = units_of(frame)
        sink = self._sink
        if sink is not None and self._handler_waiting and not self._incoming and self._lost is None and sink(frame):
            # Delivered as `recv` would have: nothing was queued before it, and the handler waits.
            self._consumed(units, kind)
            return
        cost = units + ENTRY_OVERHEAD
        full = None if self.input_budget is None else self.input_budget.take(self.input_user, cost)
        if full is None and self._incoming_cost + cost > self._incoming_limit:
            if self.input_budget is not None:
                self.input_budget.give(self.input_user, cost)
            full = "the peer sent past its replay window"
        if full is not None:
            # The peer overran what this side holds for it: its queued frames are dropped with the
            # session (a handler stuck on a command that does not read would keep them for good).
            self._incoming.clear()
            self._lose(SessionLost(full, grpc.StatusCode.RESOURCE_EXHAUSTED))
            return
        self._incoming.append(frame)
        self._incoming_units += units
        self._incoming_cost += cost
        self._arrived.set()

    def _on_control(self, frame: pb.Frame) -> None:
        """A Resume or Detach frame arrived mid-stream (a side that expects one overrides this)."""
        log.debug("ignored %s frame", frame.WhichOneof("kind"))


def _direct_sender(inner: object) -> Callable[[bytes], bool] | None:
    """What sends a data message at once on `inner` for a sender of one message per turn of the loop
    (FrameStream.direct_data_sender), else its `try_send_data_message`; None if it has neither."""
    direct = getattr(inner, "direct_data_sender", None)
    if direct is not None:
        sender: Callable[[bytes], bool] | None = direct()
        return sender
    return getattr(inner, "try_send_data_message", None)


__all__ = ["BREAKS", "ResumableStream", "SessionLost"]
