"""A session stream as the client and the agent see it: typed frames in, typed frames out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from osmo_router.wire.batching import BatchingWriter
from osmo_router.wire.codec import DATA_TAG, FRAME_TAG, SHORT_MESSAGE, encode_data_message, payload_offset
from osmo_router.wire.errors import InvalidArgument, from_status_number
from osmo_router.wire.protocol import pb

if TYPE_CHECKING:
    from osmo_router.h2.front import LaneTarget


class FrameStream:
    """Frames over one gRPC stream-stream call whose messages carry a Frame in field `frame`.

    `wrap` builds the call's request message from a Frame. Writes go through a BatchingWriter
    (wire/batching.py), which keeps one outstanding write per call as grpc.aio requires. With
    `raw=True` (a call made with framecodec's serializers) `send_data` writes pre-encoded bytes,
    skipping protobuf, and data frames queued behind a write in flight go out merged
    (`batch=False`: each is written and awaited on its own, as before issue 18).
    """

    def __init__(self, call: Any, wrap: Callable[[pb.Frame], Any], *, raw: bool = False, batch: bool = True) -> None:
        self.call = call
        self._wrap = wrap
        self._raw = raw
        self._batch = batch and raw
        # A raw call's data messages are its requests' bytes already: written with no serializer call.
        try_write = getattr(call, "try_write_serialized" if raw else "try_write", None)
        self.writer = BatchingWriter(call.write, try_write=try_write)
        self.closed_for_writing = False
        self.peer_half_closed = False
        #: The session's key, as the router's ready named it (client side; "" until then).
        self.session_key = ""
        #: The task of the agent the router chose, when the client named none and it told (its ready).
        self.chosen_task = ""
        #: The router's ready said the agent recognises resumes (SessionReady.agent_resumes; client side).
        self.agent_resumes = False
        #: The client knows the session's key though the ready never came (ResumeToken.key_from_secret).
        self.key_known = False
        #: The data listener given to the call by `set_listener` (None: none), for `open_lane`.
        self._raw_listener: Callable[[bytes], bool] | None = None

    async def send(self, frame: pb.Frame) -> None:
        """Send one frame (dropped once this side was closed)."""
        if not self.closed_for_writing:
            try:
                await self.writer.write(self._wrap(frame))
            except _FINISHED_CALL as err:
                raise await self._outcome(err) from None

    @property
    def raw(self) -> bool:
        """True if the call takes pre-encoded messages (see `send_data_message`)."""
        return self._raw

    async def send_data(self, payload: bytes) -> None:
        """Send a data frame."""
        if not self._raw:
            await self.send(pb.Frame(data=payload))
            return
        await self.send_data_message(encode_data_message(payload))

    async def send_data_message(self, message: bytes) -> None:
        """Send a message already encoded by framecodec (a data frame); only on a `raw` stream.

        Returns once the message is queued (see BatchingWriter), unless batching is off.
        """
        if self.closed_for_writing:
            return
        try:
            if self._batch:
                await self.writer.write_data(message)
            else:
                await self.writer.write(message)
        except _FINISHED_CALL as err:
            raise await self._outcome(err) from None

    async def _outcome(self, err: Exception) -> Exception:
        """What a write to a finished call stands for: the router's status for the call, if it ended
        it with one (a drain, a limit, an access revoked), else `err` ("RPC already finished").

        A write can notice the end before the reader gets the status: the session's break (and its
        resume, or its end on purpose) must be judged by the router's word, not the write's.
        """
        call = self.call
        if not call.done():
            return err
        code = await call.code()
        if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            return err
        initial, trailing = await call.initial_metadata(), await call.trailing_metadata()
        status: Exception = grpc.aio.AioRpcError(code, initial, trailing, await call.details())
        return status

    def try_send_data_message(self, message: bytes, units: int = -1) -> bool:
        """`send_data_message` if it completes at once (BatchingWriter.try_write_data); False, with
        nothing done, if it would wait or batching is off. Never raises. (`units`, the payload's size
        if known, is for a resumable stream's numbering: not needed here.)"""
        if self.closed_for_writing or not self._batch:
            return False
        return self.writer.try_write_data(message)

    def direct_data_sender(self) -> Callable[[bytes], bool] | None:
        """`try_send_data_message` for a sender that sends at most one data message per turn of the event
        loop (BatchingWriter.try_write_single: the resumable stream over this one, for its socket pump);
        None if nothing goes at once (batching off). It declines everything once `close` began."""
        return self.writer.try_write_single if self._batch else None

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        """Report an error to the far side."""
        await self.send(pb.Frame(error=pb.Error(code=code.value[0], message=message)))

    async def recv(self) -> pb.Frame | None:
        """The next frame, or None when the stream ended."""
        try:
            message = await self.call.read()
        except grpc.aio.AioRpcError as err:
            # A write that races with the peer finishing the call fails the whole call with INTERNAL
            # in grpc.aio, although everything the peer sent has arrived: after its half-close that
            # is an ordinary end of stream.
            if self.peer_half_closed and err.code() == grpc.StatusCode.INTERNAL:
                return None
            raise
        if message is grpc.aio.EOF:
            return None
        if message.WhichOneof("kind") == "end":
            # The session is over: end our side, then the router finishes the call.
            await self.close()
            return await self.recv()
        if message.WhichOneof("kind") != "frame":
            raise InvalidArgument(f"unexpected {message.WhichOneof('kind')} message after the init")
        frame: pb.Frame = message.frame
        if frame.WhichOneof("kind") == "half_close":
            self.peer_half_closed = True
        return frame

    def set_listener(
        self, listener: Callable[[pb.Frame], bool] | None, data: Callable[[memoryview], bool] | None = None
    ) -> bool:
        """Offer each frame to `listener(frame)` as it arrives, before `recv` would get it (True: taken;
        False: left for `recv`, with every later one). False if the call cannot (grpc.aio's): then
        every frame goes to `recv`. The session's end and anything but a frame always go to `recv`.

        `data`, on a raw stream whose call hands over messages undecoded: a data frame's payload goes to
        `data(payload)` instead (the same contract), with no message object built for it (issue 18).
        """
        set_listener = getattr(self.call, "set_listener", None)
        if set_listener is None:
            return False
        self._raw_listener = None
        if listener is None:
            set_listener(None)
        elif data is not None and self._raw and hasattr(self.call, "deserialize"):
            self._raw_listener = functools.partial(self._listen_raw, listener, data)
            set_listener(self._raw_listener, raw=True)
            return True
        else:
            set_listener(functools.partial(self._listen, listener))
        return True

    def open_lane(self, target: LaneTarget | None) -> None:
        """Let the native front (h2/front.py) pass this stream's data frames to `target`'s sender while the
        data listener of `set_listener` is in place (None: no longer). Nothing on a call that cannot."""
        open_lane = getattr(self.call, "open_lane", None)
        if open_lane is not None and self._raw_listener is not None:
            open_lane(self._raw_listener, target)

    def _listen_raw(
        self, listener: Callable[[pb.Frame], bool], data: Callable[[memoryview], bool], message: bytes
    ) -> bool:
        total = len(message)
        # payload_offset's first case, inline (a request's or a keystroke's message: both lengths one
        # byte; one call less per message received, issue 18); any other goes through it.
        if 4 <= total <= SHORT_MESSAGE and message[1] == total - 2 and message[3] == total - 4:
            start = 4 if message[0] == FRAME_TAG and message[2] == DATA_TAG else -1
        else:
            start = payload_offset(message)
        if start >= 0:
            return data(memoryview(message)[start:])
        try:
            decoded = self.call.deserialize(message)
        except Exception:
            return False  # `recv` meets the error again, where it is reported
        return self._listen(listener, decoded)

    def _listen(self, listener: Callable[[pb.Frame], bool], message: Any) -> bool:
        if message.WhichOneof("kind") != "frame":
            return False
        frame: pb.Frame = message.frame
        if frame.WhichOneof("kind") == "half_close":
            self.peer_half_closed = True
        return listener(frame)

    def abort(self) -> None:
        """Cancel the call: the session ends at once (the far side sees it broken, not half-closed)."""
        self.call.cancel()
        self.writer.stop(asyncio.InvalidStateError("the call was cancelled"))

    async def close(self) -> None:
        """Say this side sends nothing more (ends our half of the call), after everything queued."""
        if not self.closed_for_writing:
            self.closed_for_writing = True
            self.writer.refuse_direct()
            await self.writer.barrier(self.call.done_writing)


#: What a write to a call that is over raises (grpc.aio's and the native channel's calls alike).
_FINISHED_CALL = (asyncio.InvalidStateError, grpc.aio.UsageError)


def raise_for_error_frame(frame: pb.Frame) -> None:
    """Raise the RouterError an Error frame reports."""
    raise from_status_number(frame.error.code, frame.error.message)
