"""Running one gRPC call on the native server: find its handler, run it, send its status.

As in grpc.aio: a handler is cancelled when its client goes away (RST_STREAM or the connection
lost) or its deadline passes; `context.abort` ends it with that status; an exception it lets out
is UNKNOWN. A status that cannot go out because the client stopped reading is given
`close_grace` seconds, then the stream is reset, so nothing waits on a stalled peer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc

from osmo_router.h2 import frames as fr
from osmo_router.h2 import grpc as g
from osmo_router.h2.context import NativeContext
from osmo_router.h2.stream import Stream, StreamReset

log = logging.getLogger(__name__)


class CallDetails(NamedTuple):
    """grpc.HandlerCallDetails for GenericRpcHandler.service."""

    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


class Handlers:
    """The registered handlers: by full method path, then the generic ones in order."""

    def __init__(self) -> None:
        self.by_path: dict[str, grpc.RpcMethodHandler] = {}
        self.generic: list[grpc.GenericRpcHandler] = []

    def lookup(self, path: str, metadata: tuple[tuple[str, str | bytes], ...]) -> grpc.RpcMethodHandler | None:
        """The handler of `path`, or None (UNIMPLEMENTED)."""
        handler = self.by_path.get(path)
        if handler is not None:
            return handler
        details = CallDetails(path, metadata)
        for generic in self.generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None


def refuse(stream: Stream, code: int, message: str) -> None:
    """A trailers-only response, then a reset if the client is still sending."""
    stream.send_headers(g.status_trailers(code, message, headers=True), end_stream=True)
    if not stream.ended_in:
        stream.reset(fr.ErrorCode.NO_ERROR)


class Call:
    """One call in progress: its stream, context and handler task."""

    def __init__(
        self,
        stream: Stream,
        handler: grpc.RpcMethodHandler,
        deadline: float | None,
        auth: Mapping[str, Iterable[bytes]],
        close_grace: float,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.context = NativeContext(stream, handler.request_deserializer, handler.response_serializer, deadline, auth)
        self.close_grace = close_grace
        self.deadline_hit = False
        #: The handler is over and its status is going out (bounded by close_grace): a server stop lets it.
        self.finishing = False
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._run())
        stream.add_close_callback(self._stream_closed)
        self._timer = (
            asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), self._deadline)
            if deadline is not None
            else None
        )

    def _stream_closed(self, _future: object) -> None:
        if self.stream.reset_code is not None and not self.task.done():
            self.context.cancelled_by_peer = True
            self.task.cancel()
            # The RPC is over now (as in grpc.aio): done callbacks run before the handler unwinds, so
            # what they undo is undone before any other peer can act on the news.
            self.context.finish()

    def _deadline(self) -> None:
        if not self.task.done():
            self.deadline_hit = True
            self.task.cancel()

    def cancel(self) -> None:
        """Cancel the handler (server stop); a status already going out behind its data is left to go out
        (a client reading it gets it; one that does not is reset after close_grace seconds)."""
        if not self.task.done() and not self.finishing:
            self.task.cancel()

    async def _run(self) -> None:
        context, stream = self.context, self.stream
        try:
            await self._invoke()
            code, details, trailing = context.status()
        except grpc.aio.AbortError:
            code, details, trailing = context.status()
        except asyncio.CancelledError:
            if self.deadline_hit:
                code, details, trailing = g.DEADLINE_EXCEEDED, "Deadline Exceeded", ()
            elif context.cancelled_by_peer or stream.reset_code is not None:
                context.finish()
                return
            else:
                code, details, trailing = g.UNAVAILABLE, "server shutting down", ()
        except StreamReset:
            context.finish()
            return
        except Exception as err:
            log.exception("unexpected error in the handler of %s", dict(stream.headers or ()).get(":path"))
            code, details, trailing = g.UNKNOWN, f"Unexpected error in RPC handler: {type(err).__name__}", ()
        finally:
            if self._timer is not None:
                self._timer.cancel()
        self.finishing = True
        try:
            await self._send_status(code, details, trailing)
        finally:
            context.finish()

    async def _invoke(self) -> None:
        handler, context = self.handler, self.context
        if handler.request_streaming:
            request: Any = context.requests()
        else:
            request = await context.read()
            if request is grpc.aio.EOF:
                await context.abort(grpc.StatusCode.INTERNAL, "the client sent no request")
        behaviour: Callable[..., Any] | None = _behaviour(handler)
        if behaviour is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no behaviour for this method")
            return
        result = behaviour(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                await context.write(response)
            return
        if inspect.isawaitable(result):
            result = await result
        if not handler.response_streaming and result is not None and context.code() == grpc.StatusCode.OK:
            await context.write(result)

    async def _send_status(self, code: int, details: str, trailing: Sequence[tuple[str, str | bytes]]) -> None:
        stream = self.stream
        if stream.reset_code is not None or stream.closed_out:
            return
        if not stream.headers_sent:
            stream.send_headers(g.status_trailers(code, details, headers=True, metadata=trailing), end_stream=True)
        else:
            stream.end(g.status_trailers(code, details, metadata=trailing))
            if stream.unsent:
                try:
                    async with asyncio.timeout(self.close_grace):
                        await stream.drained()
                except TimeoutError:
                    # The client stopped reading: reset rather than hold its data and the handler.
                    log.info(
                        "stream %d reset: its peer did not read for %gs after the call ended (%d bytes dropped)",
                        stream.id,
                        self.close_grace,
                        stream.unsent,
                        extra={"fields": {"event": "stream_reset", "unsent_bytes": stream.unsent}},
                    )
                    stream.reset(fr.ErrorCode.CANCEL)
                    return
                except StreamReset:
                    return
        if not stream.ended_in and stream.reset_code is None:
            stream.reset(fr.ErrorCode.NO_ERROR)  # the call is over; the client need send no more


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any] | None:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream  # type: ignore[no-any-return]
    if handler.request_streaming:
        return handler.stream_unary  # type: ignore[no-any-return]
    if handler.response_streaming:
        return handler.unary_stream  # type: ignore[no-any-return]
    return handler.unary_unary  # type: ignore[no-any-return]
