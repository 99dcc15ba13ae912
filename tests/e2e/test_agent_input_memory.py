"""A user whose resumable sessions flood input at commands that never read it cannot fill the agent.

The agent's resumable stream takes the client's frames off the stream at once (so acknowledgements
never wait behind data) and queues what the command has not read. That queue was bounded only per
session, by twice the window the client claims (ResumeToken.window_bytes, believed up to 64 MiB:
129 MiB a session), so one user's sessions grew the agent without bound (4 sessions: +525 MiB,
agent/held_sessions.py INPUT_USER_BYTES). Now a user's queued input is bounded (64 MiB) and a session that
passes it ends RESOURCE_EXHAUSTED with its queue dropped, while another user's session is served.
Real router and agent; mallory is a raw gRPC client, alice the real CLI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from osmo_router.wire.protocol import pb
from tests.e2e.test_memory_idle import rss_kib
from tests.harness import AgentProc, Router, metric_value, run_client
from tests.raw_grpc import EXEC, RawCall, frame, raw_channel
from tests.security_kit import Signer, jwt_router

WF = "wf-input-memory"
SESSIONS = 6
CHUNK = 1024 * 1024
#: What the agent may grow by: her 64 MiB of queued input, the frames in flight (stream windows,
#: the message being parsed) and the allocator. Before: about 131 MiB per session (6: ~790 MiB).
GROWTH_BOUND = 160 * 1024 * 1024
WAIT = 60.0


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    return rss_kib(pid) * 1024


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Router, AgentProc, Signer]]:
    signer = Signer.rs256()
    router = jwt_router(tmp_path, signer, "--flow-control-timeout", "300s")
    agent = AgentProc(router.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
    try:
        yield router, agent, signer
    finally:
        agent.stop()
        router.stop()


async def flood(call: RawCall, peak: list[int], pid: int) -> None:
    """Push 1 MiB frames until the call refuses a write (the session ended)."""
    payload = frame(data=b"x" * CHUNK)
    while await call.send(payload):
        peak[0] = max(peak[0], rss(pid))


@pytest.mark.asyncio
async def test_a_users_unread_input_is_bounded_and_another_user_is_served(
    setup: tuple[Router, AgentProc, Signer],
) -> None:
    router, agent, signer = setup
    token = signer.token("mallory", workflows=[WF])
    channel = raw_channel(router.address)
    fresh = rss(agent.pid)
    peak = [fresh]
    try:
        calls = []
        for _ in range(SESSIONS):
            # A resumable session that claims the largest window the agent believes.
            resume = pb.ResumeToken(secret="m" * 32, window_bytes=64 * CHUNK)
            target = pb.SessionTarget(workflow_id=WF, resume=resume)
            init = pb.ExecRequest(init=pb.ExecInit(target=target, command=["sleep", "300"]))
            call = RawCall(channel, EXEC, token)
            assert await call.send(init.SerializeToString())
            assert await call.read() is not None  # the agent's Resume: the session is held
            calls.append(call)
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(flood(call, peak, agent.pid) for call in calls))
        outcomes = [await call.finish(half_close=False) for call in calls]
        grown = peak[0] - fresh
        assert grown < GROWTH_BOUND, f"the agent grew by {grown >> 20} MiB"
        for outcome in outcomes:
            assert outcome.code != grpc.StatusCode.OK, outcome
        # Another user's session on the same agent is served.
        flags = ["--router-address", router.address, "--workflow-id", WF, "--tls=false"]
        result = run_client("exec", *flags, "--token", signer.token("alice", workflows=[WF]), "--", "cat",
                            input=b"a" * CHUNK * 4)  # fmt: skip
        assert (result.returncode, len(result.stdout)) == (0, CHUNK * 4), result.stderr[-300:]
        lost = [r for r in agent.events() if "bytes of input not yet read for mallory" in str(r.get("msg"))]
        assert lost, "no session of mallory's was ended by the agent's input budget"
    finally:
        await channel.close()


@pytest.mark.asyncio
async def test_a_user_whose_sessions_never_acknowledge_leaves_the_replay_total_to_others(tmp_path: Path) -> None:
    """One user's held sessions take at most a quarter of --replay-total-bytes (agent/held_sessions.py): before,
    her sessions that never acknowledged filled all of it, and another user's session then had room for
    one frame per acknowledgement (64 MB of output: 0.7 s quiet, not done in 120 s)."""
    signer = Signer.rs256()
    router = jwt_router(tmp_path, signer, "--flow-control-timeout", "300s")
    agent_token = signer.token("pod", workflows=[WF], role="agent")
    agent = AgentProc(router.address, WF, "--token", agent_token, "--replay-total-bytes", str(64 * CHUNK))
    channel = raw_channel(router.address)
    token = signer.token("mallory", workflows=[WF])
    calls = []
    try:
        for _ in range(12):  # 12 x 16 MiB of replay buffers: three times the total
            resume = pb.ResumeToken(secret="m" * 32, window_bytes=16 * CHUNK)
            target = pb.SessionTarget(workflow_id=WF, resume=resume)
            init = pb.ExecRequest(init=pb.ExecInit(target=target, command=["cat", "/dev/zero"]))
            call = RawCall(channel, EXEC, token)
            assert await call.send(init.SerializeToString())
            calls.append(call)  # it never reads, so it never acknowledges
        flags = ["--router-address", router.address, "--workflow-id", WF, "--tls=false"]
        alice = signer.token("alice", workflows=[WF])
        result = await asyncio.to_thread(
            run_client, "exec", *flags, "--token", alice, "--", "head", "-c", str(64 * CHUNK), "/dev/zero",
            timeout=WAIT,
        )  # fmt: skip
        assert (result.returncode, len(result.stdout)) == (0, 64 * CHUNK), result.stderr[-300:]
        # What mallory's buffers hold, as the agent reports it (every few seconds): her share (16 MiB,
        # the session buffer's size) and one frame per session that an empty buffer always takes. All of
        # the total before (64 MiB). A report from before alice's session ended still counts hers too, so
        # the bound is awaited (bounded): mallory's stalled sessions never give back what they hold.
        bound = 16 * CHUNK + 12 * CHUNK
        deadline = asyncio.get_running_loop().time() + WAIT
        held = 0.0
        while not 0 < held <= bound and asyncio.get_running_loop().time() < deadline:
            held = metric_value(router.metrics_text(), "router_grpc_replay_buffer_bytes")
            await asyncio.sleep(0.2)  # (the agent's report comes every few seconds: polled, bounded)
        assert 0 < held <= bound, f"mallory's buffers hold {int(held) >> 20} MiB"
    finally:
        for call in calls:
            call.cancel()
        await channel.close()
        agent.stop()
        router.stop()
