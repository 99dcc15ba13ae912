"""A session stream as the client and the agent see it: typed frames in, typed frames out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from osmo_router.wire.codec import encode_data_message
from osmo_router.wire.errors import InvalidArgument, from_status_number
from osmo_router.wire.protocol import pb


class FrameStream:
    """Frames over one gRPC stream-stream call whose messages carry a Frame in field `frame`.

    `wrap` builds the call's request message from a Frame. Writes are serialised by a lock
    because grpc.aio allows one outstanding write per call. With `raw=True` (a call made with
    framecodec's serializers) `send_data` writes pre-encoded bytes, skipping protobuf.
    """

    def __init__(self, call: Any, wrap: Callable[[pb.Frame], Any], *, raw: bool = False) -> None:
        self.call = call
        self._wrap = wrap
        self._raw = raw
        self._write_lock = asyncio.Lock()
        self.closed_for_writing = False
        self.peer_half_closed = False
        #: The session's key, as the router's ready named it (client side; "" until then).
        self.session_key = ""

    async def send(self, frame: pb.Frame) -> None:
        """Send one frame (dropped once this side was closed)."""
        async with self._write_lock:
            if not self.closed_for_writing:
                await self.call.write(self._wrap(frame))

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
        """Send a message already encoded by framecodec (a data frame); only on a `raw` stream."""
        async with self._write_lock:
            if not self.closed_for_writing:
                await self.call.write(message)

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

    def abort(self) -> None:
        """Cancel the call: the session ends at once (the far side sees it broken, not half-closed)."""
        self.call.cancel()

    async def close(self) -> None:
        """Say this side sends nothing more (ends our half of the call)."""
        async with self._write_lock:
            if not self.closed_for_writing:
                self.closed_for_writing = True
                await self.call.done_writing()


def raise_for_error_frame(frame: pb.Frame) -> None:
    """Raise the RouterError an Error frame reports."""
    raise from_status_number(frame.error.code, frame.error.message)
