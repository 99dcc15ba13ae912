"""Opening a session from the client: send the init, wait for the router's ready."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.dial.config import DialConfig
from osmo_router.dial.errors import explain_dial_error
from osmo_router.wire.errors import DeadlineExceeded, RouterError, Unavailable, from_status
from osmo_router.wire.protocol import pb
from osmo_router.wire.streams import FrameStream


def rpc_error(err: grpc.aio.AioRpcError, dial: DialConfig | None = None) -> RouterError:
    """The RouterError for a failed call (a connection failure explained in plain words when `dial` is given)."""
    if err.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (err.debug_error_string() or ""):
        # grpc.aio replaces the real status with INTERNAL when one of our writes meets a call the
        # router has just ended (it only ends calls early when the session broke).
        return Unavailable("the session broke while sending (the router ended it: agent or router gone)")
    details = err.details() or err.code().name.lower()
    if dial is not None and err.code() == grpc.StatusCode.UNAVAILABLE:
        details = explain_dial_error(details, dial) or details
    return from_status(err.code(), details)


async def start_session(
    config: ClientConfig, method: Any, request_type: Any, init: Any, *, raw: bool = False
) -> FrameStream:
    """Start a stream with its init, without waiting for the agent (then `wait_ready`).

    Frames may be sent before the ready arrives: the router takes them once the session is paired,
    which saves a round trip when a connection opens. `raw`: the call was made with framecodec's
    serializers (see FrameStream).
    """
    call = method(metadata=config.dial.metadata())
    try:
        await call.write(request_type(init=init))
    except grpc.aio.AioRpcError as err:
        raise rpc_error(err, config.dial) from None
    return FrameStream(call, lambda frame: request_type(frame=frame), raw=raw)


async def wait_ready(config: ClientConfig, stream: FrameStream) -> None:
    """Wait for the router's ready (the agent joined); raises RouterError on refusal."""
    call = stream.call
    try:
        async with asyncio.timeout(config.connect_timeout + 60.0):
            first = await call.read()
    except grpc.aio.AioRpcError as err:
        raise rpc_error(err, config.dial) from None
    except TimeoutError:
        call.cancel()
        raise DeadlineExceeded("the router did not answer") from None
    if first is grpc.aio.EOF:
        code = await call.code()
        raise (
            from_status(code, await call.details() or "the router ended the stream")
            if code != grpc.StatusCode.OK
            else Unavailable("the router ended the stream before the session started")
        )
    if first.WhichOneof("kind") != "ready":
        call.cancel()
        raise RouterError("the router sent something other than ready")


async def open_session(
    config: ClientConfig, method: Any, request_type: Any, init: Any, *, raw: bool = False
) -> FrameStream:
    """Start a stream with its init and wait until the agent joined; raises RouterError on refusal."""
    stream = await start_session(config, method, request_type, init, raw=raw)
    await wait_ready(config, stream)
    return stream


__all__ = ["open_session", "pb", "rpc_error", "start_session", "wait_ready"]
