"""Resumable sessions across a scaled-out router's replicas (issue 17): rolling restart, replica loss.

A TTY shell across a rolling restart goes on as the same shell; a 256 MiB port-forward download
survives the SIGKILL of the replica in its path (the exec round trip is in test_resume_scaleout_e2e).

Two replicas on fixed ports share a real redis-server, as two pods behind one Service would. The
rolling restart replaces them one at a time as Kubernetes does: SIGTERM (the replica drains by
moving its resumable sessions), wait for it to exit, start its replacement on the same address,
then the next one. The client and the agent know both addresses (`--router-address a,b`). After
each step the shell must be the same process with the same state (PID, a variable set before).
"""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.test_attach_e2e import PROMPT, TtyClient, _shell_state
from tests.e2e.test_resume_e2e import MIB, READ_TIMEOUT, TRANSFER_TIMEOUT, Received, random_source, read_all
from tests.e2e.test_resume_scaleout_e2e import Replicas
from tests.forward_servers import connect, start_forward, tcp_server, wait_line
from tests.harness import AgentProc, Router
from tests.redis_harness import RedisServer

#: Longest one replica may take to drain and exit (its --drain-timeout is far longer on purpose).
DRAIN_WITHIN = 30.0


def _replica(redis_url: str, port: int = 0) -> Router:
    args = ["--redis-url", redis_url, "--directory-ttl=60s", "--drain-timeout=120s"]
    return Router(*args, "--port", str(port)) if port else Router(*args)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server."""
    server = RedisServer()
    yield server
    server.stop()


def test_tty_shell_survives_a_rolling_restart(redis_server: RedisServer) -> None:
    routers = [_replica(redis_server.url), _replica(redis_server.url)]
    addresses = ",".join(r.address for r in routers)
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(addresses, workflow)
    client = TtyClient(
        "exec", "--router-address", addresses, "--workflow-id", workflow, "--tls=false", "--tty", "--",
        "bash", "--norc", "--noprofile", "-i",
    )  # fmt: skip
    try:
        client.run(b"X=kept-$((6*7))", PROMPT)
        pid, x = _shell_state(client)
        assert x == b"kept-42"
        for step in range(2):
            old = routers[step]
            old.signal(signal.SIGTERM)
            assert old.wait_exit(DRAIN_WITHIN) == 0, f"replica {step} did not drain within {DRAIN_WITHIN}s"
            routers[step] = _replica(redis_server.url, old.port)
            # The session moved to the other replica: the same shell answers, its state intact.
            assert _shell_state(client) == (pid, b"kept-42"), f"after replacing replica {step}"
        assert b"connection lost" in client.text and b"session resumed" in client.text
        client.type(b"exit 3\r")
        assert client.exit_code() == 3
    finally:
        client.close()
        agent.stop()
        for router in routers:
            router.stop()


@pytest.mark.parametrize("lost", ["agent_side", "client_side"])
def test_256_mib_forward_download_survives_the_loss_of_the_replica_in_its_path(
    redis_server: RedisServer, lost: str
) -> None:
    """agent_side: the client dials B and the agent is on A, A is SIGKILLed; client_side: the other way round."""
    replicas = Replicas(redis_server, agent_first="a" if lost == "agent_side" else "b")
    a, b = replicas.a, replicas.b
    first = b if lost == "agent_side" else a
    size, trigger = 256 * MIB, 64 * MIB
    sent = hashlib.sha256()

    def serve(conn: socket.socket) -> None:
        random_source(size, sent, conn.sendall)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    with tcp_server(serve) as port:
        proc, (local,) = start_forward(replicas.dial(first, b if first is a else a), f":{port}")
        sock = connect(local)
        sock.settimeout(READ_TIMEOUT)
        got = Received()
        reader = threading.Thread(target=read_all, args=(sock.recv, got, trigger), daemon=True)
        try:
            reader.start()
            assert got.reached.wait(TRANSFER_TIMEOUT) and got.count >= trigger, got.ended
            a.signal(signal.SIGKILL)
            killed = time.monotonic()
            assert got.done.wait(TRANSFER_TIMEOUT), f"the download stalled at {got.count} bytes"
            assert got.ended == "eof", f"the download ended with {got.ended} after {got.count} bytes"
            assert (got.count, got.sha.digest()) == (size, sent.digest())
            wait_line(proc, lambda line: "session resumed" in line)
            print(f"\n{lost}: longest stall of the reader {got.longest_gap_after(killed):.2f}s")
        finally:
            sock.close()
            reader.join(30)
            proc.stop()
            replicas.stop()
