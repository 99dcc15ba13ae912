"""A created session's control channel over gRPC: the new CLI's `--legacy-backend` forward and rsync.

The new CLI speaks OSMO's control channel on its control session (client/legacy.py): one data frame
per announced connection, `{"key", "cookie"}`. For a key an orchestrator created, the router is that
channel's far end over gRPC as on the WebSocket port (ws/created.py): it sends the ready, records each
announced connection key (the session's backend, osmo-ctrl or our WebSocket agent, is told about it
by `serve_control_backend`), and ends the call when the client ends its side or the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from osmo_router.router.core.created import CreatedSession, CreatedSessions
from osmo_router.router.grpc.calls import ServicerContext, abort
from osmo_router.wire.errors import InvalidArgument, RouterError
from osmo_router.wire.protocol import pb


def _frame(message: bytes) -> pb.Frame | None:
    """The frame of a client message after its init (InvalidArgument for anything else)."""
    try:
        request = pb.PortForwardRequest.FromString(message)
    except DecodeError as err:
        raise InvalidArgument(f"malformed message on the control session: {err}") from None
    if request.WhichOneof("kind") != "frame":
        raise InvalidArgument("a second init on the control session")
    return request.frame


async def _next(context: ServicerContext, created: CreatedSession) -> Any:
    """The client's next message, or None once the created session ended first."""
    read = asyncio.ensure_future(context.read())
    ended = asyncio.ensure_future(created.ended.wait())
    try:
        await asyncio.wait((read, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
    if read.done():
        return read.result()
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await read
    return None


async def serve_grpc_control_channel(context: ServicerContext, created: CreatedSession, store: CreatedSessions) -> None:
    """Serve the control channel until the client half-closes, the call ends or the session ends."""
    try:
        store.attach_client(created)
    except RouterError as err:
        await abort(context, err.code, err.message)
        return
    try:
        await context.write(pb.PortForwardResponse(ready=pb.SessionReady(session_key=created.key)).SerializeToString())
        while True:
            message = await _next(context, created)
            if message is None or message is grpc.aio.EOF:
                return
            frame = _frame(message)
            if frame is not None and frame.WhichOneof("kind") == "half_close":
                return
            if frame is not None and frame.WhichOneof("kind") == "data":
                store.announce(created, frame.data)
    except RouterError as err:
        await abort(context, err.code, err.message)
    finally:
        store.detach_client(created)
