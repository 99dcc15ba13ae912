"""Client-side gRPC calls on the h2 core, with the grpc.aio call API the client and the agent use.

A call object is made at once (as grpc.aio's are) and opens its HTTP/2 stream in the background;
`write`, `read`, `done_writing`, `cancel`, `code()`, `details()`, `initial_metadata()`,
`trailing_metadata()`, `wait_for_connection()`, async iteration and (unary responses) `await`
behave as grpc.aio's: `read` gives `grpc.aio.EOF` at a clean end and raises a real
`grpc.aio.AioRpcError` for any other status, so the existing error handling works unchanged.
Messages go straight from the connection's `data_received` to the reader: no thread, no
completion queue, no extra task per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from osmo_router.h2 import frames as fr
from osmo_router.h2.call_status import FINISHED, HALF_CLOSED, CallStatus, aio_error
from osmo_router.h2.stream import Stream, StreamReset

if TYPE_CHECKING:
    from osmo_router.h2.front import LaneTarget

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]
Opener = Callable[[], Awaitable[Stream]]


def _identity(value: Any) -> Any:
    return value


class Call(CallStatus, grpc.aio.StreamStreamCall):  # type: ignore[misc]
    """One call of any cardinality (the subclasses add what theirs needs); its end and status: CallStatus."""

    def __init__(
        self, opener: Opener, serializer: Serializer | None, deserializer: Deserializer | None, timeout: float | None
    ) -> None:
        loop = asyncio.get_running_loop()
        self._serialize = serializer or _identity
        self._deserialize = deserializer or _identity
        self._stream: Stream | None = None
        self._buffer: deque[bytes] = deque()  # messages taken off the stream by code()/details() waiting for the end
        self._read_lock = asyncio.Lock()
        self._locally_cancelled = False
        self._half_closed = False
        self._status: tuple[grpc.StatusCode, str] | None = None
        self._trailing: grpc.aio.Metadata = grpc.aio.Metadata()
        self._done: asyncio.Future[None] = loop.create_future()
        self._callbacks: list[Callable[[Any], None]] = []
        self._listener: Callable[[Any], bool] | None = None
        self._listen_raw = False  # the listener takes the messages' bytes (set_listener)
        self._lane: tuple[Callable[[bytes], bool], LaneTarget] | None = None  # see open_lane
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timer = None if timeout is None else loop.call_later(max(timeout, 0.0), self._expire)
        self._opening = asyncio.ensure_future(self._open(opener))

    async def _open(self, opener: Opener) -> Stream | None:
        try:
            stream = await opener()
        except grpc.aio.AioRpcError as err:
            self._finish(err.code(), err.details() or "")
            return None
        except Exception as err:  # never an unretrieved task error: the call carries it
            self._finish(grpc.StatusCode.UNAVAILABLE, f"cannot open the stream: {err}")
            return None
        if self._status is not None:  # cancelled or expired while the stream opened
            stream.reset(fr.ErrorCode.CANCEL)
            return None
        self._stream = stream
        if self._listener is not None:
            stream.set_listener(self._stream_listener())
        if self._lane is not None:
            stream.conn.open_lane(stream, *self._lane)
        # The status is known once the stream closes, read or not (grpc.aio's calls end without reads).
        stream.add_close_callback(lambda _future: self._on_closed(stream))
        return stream

    def _on_closed(self, stream: Stream) -> None:
        if self._status is not None:
            return
        if stream.trailers is not None:
            self._finish_from(stream)  # messages not read yet stay on the stream for `read`
        elif stream.reset_code is not None:
            self._finish_reset(stream.reset_code)

    async def _started(self) -> Stream:
        stream = self._stream or await asyncio.shield(self._opening)
        if stream is None:
            raise self._error()
        return stream

    async def wait_for_connection(self) -> None:
        """Until the stream is open (raises the call's error if it could not be)."""
        await self._started()

    async def _until_done(self) -> None:
        """Wait for the end, taking the remaining messages off the stream (kept for `read`) to see it."""
        while self._status is None:
            stream = self._stream or await asyncio.shield(self._opening)
            if stream is None:
                return  # the stream could not be opened: _open set the status
            async with self._read_lock:  # never two reads of the stream at once
                if self._status is None:
                    message = await self._read_stream(stream)
                    if message is not None:
                        self._buffer.append(message)
                        self._relisten()  # (no listener while this waits for `read`: see _stream_listener)

    async def _read_stream(self, stream: Stream) -> bytes | None:
        """The next message off the stream, or None once the call ended (its status set)."""
        try:
            message = await stream.read()
        except StreamReset as err:
            self._finish_at_reset(stream, err.code)
            return None
        if message is None:
            self._finish_from(stream)
        return message

    def _finish_at_reset(self, stream: Stream | None, code: int) -> None:
        """The stream was reset (or its connection lost): the status of the trailers that came before,
        if they did (a router's drain ends the call, then the router exits), else the reset's."""
        if stream is not None and stream.ended_in and stream.trailers is not None:
            self._finish_from(stream)
        else:
            self._finish_reset(code)

    # -- messages --------------------------------------------------------------------------------

    def set_listener(self, listener: Callable[[Any], bool] | None, raw: bool = False) -> None:
        """Offer each response to `listener(response)` as it arrives, before `read` would get it: True
        means it took it, False leaves it (and every later one) for `read`. Only while no response
        waits for `read` and the call has no status (h2.Stream.set_listener; must not raise or wait).
        `raw`: the listener gets the message's bytes, not deserialised (it may use `deserialize`)."""
        self._listener = listener
        self._listen_raw = raw
        if self._stream is not None:
            self._stream.set_listener(self._stream_listener())

    def open_lane(self, listener: Callable[[bytes], bool], target: LaneTarget | None) -> None:
        """Let the connection's native front pass data messages to `target` while the raw `listener` is the
        stream's (h2/front.py; None: no longer), now or once the stream is open."""
        self._lane = None if target is None else (listener, target)
        if self._stream is not None:
            self._stream.conn.open_lane(self._stream, listener, target)

    def _stream_listener(self) -> Callable[[bytes], bool] | None:
        """What the stream offers its messages to: nothing while a message taken off it waits in
        `_buffer` or once the call has its status (then they wait for `read`, in order); a raw
        listener itself, with no call of ours per message (issue 18: `_relisten` keeps this current)."""
        if self._listener is None or self._buffer or self._status is not None:
            return None
        return self._listener if self._listen_raw else self._listen

    def _relisten(self) -> None:
        """The buffer or the status changed: give the stream the listener that fits now."""
        if self._stream is not None and self._listener is not None:
            self._stream.set_listener(self._stream_listener())

    def _finish(self, code: grpc.StatusCode, details: str, trailing: Any = None) -> None:
        super()._finish(code, details, trailing)
        self._relisten()

    @property
    def deserialize(self) -> Deserializer:
        """The call's response deserializer (for a raw listener's messages)."""
        return self._deserialize

    def _listen(self, message: bytes) -> bool:
        listener = self._listener
        if listener is None or self._buffer or self._status is not None:
            return False
        try:
            response = self._deserialize(message)
        except Exception:
            return False  # `read` meets the error again, where it is reported
        return listener(response)

    async def read(self) -> Any:
        """The next response; grpc.aio.EOF at a clean end; AioRpcError for any other status.

        As in grpc.aio: a call cancelled here raises CancelledError, and a read that is cancelled
        cancels the call.
        """
        stream = self._stream
        if stream is not None and self._status is None and not self._buffer and stream.more_queued():
            message = None if self._read_lock.locked() else stream.read_nowait()
            if message is not None:
                # At hand, nobody else reading: nothing here waits, so no lock is needed (issue 18).
                return self._deserialize(message)
        try:
            async with self._read_lock:
                if self._buffer:
                    message = self._buffer.popleft()
                    if not self._buffer:
                        self._relisten()
                    return self._deserialize(message)
                stream = self._stream
                if self._status is not None and not self._locally_cancelled and stream and stream.has_message():
                    with contextlib.suppress(StreamReset):  # the end came before these were read
                        message = stream.read_nowait()
                        if message is not None:
                            return self._deserialize(message)
                if self._status is None:
                    stream = await self._started()
                    message = await self._read_stream(stream)
                    if message is not None:
                        return self._deserialize(message)
        except asyncio.CancelledError:
            self.cancel()
            raise
        self._raise_for_status()
        return grpc.aio.EOF

    def _raise_for_status(self) -> None:
        assert self._status is not None
        if self._locally_cancelled:
            raise asyncio.CancelledError()
        if self._status[0] != grpc.StatusCode.OK:
            raise self._error()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not grpc.aio.EOF:
            yield message

    async def write(self, request: Any) -> None:
        """Send one request; returns once it went to the transport (the peer's windows allowing)."""
        if self._status is not None:
            raise asyncio.InvalidStateError(FINISHED)
        if self._half_closed:
            raise asyncio.InvalidStateError(HALF_CLOSED)
        try:
            stream = await self._started()
            if stream.ended_in and stream.trailers is not None:
                # The server already ended the call (its last messages may still wait for `read`).
                # Its status is set before this raises, as a finished grpc.aio call's is: the caller
                # judges the end by the server's word (a drain), not by this error. No wait on the
                # peer: what came before the trailers is all here, and is kept for `read`.
                await self._until_done()
                raise asyncio.InvalidStateError(FINISHED)
            await stream.write(self._serialize(request))
        except StreamReset as err:
            # (a write waiting on a window is woken by the reset before the stream's close callback runs)
            self._finish_at_reset(self._stream, err.code)
            self._raise_for_status()
        except asyncio.CancelledError:
            self.cancel()
            raise

    def try_write(self, request: Any) -> bool:
        """Send one request at once if it can all go to the transport now (the stream open, nothing
        queued on it, the windows open); False with nothing sent otherwise (then use `write`)."""
        return self.try_write_serialized(self._serialize(request))

    def try_write_serialized(self, message: bytes) -> bool:
        """`try_write` of a request already serialised (a raw call's pre-encoded data message: no
        serializer call per message, issue 18)."""
        stream = self._stream
        if stream is None or self._status is not None or self._half_closed or stream.ended_in:
            return False
        return stream.try_write(message)

    async def done_writing(self) -> None:
        """End the requests (END_STREAM after what is queued)."""
        if self._half_closed or self._status is not None:
            return
        self._half_closed = True
        stream = await self._started()
        stream.end()

    async def _write_all(self, requests: AsyncIterable[Any] | Iterable[Any]) -> None:
        """Send a request iterator, then end the requests (a request_iterator given to the call)."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    await self.write(request)
            else:
                for request in requests:
                    await self.write(request)
            await self.done_writing()

    async def _single_response(self) -> Any:
        """The one response of a unary-response call (AioRpcError unless it ended OK with exactly one)."""
        response = await self.read()
        if response is grpc.aio.EOF:
            raise aio_error(grpc.StatusCode.INTERNAL, "the server sent no response")
        if await self.read() is not grpc.aio.EOF:
            raise aio_error(grpc.StatusCode.INTERNAL, "the server sent more than one response")
        return response


class UnaryResponseCall(Call, grpc.aio.UnaryUnaryCall, grpc.aio.StreamUnaryCall):  # type: ignore[misc]
    """A unary-unary or stream-unary call: awaiting it gives the response."""

    def __await__(self) -> Generator[Any, None, Any]:
        return self._single_response().__await__()


def start_requests(call: Call, requests: AsyncIterable[Any] | Iterable[Any] | None) -> None:
    """Send `requests` (then the end) in the background, as grpc.aio does with a request iterator."""
    if requests is None:
        return
    task = asyncio.ensure_future(call._write_all(requests))
    call.add_done_callback(lambda _call: _cancel(task))


def _cancel(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()


__all__ = ["Call", "UnaryResponseCall", "aio_error", "start_requests"]
