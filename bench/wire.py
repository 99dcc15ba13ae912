"""Raw gRPC calls for the load generator: pre-encoded messages, identity serializers, no protobuf per message.

A `Pair` is one session seen from both ends: the client's Exec call and the agent's Connect call,
joined by an orchestrator-style session key, so the generator needs no registered agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc

from osmo_router.wire.batching import BatchingWriter
from osmo_router.wire.codec import ENCODED_HALF_CLOSE, ENCODED_SESSION_END, payload_offset
from osmo_router.wire.codec import encode_data_message as data_message
from osmo_router.wire.protocol import channel_options, pb

EXEC = "/osmo.router.v1.RouterClientService/Exec"
CONNECT = "/osmo.router.v1.RouterAgentService/Connect"
REGISTER = "/osmo.router.v1.RouterAgentService/Register"
#: Bound on every wait of the generator that is not a measured transfer.
WAIT = 30.0


#: A CA file in this variable makes every channel of the load generator TLS (bench/experiments/compare_paths --tls).
TLS_CA_ENV = "OSMO_BENCH_TLS_CA"


#: "grpcio" or "native" (h2/channel.py) in this variable picks the load generator's channel; unset, it is
#: the CLI's and agent's default (dial/config.py DEFAULT_GRPC_CHANNEL), so the figures are what users get.
CHANNEL_ENV = "OSMO_BENCH_CHANNEL"


def open_channel(address: str) -> grpc.aio.Channel:
    """A channel with a connection of its own (no subchannel shared with other channels)."""
    from osmo_router.dial.config import DEFAULT_GRPC_CHANNEL, DialConfig

    if os.environ.get(CHANNEL_ENV, DEFAULT_GRPC_CHANNEL) == "native":
        from osmo_router.dial.channel import open_channel as dial

        ca = os.environ.get(TLS_CA_ENV)
        return dial(DialConfig(address=address, tls=bool(ca), tls_ca=ca or None, grpc_channel="native"))
    options: list[tuple[str, Any]] = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    ca = os.environ.get(TLS_CA_ENV)
    if ca:
        with open(ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


def client_init(workflow: str, key: str = "", command: tuple[str, ...] = ("cat",)) -> bytes:
    """An encoded ExecRequest init."""
    target = pb.SessionTarget(workflow_id=workflow, session_key=key)
    return pb.ExecRequest(init=pb.ExecInit(target=target, command=list(command))).SerializeToString()


def agent_init(workflow: str, key: str) -> bytes:
    """An encoded ConnectRequest init."""
    init = pb.ConnectInit(session_key=key, agent_id="loadgen", workflow_id=workflow)
    return pb.ConnectRequest(init=init).SerializeToString()


def standby_init(workflow: str) -> bytes:
    """An encoded ConnectRequest init of a standby stream (parked until a session takes it)."""
    init = pb.ConnectInit(agent_id="loadgen", workflow_id=workflow, standby=True)
    return pb.ConnectRequest(init=init).SerializeToString()


def payload_size(message: bytes) -> int:
    """Payload bytes of a data-frame message (0 for anything else)."""
    offset = payload_offset(message)
    return len(message) - offset if offset >= 0 else 0


async def read(call: Any) -> bytes | None:
    """The next message of a raw call, or None at its end."""
    message = await call.read()
    return None if message is grpc.aio.EOF else bytes(message)


@dataclass
class Pair:
    """Both ends of one session."""

    client: Any
    agent: Any
    key: str


async def open_pair(client_channel: grpc.aio.Channel, agent_channel: grpc.aio.Channel, workflow: str) -> Pair:
    """Open a session from both ends and wait until the router paired them."""
    key = secrets.token_urlsafe(16)
    client = client_channel.stream_stream(EXEC)()
    agent = agent_channel.stream_stream(CONNECT)()
    async with asyncio.timeout(WAIT):
        await client.write(client_init(workflow, key))
        await agent.write(agent_init(workflow, key))
        ready = await read(client)
        if not ready or ready[0] != 0x0A:
            agent.cancel()
            raise RuntimeError(f"client of session {key[:8]} refused: {await client.code()} {await client.details()}")
        opened = await read(agent)
    if not opened or opened[0] != 0x0A:
        raise RuntimeError(f"agent of session {key[:8]} was not paired: {opened!r}")
    return Pair(client, agent, key)


#: Writes one data-frame message to a call (returns once it is queued or written).
DataWrite = Callable[[bytes], Awaitable[None]]


def data_writer(call: Any, kind: str = "batch") -> DataWrite:
    """How the load generator writes data frames to `call`: "batch" through the BatchingWriter the
    CLI's and the agent's FrameStream use (wire/batching.py), "direct" one awaited call.write each."""
    if kind == "direct":
        return cast(DataWrite, call.write)
    return BatchingWriter(call.write, try_write=getattr(call, "try_write", None)).write_data


async def flush(write: DataWrite) -> None:
    """Wait until everything a `data_writer` queued was written."""
    owner = getattr(write, "__self__", None)
    if isinstance(owner, BatchingWriter):
        async with asyncio.timeout(WAIT):
            await owner.flush()


async def echo(
    pair: Pair, message: bytes = data_message(b"x"), writers: tuple[DataWrite, DataWrite] | None = None
) -> None:
    """One round trip: client -> agent, agent echoes it back -> client (through `writers` if given)."""
    to_agent, to_client = writers or (pair.client.write, pair.agent.write)
    await to_agent(message)
    got = await read(pair.agent)
    if got != message:
        raise RuntimeError(f"agent got {got!r}")
    await to_client(got)
    back = await read(pair.client)
    if back != message:
        raise RuntimeError(f"client got {back!r}")


async def finish_client(call: Any, send_half_close: bool = True) -> None:
    """End a client stream the way the CLI does: half-close, wait for SessionEnd, end the call."""
    async with asyncio.timeout(WAIT):
        if send_half_close:
            await call.write(ENCODED_HALF_CLOSE)
        while (message := await read(call)) is not None:
            if message == ENCODED_SESSION_END:
                await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.code()


async def finish_agent(call: Any, counted: list[int] | None = None) -> None:
    """Read until the client's half-close (counting payload bytes), then half-close and end the call."""
    async with asyncio.timeout(WAIT):
        await drain_agent(call, counted)
    await end_agent(call)


async def end_agent(call: Any) -> None:
    """Half-close the agent's side, end its writes and read until the router ends the call."""
    async with asyncio.timeout(WAIT):
        await call.write(ENCODED_HALF_CLOSE)
        await call.done_writing()
        while await read(call) is not None:
            pass


async def drain_agent(call: Any, counted: list[int] | None) -> None:
    """Read the agent's stream up to the client's half-close; counted[0] += payload bytes."""
    while (message := await read(call)) is not None:
        if message == ENCODED_HALF_CLOSE:
            return
        if counted is not None:
            counted[0] += payload_size(message)
            if len(counted) > 1:
                counted[1] += 1
    raise RuntimeError("the agent stream ended before the client's half-close")


async def close_pair(pair: Pair) -> None:
    """End a session cleanly from both ends."""
    await asyncio.gather(finish_client(pair.client), finish_agent(pair.agent))
