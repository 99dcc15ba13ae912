"""TCP port-forward across transports: every client/agent pairing through one router, bytes checked.

The CLI forwards each local connection as a session of its own with a router-made key, so it meets a
gRPC agent; an orchestrator-keyed WS backend serves one connection, so those pairings are driven
through the transport interface itself (GrpcTransport / WsTransport), as the CLI would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import uuid

import pytest

from osmo_router.client.config import ClientConfig
from osmo_router.dial.config import DialConfig
from osmo_router.transport import Transport
from osmo_router.transport.grpc_transport import GrpcTransport
from osmo_router.transport.ws_transport import WsTransport
from osmo_router.wire.protocol import pb
from tests.forward_servers import (
    TIMEOUT,
    GreetThenCount,
    answer_after_eof,
    connect,
    echo,
    recv_all,
    start_forward,
    tcp_server,
)
from tests.harness import Router, run_client
from tests.ws_fixtures import module_grpc_workflow, module_router  # noqa: F401 (fixtures router, grpc_workflow)
from tests.ws_kit import WsBackendProc, client_args, delta, new_key, transport_counts

BLOB = 8 * 1024 * 1024


def _echo_through(port: int, blob: bytes) -> bytes:
    """Send a blob through a forwarded port to an echo server, half-close, read everything back."""
    with connect(port) as sock:
        sender = asyncio.new_event_loop()
        try:
            sent = sender.run_in_executor(None, lambda: (sock.sendall(blob), sock.shutdown(socket.SHUT_WR)))
            data = recv_all(sock)
            sender.run_until_complete(sent)
        finally:
            sender.close()
    return data


@pytest.mark.parametrize("client", ["grpc", "ws"])
def test_cli_forward_to_a_grpc_agent(router: Router, grpc_workflow: str, client: str) -> None:
    """Integrity both ways and half-close in both directions, the CLI over either transport."""
    blob = os.urandom(BLOB)
    before = transport_counts(router, "portforward")
    greeter = GreetThenCount()
    with tcp_server(echo) as echo_port, tcp_server(answer_after_eof) as eof_port, tcp_server(greeter) as greet_port:
        args = client_args(router, grpc_workflow, client)
        proc, ports = start_forward(args, f":{echo_port}", f":{eof_port}", f":{greet_port}", count=3)
        try:
            echoed = _echo_through(ports[0], blob)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
            with connect(ports[1]) as sock:
                sock.sendall(b"z" * 300_000)
                sock.shutdown(socket.SHUT_WR)  # the target answers only after this EOF
                assert recv_all(sock) == b"got 300000 bytes"
            with connect(ports[2]) as sock:
                assert recv_all(sock) == b"hello, then EOF"  # the target's EOF arrived ...
                sock.sendall(b"q" * 200_000)  # ... and our direction still flows
                sock.shutdown(socket.SHUT_WR)
                assert greeter.done.wait(TIMEOUT)
                assert greeter.received == [200_000]
        finally:
            proc.stop()
    moved = delta(before, transport_counts(router, "portforward"))
    assert moved[f"client_{client}"] >= 3 and moved["agent_grpc"] == moved[f"client_{client}"], moved


def _transport(router: Router, name: str, workflow: str) -> Transport:
    """A client transport to the router (made inside the event loop that uses it: a gRPC channel binds to it)."""
    dial = DialConfig(address=router.address, tls=False)
    if name == "grpc":
        return GrpcTransport(ClientConfig(dial=dial, workflow_id=workflow))
    return WsTransport(dial, f"127.0.0.1:{router.ws_port}")


async def _forward_blob(router: Router, client: str, workflow: str, key: str, port: int, blob: bytes) -> bytes:
    """One forwarded connection through a transport: the blob out, half-close, the echo back."""
    transport = _transport(router, client, workflow)
    target = pb.SessionTarget(workflow_id=workflow, session_key=key)
    stream = await transport.open(
        pb.OPERATION_PORT_FORWARD, pb.PortForwardInit(target=target, protocol=pb.PROTOCOL_TCP, remote_port=port)
    )

    async def send() -> None:
        for offset in range(0, len(blob), 128 * 1024):
            await stream.send(pb.Frame(data=blob[offset : offset + 128 * 1024]))
        await stream.send(pb.Frame(half_close=pb.HalfClose()))

    sender = asyncio.create_task(send())
    received = bytearray()
    try:
        async with asyncio.timeout(TIMEOUT):
            # To the end of the stream, past the echo's half-close, as the CLI reads: the router then
            # closes the WebSocket. Leaving it open would leave its connection unreleased when the
            # transport closes its HTTP session (aiohttp's "Unclosed connection" at garbage collection).
            while (frame := await stream.recv()) is not None:
                if frame.WhichOneof("kind") == "data":
                    received += frame.data
            await sender
    finally:
        await transport.aclose()
    return bytes(received)


@pytest.mark.parametrize("client", ["grpc", "ws"])
def test_forward_to_a_ws_backend_on_an_orchestrator_key(router: Router, client: str) -> None:
    """grpc-ws and ws-ws: the backend (`agent --transport ws`) gets the port from the client's init."""
    workflow, key, blob = f"wf-wsb-{uuid.uuid4().hex[:8]}", new_key(), os.urandom(BLOB)
    before = transport_counts(router, "portforward")
    with tcp_server(echo) as port:
        backend = WsBackendProc(router, workflow, key, operation="portforward")
        try:
            echoed = asyncio.run(_forward_blob(router, client, workflow, key, port, blob))
            assert backend.wait_exit(20) == 0
        finally:
            backend.stop()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
    assert delta(before, transport_counts(router, "portforward")) == {f"client_{client}": 1, "agent_ws": 1}


def test_udp_is_refused_over_websocket(router: Router, grpc_workflow: str) -> None:
    """The old protocol has no datagram framing this router carries: a clear refusal, not silence."""
    args = client_args(router, grpc_workflow, "ws")
    result = run_client("port-forward", *args, "--protocol", "udp", ":5353", timeout=60)
    assert result.returncode == 255
    assert b"UDP port-forward is not carried over WebSocket" in result.stderr, result.stderr
