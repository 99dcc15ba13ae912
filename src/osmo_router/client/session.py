"""Opening a session from the client: send the init, wait for the router's ready."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.client.stall import METER, MIN_STALL
from osmo_router.dial.config import DialConfig
from osmo_router.dial.errors import Peer, explain_dial_error, needs_probe, probe_peer
from osmo_router.wire.errors import DeadlineExceeded, ResourceExhausted, RouterError, Unavailable, from_status
from osmo_router.wire.protocol import pb
from osmo_router.wire.streams import FrameStream


def rpc_error(
    err: grpc.aio.AioRpcError, dial: DialConfig | None = None, peer: Peer | None = None, stalled: float = 0.0
) -> RouterError:
    """The RouterError for a failed call (a connection failure explained in plain words when `dial` is given).

    `peer`: what a probe of the router found (see `rpc_failure`, which makes it when it matters).
    `stalled`: how long the caller's own delivery stalled (a forwarded connection's local reader),
    added to the process's stalls (osmo_router.client.stall).
    """
    if _status_lost(err):
        # grpc.aio replaces the real status with INTERNAL when one of our writes meets a call the
        # router has just ended, and the router's native server resets a stream (RST_STREAM CANCEL)
        # whose reader left its final status unread past its close grace: the session broke, or this
        # client stopped reading past the router's flow-control timeout. Which one, only this
        # client's own stalls can tell.
        stall = max(METER.longest(), stalled)
        if stall >= MIN_STALL:
            return ResourceExhausted(
                f"the router ended the session because this client stopped reading: it did not read for "
                f"{stall:.1f}s (the process was paused, or what it writes to was not read), most likely past "
                "the router's flow-control timeout (--flow-control-timeout)"
            )
        if err.code() == grpc.StatusCode.INTERNAL:
            return Unavailable("the session broke while sending (the router ended it: agent or router gone)")
    details = err.details() or err.code().name.lower()
    if dial is not None and err.code() == grpc.StatusCode.UNAVAILABLE:
        details = explain_dial_error(details, dial, peer) or details
    if err.code() == grpc.StatusCode.UNAVAILABLE and details.startswith(_TRANSPORT_BREAKS):
        # gRPC's words for a connection lost under an open call: say what happened, keep them after.
        details = f"the connection to the router broke (router gone or network cut): {details}"
    return from_status(err.code(), details)


#: The details of a call the native server reset (RST_STREAM CANCEL) rather than end with a status
#: its reader did not take in time (osmo_router.h2.calls, the server's close grace).
_RESET_BY_SERVER = "Received RST_STREAM: cancelled"


def _status_lost(err: grpc.aio.AioRpcError) -> bool:
    """Whether the router's status for this call was lost on the way (replaced or dropped), not received."""
    if err.code() == grpc.StatusCode.INTERNAL:
        return "execute_batch" in (err.debug_error_string() or "")
    return err.code() == grpc.StatusCode.CANCELLED and bool(err.details() == _RESET_BY_SERVER)


#: How gRPC words a connection lost under a call that was already open.
_TRANSPORT_BREAKS = ("Stream removed", "Socket closed", "Connection reset", "recvmsg", "Broken pipe", "GOAWAY")


async def rpc_failure(err: grpc.aio.AioRpcError, dial: DialConfig) -> RouterError:
    """`rpc_error` for a call that failed while connecting, the router probed when the details are ambiguous.

    A connection closed or reset while it was being made is a TLS mismatch only if the router
    answers a TLS ClientHello (osmo_router.dial.errors): the probe is what tells a plaintext client
    against a TLS router from a router that died.
    """
    peer = None
    if err.code() == grpc.StatusCode.UNAVAILABLE and needs_probe(err.details() or ""):
        peer = await probe_peer(dial.address)
    return rpc_error(err, dial, peer)


async def start_session(
    config: ClientConfig, method: Any, request_type: Any, init: Any, *, raw: bool = False
) -> FrameStream:
    """Start a stream with its init, without waiting for the agent (then `wait_ready`).

    Frames may be sent before the ready arrives: the router takes them once the session is paired,
    which saves a round trip when a connection opens. `raw`: the call was made with framecodec's
    serializers (see FrameStream).
    """
    METER.start()
    call = method(metadata=config.dial.metadata())
    try:
        await call.write(request_type(init=init))
    except grpc.aio.AioRpcError as err:
        raise await rpc_failure(err, config.dial) from None
    return FrameStream(call, lambda frame: request_type(frame=frame), raw=raw)


class BrokeBeforeReady(Unavailable):
    """The connection broke after the init went out and before the router's ready arrived.

    The router may have started the session (the agent its command): `stream` is the broken one, for
    a client that knows the session's key all the same (ResumeToken.key_from_secret) to resume it.
    """

    def __init__(self, message: str, stream: FrameStream) -> None:
        super().__init__(message)
        self.stream = stream


async def wait_ready(config: ClientConfig, stream: FrameStream) -> None:
    """Wait for the router's ready (the agent joined); raises RouterError on refusal (BrokeBeforeReady:
    the connection broke meanwhile)."""
    call = stream.call
    try:
        async with asyncio.timeout(config.connect_timeout + 60.0):
            first = await call.read()
    except grpc.aio.AioRpcError as err:
        failure = await rpc_failure(err, config.dial)
        if err.code() == grpc.StatusCode.UNAVAILABLE and (err.details() or "").startswith(_TRANSPORT_BREAKS):
            raise BrokeBeforeReady(failure.message, stream) from None
        raise failure from None
    except TimeoutError:
        call.cancel()
        raise DeadlineExceeded("the router did not answer") from None
    if first is grpc.aio.EOF:
        code = await call.code()
        details = await call.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and details.startswith(_TRANSPORT_BREAKS):
            raise BrokeBeforeReady(
                f"the connection to the router broke (router gone or network cut): {details}", stream
            )
        raise (
            from_status(code, details or "the router ended the stream")
            if code != grpc.StatusCode.OK
            else Unavailable("the router ended the stream before the session started")
        )
    if first.WhichOneof("kind") != "ready":
        call.cancel()
        raise RouterError("the router sent something other than ready")
    stream.session_key = first.ready.session_key
    stream.agent_resumes = first.ready.agent_resumes
    if first.ready.task_count:
        stream.chosen_task = first.ready.defaulted_task
        config.notices.once(defaulted_task_line(first.ready))


def defaulted_task_line(ready: pb.SessionReady) -> str:
    """What to tell a user whose session the router gave to one of several agents (as kubectl's
    'Defaulted container "c" out of: a, b, c')."""
    chosen = f"task {ready.defaulted_task!r}" if ready.defaulted_task else "the agent with no task"
    names = ", ".join(repr(task) if task else "(no task)" for task in ready.tasks)
    more = ready.task_count - len(ready.tasks)
    names += f" and {more} more" if more > 0 else ""
    return f"defaulted to {chosen} out of: {names} (pass --task to choose)"


async def open_session(
    config: ClientConfig, method: Any, request_type: Any, init: Any, *, raw: bool = False
) -> FrameStream:
    """Start a stream with its init and wait until the agent joined; raises RouterError on refusal."""
    stream = await start_session(config, method, request_type, init, raw=raw)
    await wait_ready(config, stream)
    return stream


__all__ = [
    "BrokeBeforeReady",
    "defaulted_task_line",
    "open_session",
    "pb",
    "rpc_error",
    "rpc_failure",
    "start_session",
    "wait_ready",
]
