"""WebSocket sides with several replicas: placed through the shared directory like gRPC streams.

Replicas A and B share a real redis-server. A WS side that connects to the replica without its
session is relayed to the one holding it, whichever transport each side uses.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.test_scaleout_e2e import SECRET, Cluster
from tests.harness import AgentProc, Router, metric_value, run_client
from tests.redis_harness import RedisServer
from tests.ws_kit import WsBackendProc, client_args, new_key


class Replicas:
    """A (with a gRPC agent for `workflow`) and B."""

    def __init__(self, cluster: Cluster) -> None:
        self.a = cluster.router("--peer-secret", SECRET)
        self.b = cluster.router("--peer-secret", SECRET)
        self.workflow = f"wf-{uuid.uuid4().hex[:8]}"
        cluster.procs.append(AgentProc(self.a.address, self.workflow))


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    """Two healthy replicas sharing one Redis."""
    server = RedisServer()
    cluster = Cluster(server)
    try:
        yield Replicas(cluster)
    finally:
        cluster.stop()
        server.stop()


def _paired(router: Router) -> float:
    return metric_value(router.metrics_text(), "router_grpc_sessions_total", {"operation": "exec"})


def test_ws_client_on_b_meets_the_grpc_agent_on_a(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    before_a, before_b = _paired(a), _paired(b)
    blob = os.urandom(4 * 1024 * 1024)
    result = run_client("exec", *client_args(b, replicas.workflow, "ws"), "--", "cat", input=blob, timeout=90)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(blob).digest()
    assert (_paired(a) - before_a, _paired(b) - before_b) == (1, 0)  # A served it, B relayed it
    relayed = {"event": "relay end", "replica": a.router_id, "workflow": replicas.workflow, "status": "OK"}
    b.wait_for(lambda r: relayed.items() <= r.items())


@pytest.mark.parametrize("client", ["grpc", "ws"])
def test_ws_backend_on_a_meets_a_client_on_b(replicas: Replicas, client: str) -> None:
    """The orchestrator gives both the key; the backend dials A, the client B."""
    a, b = replicas.a, replicas.b
    workflow, key = f"wf-wsb-{uuid.uuid4().hex[:8]}", new_key()
    backend = WsBackendProc(a, workflow, key)
    try:
        args = client_args(b, workflow, client, "--session-key", key)
        result = run_client("exec", *args, "--", "sh", "-c", "echo across; exit 4", timeout=60)
        assert (result.returncode, result.stdout) == (4, b"across\n"), result.stderr
        assert backend.wait_exit(20) == 0
    finally:
        backend.stop()
    relayed = {"event": "relay end", "replica": a.router_id, "workflow": workflow, "status": "OK"}
    b.wait_for(lambda r: relayed.items() <= r.items())
