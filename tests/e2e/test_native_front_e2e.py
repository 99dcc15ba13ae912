"""The native front of client connections (h2/front.py, issue 18) end to end: real router, agent and
port-forward processes, with the front on and off. A forward's small messages reach their sockets in
order and intact either way; with the front on, the agent's log says the front passed them (so it was
built and used), with it off the agent has no front at all."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.forward_servers import TIMEOUT, connect, echo, recv_exactly, start_forward, tcp_server
from tests.harness import AgentProc, Router

#: Request/response rounds of small messages: every one a separate DATA frame on an idle stream.
ROUNDS = 300
PASSED = "messages went to their sockets by the native front"
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


@pytest.mark.parametrize("native", ["1", "0"])
def test_small_messages_pass_intact_with_the_front_on_and_off(
    router: Router, workflow: str, client_args: list[str], native: str
) -> None:
    env = {"OSMO_NATIVE_FRONT": native}
    agent = AgentProc(router.address, workflow, "--log-level", "debug", env=env)
    forward = None
    try:
        with tcp_server(echo) as target:
            forward, (port,) = start_forward(client_args, f"0:{target}", env=env)
            _rounds(port)
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit() == 0
    finally:
        if forward is not None:
            forward.stop()
        agent.stop()
    # Both ways through the agent's native front: the requests to the target's socket (Front), its
    # answers read from it onto the stream (SocketLane); with the front off, neither is there.
    for phrase in (PASSED, SENT):
        lines = [str(record["msg"]) for record in agent.events() if phrase in str(record.get("msg", ""))]
        if native == "0":
            assert not lines, lines
        else:
            assert lines, f"the agent never logged {phrase!r}:\n" + "\n".join(agent.lines[-20:])
            assert int(lines[0].split("; ")[1].split()[0]) >= ROUNDS // 2, lines[0]
