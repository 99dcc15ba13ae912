"""Resumable sessions across router replicas (issue 17): replica loss and drain without loss.

Two replicas and a real redis-server. The client and the agent are given both addresses (each
tries the next one when one is gone or draining). A 64 MiB `exec -- cat` round trip goes on
while the replica in its path is SIGKILLed, or SIGTERMed (drain), and must come back whole with
exit 0. The directory TTL is long on purpose (60 s): a resume must pair within seconds, so it
must not wait for the dead replica's entries to expire.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.harness import AgentProc, Proc, Router, metric_value
from tests.redis_harness import RedisServer
from tests.resume_kit import MIB, CatRoundTrip

#: Far longer than any resume may take: nothing may wait for a dead replica's entries to expire.
TTL = "60s"
#: Longest a resume may take after the replica in the path was lost (agents re-register, clients back off).
RESUME_WITHIN = 20.0


class Replicas:
    """Replicas A and B sharing one Redis, and an agent that knows both (A first)."""

    def __init__(self, redis_server: RedisServer, *router_args: str, agent_first: str = "a") -> None:
        self.procs: list[Proc] = []
        self.a = self._router(redis_server, *router_args)
        self.b = self._router(redis_server, *router_args)
        self.workflow = f"wf-{uuid.uuid4().hex[:8]}"
        first, second = (self.a, self.b) if agent_first == "a" else (self.b, self.a)
        self.agent = AgentProc(f"{first.address},{second.address}", self.workflow)
        self.procs.append(self.agent)

    def _router(self, redis_server: RedisServer, *args: str) -> Router:
        proc = Router("--redis-url", redis_server.url, f"--directory-ttl={TTL}", *args)
        self.procs.append(proc)
        return proc

    def dial(self, first: Router, second: Router) -> list[str]:
        """Client flags: both replicas, `first` first."""
        return ["--router-address", f"{first.address},{second.address}", "--workflow-id", self.workflow, "--tls=false"]

    def stop(self) -> None:
        """Stop every process."""
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server."""
    server = RedisServer()
    yield server
    server.stop()


def resumes(router: Router) -> float:
    """Exec sessions this replica resumed."""
    return metric_value(router.metrics_text(), "router_grpc_resumes_total", {"operation": "exec"})


@pytest.mark.parametrize("lost", ["agent_side", "client_side"])
def test_exec_survives_the_loss_of_the_replica_in_its_path(redis_server: RedisServer, lost: str) -> None:
    """agent_side: the client dials B, its agent is on A, A dies. client_side: the client dials A, its agent is on B."""
    replicas = Replicas(redis_server, agent_first="a" if lost == "agent_side" else "b")
    a, b = replicas.a, replicas.b
    first = b if lost == "agent_side" else a
    cat = CatRoundTrip(replicas.dial(first, b if first is a else a))
    try:
        b.wait_for(lambda r: r.get("event") in ("relay start", "session start"))
        cat.wait_received(16 * MIB)
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        a.wait_exit()
        resumed = cat.wait_stderr("session resumed", timeout=RESUME_WITHIN + 10)
        assert cat.finish() == 0, cat.stderr
        assert cat.intact, f"{cat.received} of {len(cat.blob)} bytes, or not the same bytes"
        assert resumed - killed < RESUME_WITHIN, f"resumed {resumed - killed:.1f}s after the kill"
        print(f"{lost}: resumed {resumed - killed:.2f}s after the kill")
        assert any("connection lost" in line for line in cat.stderr), cat.stderr
        # The agent moved to B, and B paired the resume itself.
        replicas.agent.wait_for(lambda r: r.get("event") == "registered" and r.get("router_id") == b.router_id)
        assert resumes(b) >= 1
        b.wait_for(lambda r: r.get("event") == "session resumed" and r.get("workflow") == replicas.workflow)
    finally:
        cat.stop()
        replicas.stop()


@pytest.mark.parametrize("drained", ["owner", "relay"])
def test_sigterm_moves_resumable_sessions_to_another_replica(redis_server: RedisServer, drained: str) -> None:
    """A drains: its session is ended as a break and resumes via B; A exits long before --drain-timeout.

    owner: A holds the agent and the session. relay: the agent is on B and A relays the client to it.
    """
    replicas = Replicas(redis_server, "--drain-timeout=120s", agent_first="a" if drained == "owner" else "b")
    a, b = replicas.a, replicas.b
    cat = CatRoundTrip(replicas.dial(a, b))
    try:
        a.wait_for(lambda r: r.get("event") == ("session start" if drained == "owner" else "relay start"))
        cat.wait_received(16 * MIB)
        a.signal(signal.SIGTERM)
        signalled = time.monotonic()
        draining = a.wait_event("draining")
        assert draining["moved"] == 1, draining
        assert a.wait_exit(60) == 0
        exited = time.monotonic() - signalled
        assert exited < 30, "A waited for its session instead of moving it"
        resumed = cat.wait_stderr("session resumed", timeout=RESUME_WITHIN) - signalled
        print(f"drain ({drained}): A exited {exited:.2f}s after SIGTERM, resumed at {resumed:.2f}s")
        assert cat.finish() == 0, cat.stderr
        assert cat.intact, f"{cat.received} of {len(cat.blob)} bytes, or not the same bytes"
        # The status the client reads is "router draining" unless its own write raced with the end of
        # the call (grpc.aio then reports INTERNAL): either way a break, resumed.
        assert any("connection lost" in line for line in cat.stderr), cat.stderr
        replicas.agent.wait_for(lambda r: r.get("event") == "registered" and r.get("router_id") == b.router_id)
        assert resumes(b) >= 1
    finally:
        cat.stop()
        replicas.stop()
