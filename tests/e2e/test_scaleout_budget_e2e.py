"""A replica relaying a user's sessions to another replica counts what it queues for them in her budgets.

Replicas A and B share a real redis-server; the agent registers with B, a raw client on A pushes
1 MiB frames into `sleep` (which never reads) in many sessions. B's budget stops B reading; A's relay
queues for B must then stop at A's budget too, not hold 4 MiB queues and 16 MiB windows per session,
and another user's session through A is served meanwhile (JWT identities: mallory and alice).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_memory_idle import rss_kib
from tests.harness import AgentProc, Proc, Router, exec_served, metric_value
from tests.raw_grpc import EXEC, RawCall, exec_init, frame, raw_channel
from tests.redis_harness import RedisServer
from tests.security_kit import Signer

SECRET = "peer-secret-for-tests-0123456789"
WF = "wf-scaleout-budget"
USER_BUDGET = 8 << 20
SESSIONS = 12


SIGNER = Signer.rs256()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Router, Router]]:
    server = RedisServer()
    procs: list[Proc] = []
    key = tmp_path / "jwt.pem"
    key.write_bytes(SIGNER.public_pem())
    try:
        flags = ["--redis-url", server.url, "--peer-secret", SECRET, "--user-buffer-bytes", str(USER_BUDGET),
                 "--flow-control-timeout", "300s", "--min-drain-rate", "0",
                 "--tls-enabled=false", "--auth=jwt", "--jwt-public-key", str(key)]  # fmt: skip
        b = Router(*flags, secure=True)
        procs.append(b)
        a = Router(*flags, secure=True)
        procs.append(a)
        procs.append(AgentProc(b.address, WF, "--token", SIGNER.token("pod", workflows=[WF], role="agent")))
        yield a, b
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


def test_a_relaying_replica_holds_a_users_stalled_sessions_within_her_budget(replicas: tuple[Router, Router]) -> None:
    """Before: 20 such sessions grew A by 430 MiB (a budget of 8 MiB), 12 by about 260 MiB."""
    a, _b = replicas
    sent = [0] * SESSIONS
    before = rss_kib(a.pid)

    mallory = SIGNER.token("mallory", workflows=[WF])

    async def push(channel: object, i: int) -> None:
        call = RawCall(channel, EXEC, mallory)  # type: ignore[arg-type]
        await call.send(exec_init(WF, ["sleep", "1000"]))
        await call.read()  # the ready: the session is relayed to B
        data = frame(data=b"z" * ((1 << 20) - 64))
        while await call.send(data):
            sent[i] += 1

    async def main() -> tuple[int, float]:
        channel = raw_channel(a.address)
        tasks = [asyncio.create_task(push(channel, i)) for i in range(SESSIONS)]
        try:
            # Until nothing more is taken for 2 s (bounded): every queue and window on the way is full.
            deadline, last, still = time.monotonic() + 60, -1, 0.0
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                total = sum(sent)
                still = still + 0.5 if total == last else 0.0
                last = total
                if still >= 2.0:
                    break
            text = await asyncio.to_thread(a.metrics_text)
            counted = metric_value(text, "router_grpc_buffered_bytes") + metric_value(text, "router_grpc_held_bytes")
            # Meanwhile another user's session through the same replica is served.
            args = ["--router-address", a.address, "--workflow-id", WF, "--tls=false"]
            alice = SIGNER.token("alice", workflows=[WF])
            await asyncio.to_thread(exec_served, *args, "--token", alice)
            return sum(sent), counted
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await channel.close(None)

    taken, counted = asyncio.run(asyncio.wait_for(main(), 90))
    grown = (rss_kib(a.pid) - before) // 1024
    # Per relayed session at most its message in flight outside the budget (docs/security.md).
    assert grown < 96, f"A grew by {grown} MiB for {taken} MiB taken in {SESSIONS} relayed sessions"
    assert counted > 0, "A's relay queues are not counted in any budget"
