"""gRPC server calls as pipeline Sides, and what every gRPC entry point does first: authenticate, read the init."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.router.core.budget import ByteBudget
from osmo_router.wire.codec import INIT_TAG
from osmo_router.wire.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    RouterError,
    Unauthenticated,
    Unavailable,
)

_EOF = grpc.aio.EOF
ServicerContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def peer_of(context: ServicerContext) -> str:
    """The peer address of a call, as gRPC reports it."""
    try:
        return str(context.peer())
    except Exception:
        return "unknown"


class GrpcSide:
    """A server-side gRPC stream as a pipeline Side (handlers registered without (de)serializers).

    `first_read` is a read already started (a parked standby stream's): it is taken over, never
    cancelled. A transport failure under a read or write (the call was torn down) is raised as
    the RouterError of a side that went away.
    """

    __slots__ = (
        "_context",
        "_first",
        "_is_client",
        "merge_frames",
        "more_queued",
        "peer",
        "set_listener",
        "set_passthrough",
        "try_write",
        "try_write_framed",
        "use_budgets",
    )
    transport = "grpc"

    def __init__(
        self,
        context: ServicerContext,
        *,
        is_client: bool,
        first_read: asyncio.Future[Any] | None = None,
        merge_frames: bool = True,
    ) -> None:
        self._context = context
        self._is_client = is_client
        self._first = first_read
        self.merge_frames = merge_frames
        self.peer = peer_of(context)
        #: `try_write(message) -> bool`: send at once without waiting, if the transport allows it
        #: (the native server's calls); None where every write must go through `write` (grpc.aio).
        self.try_write: Callable[[bytes], bool] | None = getattr(context, "try_write", None)
        #: `more_queued() -> bool`: another message has arrived already (None where it is not known).
        self.more_queued: Callable[[], bool] | None = getattr(context, "more_queued", None)
        #: `use_budgets(budgets)`: count the stream's receive buffer and window in the session's byte
        #: budgets (the native server's calls: Stream.use_budgets); None where gRPC holds them (grpc.aio).
        self.use_budgets: Callable[[tuple[ByteBudget, ...]], None] | None = getattr(context, "use_budgets", None)
        #: `set_listener(listener)`: offer each message to `listener(message) -> bool` as it arrives,
        #: before `read` (the native server's calls: NativeContext.set_listener); None where not (grpc.aio).
        self.set_listener: Callable[[Callable[[bytes], bool] | None], None] | None = getattr(
            context, "set_listener", None
        )
        #: `set_passthrough(passthrough)` and `try_write_framed(framed)`: the same hand-over for a message
        #: still behind its gRPC prefix, as received, sent on as it is (NativeContext); None where not.
        self.set_passthrough: Callable[[Callable[[memoryview], bool] | None], None] | None = getattr(
            context, "set_passthrough", None
        )
        # (NativeContext.framed_writer: its stream's own method, one call layer less per message)
        framed_writer = getattr(context, "framed_writer", None)
        self.try_write_framed: Callable[[memoryview], bool] | None = (
            framed_writer() if framed_writer is not None else getattr(context, "try_write_framed", None)
        )

    async def read(self) -> bytes | None:
        """The next encoded message, or None once the peer half-closed."""
        first, self._first = self._first, None
        try:
            message = await (first if first is not None else self._context.read())
        except RouterError:
            raise
        except Exception as err:
            raise self._gone(err) from None
        if message is _EOF:
            return None
        return message  # type: ignore[no-any-return]  # bytes: registered without deserializers

    async def write(self, message: bytes) -> None:
        """Send one encoded message."""
        try:
            await self._context.write(message)
        except RouterError:
            raise
        except Exception as err:
            raise self._gone(err) from None

    def watch_gone(self, budgets: tuple[ByteBudget, ...] = ()) -> None:
        """None: a call whose peer leaves cancels its handler, pending or not (and it keeps nothing)."""
        return None

    async def accept(self) -> None:
        """Nothing to do: a gRPC stream is accepted once its handler runs."""

    async def send_first(self, message: bytes) -> None:
        """The ready or SessionOpen goes out as it is."""
        await self.write(message)

    async def refuse(self, error: RouterError) -> None:
        """End the call with the error's status."""
        await abort(self._context, error.code, error.message)

    async def finish(self) -> None:
        """Nothing to do: the call ends with status OK when its handler returns."""

    def _gone(self, err: Exception) -> RouterError:
        if self._is_client:
            return Cancelled(f"the client's stream broke ({type(err).__name__})")
        return Unavailable(f"the agent disconnected ({type(err).__name__})")


#: How long sending an error status may wait behind unread data before the handler gives up on it.
ABORT_TIMEOUT = 1.0


async def abort(context: ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with an error status without waiting on a peer that stopped reading.

    The status goes out behind the data already queued on the stream, so on a stalled stream
    `context.abort` would wait for the reader forever; past ABORT_TIMEOUT the status stays queued
    (the peer sees it once it reads again) and the handler returns.
    """
    try:
        async with asyncio.timeout(ABORT_TIMEOUT):
            await context.abort(code, message)
    except TimeoutError:
        return


#: How long a refused caller's first message is awaited before the refusal goes out.
REFUSAL_GRACE = 1.0


async def authenticate_call(auth: Authenticator, context: ServicerContext) -> Identity:
    """The caller's identity; on refusal, its first message is let in (briefly) before Unauthenticated is raised.

    A status sent while the caller's first write is still in flight fails that call with INTERNAL
    in grpc.aio, so the caller would never see the reason. A silent caller waits REFUSAL_GRACE only.
    """
    try:
        return await auth.authenticate(context.invocation_metadata() or ())
    except Unauthenticated:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(REFUSAL_GRACE):
                await context.read()
        raise


async def read_init(context: ServicerContext, timeout: float) -> bytes:
    """The encoded init message that must open every stream, within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            message = await context.read()
    except TimeoutError:
        raise DeadlineExceeded(f"no init message within {timeout:g}s") from None
    if message is grpc.aio.EOF:
        raise InvalidArgument("stream ended before its init message")
    assert isinstance(message, bytes)
    if not message or message[0] != INIT_TAG:
        raise InvalidArgument("the first message of a stream must be its init")
    return message
