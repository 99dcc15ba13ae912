"""A hostile peer's view of the router: raw gRPC calls of encoded bytes, no client library in between.

Calls use identity serializers, so a test can send any bytes in any order to any RPC and see
exactly what the router answers. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import grpc

from osmo_router.wire.protocol import pb

EXEC = "/osmo.router.v1.RouterClientService/Exec"
PORT_FORWARD = "/osmo.router.v1.RouterClientService/PortForward"
RSYNC = "/osmo.router.v1.RouterClientService/Rsync"
REGISTER = "/osmo.router.v1.RouterAgentService/Register"
CONNECT = "/osmo.router.v1.RouterAgentService/Connect"
ALL_METHODS = (EXEC, PORT_FORWARD, RSYNC, REGISTER, CONNECT)

#: Longest any single call may take in these tests before it counts as a hang.
CALL_BOUND = 15.0


def raw_channel(address: str) -> grpc.aio.Channel:
    """A plaintext channel that may send messages up to 16 MiB (so the router's own limit is what bites)."""
    return grpc.aio.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)],
    )


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token (none when token is None)."""
    return () if token is None else (("authorization", f"Bearer {token}"),)


def exec_init(workflow: str, command: list[str] | None = None, *, key: str = "", task: str = "") -> bytes:
    """An encoded ExecRequest init."""
    target = pb.SessionTarget(workflow_id=workflow, task=task, session_key=key)
    return pb.ExecRequest(init=pb.ExecInit(target=target, command=command or ["cat"])).SerializeToString()


def connect_init(workflow: str, key: str, agent_id: str = "raw-agent") -> bytes:
    """An encoded ConnectRequest init."""
    init = pb.ConnectInit(session_key=key, workflow_id=workflow, agent_id=agent_id)
    return pb.ConnectRequest(init=init).SerializeToString()


def hello(workflow: str, agent_id: str = "raw-agent") -> bytes:
    """An encoded RegisterRequest hello."""
    return pb.RegisterRequest(hello=pb.AgentHello(workflow_id=workflow, agent_id=agent_id)).SerializeToString()


def frame(**kind: Any) -> bytes:
    """An encoded frame message (the same bytes on every stream)."""
    return pb.ExecRequest(frame=pb.Frame(**kind)).SerializeToString()


@dataclass
class Outcome:
    """How a raw call ended."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes] = field(default_factory=list)


class RawCall:
    """One raw stream-stream call."""

    def __init__(self, channel: grpc.aio.Channel, method: str, token: str | None) -> None:
        self.call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)(
            metadata=metadata(token)
        )
        self.responses: list[bytes] = []

    async def send(self, *messages: bytes) -> bool:
        """Write messages; False once the call refused a write (it already ended)."""
        try:
            for message in messages:
                await self.call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return False
        return True

    async def read(self, timeout: float = CALL_BOUND) -> bytes | None:
        """The next response (None at the end of the stream)."""
        async with asyncio.timeout(timeout):
            message = await self.call.read()
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, bytes)
        self.responses.append(message)
        return message

    async def finish(self, timeout: float = CALL_BOUND, half_close: bool = True) -> Outcome:
        """Half-close (optionally), read to the end and return the status; raises TimeoutError on a hang."""
        if half_close:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                await self.call.done_writing()
        async with asyncio.timeout(timeout):
            with contextlib.suppress(grpc.aio.AioRpcError):
                while (message := await self.call.read()) is not grpc.aio.EOF:
                    self.responses.append(message)
            code = await self.call.code()
            details = await self.call.details()
        return Outcome(code, details or "", self.responses)

    def cancel(self) -> None:
        """Cancel the call (the router sees the peer go away)."""
        self.call.cancel()


async def exchange(
    channel: grpc.aio.Channel, method: str, token: str | None, *messages: bytes, timeout: float = CALL_BOUND
) -> Outcome:
    """Send messages, half-close, and return how the call ended."""
    call = RawCall(channel, method, token)
    await call.send(*messages)
    return await call.finish(timeout)


async def wait_metric(
    router: Any, name: str, value: float, labels: dict[str, str] | None = None, timeout: float = 20.0
) -> None:
    """Poll the router's /metrics (bounded) until a sample (summed over matching labels) equals `value`."""
    from prometheus_client.parser import text_string_to_metric_families

    def current() -> float:
        total = 0.0
        for family in text_string_to_metric_families(router.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (seen := await asyncio.to_thread(current)) != value:
        if loop.time() > deadline:
            raise AssertionError(f"{name}{labels or ''} is {seen}, expected {value}")
        await asyncio.sleep(0.05)
