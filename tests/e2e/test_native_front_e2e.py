"""The native front (h2/front.py, issue 18) end to end: real router, agent and port-forward processes,
with the front on and off. A forward's small messages reach their sockets in order and intact either
way, and so does a bulk transfer between them. With the front on, the logs say it passed them: the
agent's connection (requests to the target's socket), its forwarded socket (the answers onto the
stream) and the router's connections (the relay hop), so it was built and used; with it off, none of
the three processes has a front at all."""

from __future__ import annotations

import os
import signal
import socket
import uuid

import pytest

from tests.forward_servers import TIMEOUT, connect, echo, recv_exactly, start_forward, tcp_server
from tests.harness import AgentProc, Proc, Router

#: Request/response rounds of small messages: every one a separate DATA frame on an idle stream.
ROUNDS = 300
PASSED = "messages passed on by the native front"
SENT = "reads went to the stream by the native front"


def _rounds(port: int) -> None:
    with connect(port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(TIMEOUT)
        for index in range(ROUNDS):
            message = os.urandom(1 + index * 37 % 3000)
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == message, f"round {index}"
        bulk = os.urandom(3 * 1024 * 1024 + 11)  # large frames: the Python path, in order with the rest
        sock.sendall(bulk)
        assert recv_exactly(sock, len(bulk)) == bulk
        sock.sendall(b"last")
        assert recv_exactly(sock, 4) == b"last"


def _counts(proc: Proc, phrase: str) -> list[int]:
    """The counts of the debug lines of `proc` that carry `phrase` ("...; N <phrase>")."""
    lines = [str(record["msg"]) for record in proc.events() if phrase in str(record.get("msg", ""))]
    return [int(line.split("; ")[1].split()[0]) for line in lines]


@pytest.mark.parametrize("native", ["1", "0"])
def test_small_messages_pass_intact_with_the_front_on_and_off(native: str) -> None:
    env = {"OSMO_NATIVE_FRONT": native}
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    router = Router("--log-level", "debug", env=env)
    agent = forward = None
    try:
        agent = AgentProc(router.address, workflow, "--log-level", "debug", env=env)
        client_args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
        with tcp_server(echo) as target:
            forward, (port,) = start_forward(client_args, f"0:{target}", env=env)
            _rounds(port)
        forward.stop()
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit() == 0
        router.signal(signal.SIGTERM)
        router.wait_exit()
    finally:
        for proc in (forward, agent, router):
            if proc is not None:
                proc.stop()
    seen = {
        "agent's connection": _counts(agent, PASSED),
        "agent's forwarded socket": _counts(agent, SENT),
        "router's connections": _counts(router, PASSED),
    }
    if native == "0":
        assert not any(seen.values()), seen
    else:
        # Each way at least half the rounds (a round may meet its stream busy and take the Python path);
        # the router passes both ways, on its two connections.
        assert all(seen.values()), (seen, "\n".join(agent.lines[-10:] + router.lines[-10:]))
        assert max(seen["agent's connection"]) >= ROUNDS // 2, seen
        assert max(seen["agent's forwarded socket"]) >= ROUNDS // 2, seen
        assert sum(seen["router's connections"]) >= ROUNDS, seen
