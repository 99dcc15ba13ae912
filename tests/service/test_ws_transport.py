"""The WebSocket transport's pieces: protocol mapping, rollout buckets, addresses, and auth on the WS port."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence

import aiohttp
import pytest
import pytest_asyncio

from osmo_router.client.config import ClientConfig
from osmo_router.dial.config import DialConfig
from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.server import RouterServer
from osmo_router.transport.rollout import bucket, choose, host_port, rollout_user, token_subject
from osmo_router.wire.errors import DeadlineExceeded, InvalidArgument, PermissionDenied, Unauthenticated
from osmo_router.wire.protocol import pb
from osmo_router.wire.wsproto import (
    base_url,
    default_ws_address,
    error_from_reason,
    error_reason,
    exit_from_reason,
    exit_reason,
    frame_to_message,
    message_to_frame,
    parse_size,
)
from tests.harness import metric_value


def _jwt(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


def test_frames_map_to_old_messages_and_back() -> None:
    assert frame_to_message(pb.Frame(data=b"abc"), to_backend=True) == b"abc"
    assert frame_to_message(pb.Frame(stderr=b"err"), to_backend=False) == b"err"  # merged, as the old router had it
    assert frame_to_message(pb.Frame(data=b""), to_backend=True) is None  # never an accidental EOF
    assert frame_to_message(pb.Frame(half_close=pb.HalfClose()), to_backend=True) == b""
    assert frame_to_message(pb.Frame(signal=pb.Signal(number=2)), to_backend=True) is None
    resize = pb.Frame(resize=pb.Resize(size=pb.TerminalSize(rows=40, cols=120)))
    message = frame_to_message(resize, to_backend=True)
    assert message == b'\x00RESIZE:{"Rows": 40, "Cols": 120}'
    assert message_to_frame(message, parse_resize=True) == resize
    assert message_to_frame(message, parse_resize=False) == pb.Frame(data=message)  # pipe mode: just bytes
    assert message_to_frame(b"", parse_resize=True).WhichOneof("kind") == "half_close"


def test_size_messages_are_checked() -> None:
    assert parse_size(b'{"Rows":24,"Cols":80}') == (24, 80)
    for bad in (b"", b"[]", b'{"Rows": 24}', b'{"Rows": -1, "Cols": 80}', b'{"Rows": "x", "Cols": 1}'):
        with pytest.raises(InvalidArgument):
            parse_size(bad)


def test_close_reasons_carry_errors_and_exit_statuses() -> None:
    err = error_from_reason(error_reason(DeadlineExceeded.code, "no agent joined within 60s"))
    assert isinstance(err, DeadlineExceeded) and err.message == "no agent joined within 60s"
    assert len(error_reason(DeadlineExceeded.code, "x" * 500).encode()) <= 123
    assert exit_from_reason(exit_reason(pb.ExitStatus(code=7))) == pb.ExitStatus(code=7)
    assert exit_from_reason(exit_reason(pb.ExitStatus(signal=9))) == pb.ExitStatus(signal=9)
    assert exit_from_reason("") is None and exit_from_reason("exit:x") is None


def test_ws_addresses() -> None:
    assert default_ws_address("router.example:50051") == "router.example:8000"
    assert default_ws_address("[::1]:50051") == "[::1]:8000"
    assert default_ws_address("router.example") == "router.example:8000"
    assert base_url("host:8000", tls=False) == "ws://host:8000"
    assert base_url("host:8000", tls=True) == "wss://host:8000"
    assert base_url("https://host/prefix/", tls=False) == "wss://host/prefix"


def test_probe_addresses() -> None:
    assert host_port("router:50051") == ("router", 50051)
    assert host_port("[::1]:50051") == ("::1", 50051)
    assert host_port("dns:///router:50051") is None
    assert host_port("::1") is None and host_port("router") is None


def test_rollout_is_sticky_per_user() -> None:
    assert bucket("alice") == bucket("alice")
    assert len({bucket(f"user-{i}") for i in range(500)}) > 90  # spread over the buckets
    token = _jwt({"sub": "alice", "exp": 1})
    assert token_subject(token) == "alice" and rollout_user(token) == "alice"
    assert token_subject("not-a-jwt") is None
    dial = DialConfig(address="a:1", token=token)
    below = ClientConfig(dial=dial, workflow_id="wf", grpc_percent=bucket("alice") + 1)
    at = ClientConfig(dial=dial, workflow_id="wf", grpc_percent=bucket("alice"))
    assert choose(below) == ("grpc", False)
    assert choose(at) == ("ws", False)
    assert choose(ClientConfig(dial=dial, workflow_id="wf", transport="ws", grpc_percent=100)) == ("ws", True)
    assert choose(ClientConfig(dial=dial, workflow_id="wf")) == ("grpc", False)


class TokenAuth:
    """`agent-token` is an agent, `user-token` a user of workflow wf-a; anything else is refused."""

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        values = {str(v) for k, v in metadata if k == "authorization"}
        if "Bearer agent-token" in values:
            return Identity(subject="agent", role=ROLE_AGENT, workflows=("wf-a",))
        if "Bearer user-token" in values:
            return Identity(subject="alice", workflows=("wf-a",))
        raise Unauthenticated("no valid token")

    async def revalidate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        return await self.authenticate(metadata)

    async def close(self) -> None:
        """Nothing to release."""


@pytest_asyncio.fixture
async def ws_router() -> AsyncIterator[RouterServer]:
    config = RouterConfig(port=0, metrics_port=-1, ws_port=0, tls_enabled=False, auth="none", rendezvous_timeout=5)
    server = RouterServer(config, authenticator=TokenAuth())
    await server.start()
    yield server
    await server.close()


@pytest.mark.asyncio
async def test_ws_port_uses_the_routers_authenticator(ws_router: RouterServer) -> None:
    base = f"http://127.0.0.1:{ws_router.ws_server.port}/api/router/portforward"
    async with aiohttp.ClientSession() as http:
        for url, headers in (
            (f"{base}/wf-a/client/k1", {}),
            (f"{base}/wf-a/client/k1?token=bad", {}),
            (f"{base}/wf-a/backend/k1", {"Authorization": "Bearer bad"}),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url, headers=headers)
            assert refused.value.status == 401
        # A user may not act as a backend; an agent may not serve a workflow outside its token.
        for url in (f"{base}/wf-a/backend/k1?token=user-token", f"{base}/wf-b/backend/k1?token=agent-token"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url)
            assert refused.value.status == 403
        # The same tokens pair: the agent's in a header, the user's in the query.
        backend = await http.ws_connect(f"{base}/wf-a/backend/k2", headers={"Authorization": "Bearer agent-token"})
        client = await http.ws_connect(f"{base}/wf-a/client/k2?token=user-token")
        await client.send_bytes(b"ping")
        assert await backend.receive_bytes() == b"ping"
        await backend.send_bytes(b"pong")
        assert await client.receive_bytes() == b"pong"
        await client.close()
        await backend.close()
    text = ws_router.metrics.render().decode()
    by_transport = "router_grpc_errors_by_transport_total"
    assert metric_value(text, by_transport, {"operation": "portforward", "code": "UNAUTHENTICATED"}) == 2
    assert metric_value(text, by_transport, {"operation": "connect", "code": "UNAUTHENTICATED", "transport": "ws"}) == 1
    assert metric_value(text, by_transport, {"code": PermissionDenied.code.name, "transport": "ws"}) == 2
    assert metric_value(text, by_transport, {"transport": "grpc"}) == 0


@pytest.mark.asyncio
async def test_ws_sides_count_against_the_same_limits() -> None:
    """One session per user: a second WS client of the same user is refused, as a gRPC one would be."""
    config = RouterConfig(port=0, metrics_port=-1, ws_port=0, tls_enabled=False, auth="none", max_sessions_per_user=1)
    server = RouterServer(config)
    await server.start()
    base = f"http://127.0.0.1:{server.ws_server.port}/api/router/portforward/wf-limits/client"
    try:
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(f"{base}/k1")  # waits for an agent that never comes
            for _ in range(1000):  # no event says "joined": poll the store, at most 10 s
                if len(server.sessions) == 1:
                    break
                await asyncio.sleep(0.01)
            assert len(server.sessions) == 1
            second = await http.ws_connect(f"{base}/k2")
            async with asyncio.timeout(10):
                msg = await second.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE and second.close_code == 4000
            assert str(msg.extra).startswith("RESOURCE_EXHAUSTED"), msg.extra
            await first.close()
    finally:
        await server.close()
