"""Adapters from gRPC server contexts to the relay's Endpoint interface, and init reading."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.wire.errors import DeadlineExceeded, InvalidArgument, Unauthenticated
from osmo_router.wire.protocol import INIT_TAG


class ContextEndpoint:
    """A server-side stream of encoded messages (the handler was registered without (de)serializers)."""

    __slots__ = ("_context",)

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def read(self) -> bytes | None:
        """The next encoded message, or None once the peer half-closed."""
        message = await self._context.read()
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, bytes)
        return message

    async def write(self, message: bytes) -> None:
        """Send one encoded message."""
        await self._context.write(message)


#: How long sending an error status may wait behind unread data before the handler gives up on it.
ABORT_TIMEOUT = 1.0


async def abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> None:
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


async def authenticate_call(auth: Authenticator, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
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


async def read_init(context: grpc.aio.ServicerContext[Any, Any], timeout: float) -> bytes:
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
