"""How a client call ends and says so: its status, metadata and the grpc.aio RpcContext methods.

`CallStatus` is the part of h2/client_calls.py's `Call` that sets the status once (the trailers, a
reset, a deadline, a local cancel) and answers `code()`, `details()`, `cancelled()`, `done()` and the
metadata, as grpc.aio's calls do. The messages (`read`, `write`, the listener) stay in `Call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import grpc

from osmo_router.h2 import frames as fr
from osmo_router.h2.grpc import metadata_of, status_of
from osmo_router.h2.stream import Stream, StreamReset

#: The status of a call whose stream was reset, by RST_STREAM code (-1: the connection was lost).
_RESET_STATUS = {
    fr.ErrorCode.CANCEL: (grpc.StatusCode.CANCELLED, "Received RST_STREAM: cancelled"),
    fr.ErrorCode.REFUSED_STREAM: (grpc.StatusCode.UNAVAILABLE, "Stream refused by the server (GOAWAY)"),
    fr.ErrorCode.ENHANCE_YOUR_CALM: (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received RST_STREAM: enhance your calm"),
    -1: (grpc.StatusCode.UNAVAILABLE, "Socket closed"),
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: grpc.aio's words for a write after the end of writing or after the call finished.
HALF_CLOSED = "RPC is half closed after calling done_writing"
FINISHED = "RPC already finished."


def aio_error(code: grpc.StatusCode, details: str, initial: Any = None, trailing: Any = None) -> grpc.aio.AioRpcError:
    """A grpc.aio.AioRpcError as grpc.aio raises it (metadata objects included)."""
    return grpc.aio.AioRpcError(
        code, initial or grpc.aio.Metadata(), trailing or grpc.aio.Metadata(), details=details, debug_error_string=""
    )


class CallStatus:
    """A call's end: its status, set once, and what grpc.aio's calls tell about it (a part of Call)."""

    _stream: Stream | None
    _opening: asyncio.Future[Stream | None]
    _locally_cancelled: bool
    _status: tuple[grpc.StatusCode, str] | None
    _trailing: grpc.aio.Metadata
    _done: asyncio.Future[None]
    _callbacks: list[Callable[[Any], None]]
    _deadline: float | None
    _timer: asyncio.TimerHandle | None

    async def _until_done(self) -> None:
        raise NotImplementedError

    # -- status -----------------------------------------------------------------------------------

    def _finish(self, code: grpc.StatusCode, details: str, trailing: Any = None) -> None:
        if self._status is not None:
            return
        self._status = (code, details)
        if trailing is not None:
            self._trailing = trailing
        if self._timer is not None:
            self._timer.cancel()
        self._done.set_result(None)
        for callback in self._callbacks:
            callback(self)
        self._callbacks.clear()

    def _finish_from(self, stream: Stream) -> None:
        """The peer ended the stream: its trailers say how the call ended."""
        if self._status is not None:
            return
        code, details = status_of(stream.trailers)
        if stream.trailers is None:
            details = "the server ended the stream without trailers"
        trailing = grpc.aio.Metadata(*(item for item in metadata_of(stream.trailers or ()) if item[0][:5] != "grpc-"))
        self._finish(_CODES.get(code, grpc.StatusCode.UNKNOWN), details, trailing)
        if not stream.closed_out:
            stream.reset(fr.ErrorCode.NO_ERROR)  # the call is over: our side too (what is unsent is dropped)

    def _finish_reset(self, code: int) -> None:
        status, details = _RESET_STATUS.get(
            code, (grpc.StatusCode.INTERNAL, f"Received RST_STREAM with error code {code}")
        )
        self._finish(status, details)

    def _error(self) -> grpc.aio.AioRpcError:
        assert self._status is not None
        return aio_error(self._status[0], self._status[1], self._initial_now(), self._trailing)

    def _initial_now(self) -> grpc.aio.Metadata:
        headers = self._stream.headers if self._stream is not None else None
        return grpc.aio.Metadata(*metadata_of(headers or ()))

    def _expire(self) -> None:
        if self._stream is not None:
            self._stream.reset(fr.ErrorCode.CANCEL)
        self._finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    # -- RpcContext and Call -------------------------------------------------------------------------

    def cancelled(self) -> bool:
        """True if the call ended CANCELLED."""
        return self._status is not None and self._status[0] == grpc.StatusCode.CANCELLED

    def done(self) -> bool:
        """True once the call has its status."""
        return self._status is not None

    def time_remaining(self) -> float | None:
        """Seconds to the deadline (None without one)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def cancel(self) -> bool:
        """End the call at once (RST_STREAM CANCEL); False if it had already ended."""
        if self._status is not None:
            return False
        self._locally_cancelled = True
        stream = self._stream
        if stream is not None and not (stream.closed_out and not stream.ended_in):
            stream.reset(fr.ErrorCode.CANCEL)
        # else: our END_STREAM went out and the server has not ended yet. A reset now would make it
        # drop what it received and has not read (a Detach frame right before the end, say); it ends
        # the call itself after our end, and its answer is ignored here.
        self._finish(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(call)` once the call ended (at once if it has)."""
        if self._status is not None:
            callback(self)
        else:
            self._callbacks.append(callback)

    async def initial_metadata(self) -> grpc.aio.Metadata:
        """The response headers' metadata (empty if the call ended without them)."""
        stream = self._stream or await asyncio.shield(self._opening)
        if stream is None:
            return grpc.aio.Metadata()
        with contextlib.suppress(StreamReset):
            await stream.response_headers()
        return self._initial_now()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        """The trailers' metadata, once the call ended."""
        await self._until_done()
        return self._trailing

    async def code(self) -> grpc.StatusCode:
        """The status code, once the call ended."""
        await self._until_done()
        assert self._status is not None
        return self._status[0]

    async def details(self) -> str:
        """The status message, once the call ended."""
        await self._until_done()
        assert self._status is not None
        return self._status[1]


__all__ = ["FINISHED", "HALF_CLOSED", "CallStatus", "aio_error"]
