"""Standby Connect streams: parked ahead of sessions, taken by a session with no SessionRequest round trip.

Real router and agent processes on loopback; raw gRPC calls play a hostile or scripted agent where a
test needs to see exactly what the router sends (or refuses) on each stream.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from osmo_router.wire.protocol import MAX_STANDBY_STREAMS, pb
from tests.harness import AgentProc, Proc, Router, client_cmd, metric_value, run_client
from tests.raw_grpc import CONNECT, EXEC, REGISTER, RawCall, exec_init, frame, hello, raw_channel, wait_metric
from tests.security_kit import Signer

PARKED = "router_grpc_standby_streams"
USED = "router_grpc_standby_sessions_total"
ACTIVE = "router_grpc_sessions_active"


def standby_init(workflow: str, agent_id: str = "raw-agent", task: str = "", key: str = "") -> bytes:
    """An encoded ConnectRequest init of a standby stream."""
    init = pb.ConnectInit(workflow_id=workflow, agent_id=agent_id, task=task, session_key=key, standby=True)
    return pb.ConnectRequest(init=init).SerializeToString()


def client_args(router: Router, workflow: str) -> list[str]:
    return ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]


def metric(router: Router, name: str, labels: dict[str, str] | None = None) -> float:
    return metric_value(router.metrics_text(), name, labels)


def wait_value(router: Router, name: str, value: float, labels: dict[str, str] | None = None) -> None:
    asyncio.run(wait_metric(router, name, value, labels))


@pytest.fixture
def wf() -> str:
    return f"wf-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def router() -> Iterator[Router]:
    proc = Router()
    yield proc
    proc.stop()


class RawAgent:
    """A scripted agent: a Register stream and standby streams, all raw calls on one channel."""

    def __init__(self, address: str, workflow: str, agent_id: str = "raw-agent", token: str | None = None) -> None:
        self.channel = raw_channel(address)
        self.workflow = workflow
        self.agent_id = agent_id
        self.token = token
        self.register = RawCall(self.channel, REGISTER, token)

    async def start(self) -> None:
        await self.register.send(hello(self.workflow, self.agent_id))
        first = pb.RegisterResponse.FromString(await self.register.read() or b"")
        assert first.WhichOneof("kind") == "registered"

    async def standby(self, **init: str) -> RawCall:
        call = RawCall(self.channel, CONNECT, self.token)
        fields = {"agent_id": self.agent_id, **init}
        assert await call.send(standby_init(self.workflow, **fields))
        return call

    async def close(self) -> None:
        self.register.cancel()
        await self.channel.close()


# --- the real agent -------------------------------------------------------------------------------


def test_session_takes_a_standby_stream_and_the_agent_replaces_it(router: Router, wf: str) -> None:
    agent = AgentProc(router.address, wf, "--log-level", "debug")
    try:
        wait_value(router, PARKED, 2)  # the default pool
        assert metric(router, ACTIVE, {"operation": "exec"}) == 0  # parked streams are no sessions
        assert metric(router, "router_grpc_rendezvous_pending") == 0

        script = "echo to-out; echo to-err >&2; exit 7"
        result = run_client("exec", *client_args(router, wf), "--", "sh", "-c", script)
        assert (result.returncode, result.stdout, result.stderr) == (7, b"to-out\n", b"to-err\n")
        assert metric(router, USED, {"operation": "exec"}) == 1
        agent.wait_event("standby session")

        # stdin through a standby stream, with EOF; and a signal's exit status.
        result = run_client("exec", *client_args(router, wf), "--", "wc", "-c", input=b"x" * 100_000)
        assert (result.returncode, result.stdout.strip()) == (0, b"100000")
        result = run_client("exec", *client_args(router, wf), "--", "sh", "-c", "kill -TERM $$")
        assert result.returncode == 128 + signal.SIGTERM
        assert metric(router, USED, {"operation": "exec"}) == 3

        # The agent replaced every stream a session took.
        wait_value(router, PARKED, 2)
        assert metric(router, ACTIVE, {"operation": "exec"}) == 0
    finally:
        agent.stop()


def test_port_forward_and_long_session_on_standby_streams(router: Router, wf: str) -> None:
    agent = AgentProc(router.address, wf)
    client = Proc(client_cmd("exec", *client_args(router, wf), "--", "sh", "-c", "echo started; sleep 30"))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        # One session holds a standby stream; the pool is full again meanwhile.
        wait_value(router, PARKED, 2)
        assert metric(router, ACTIVE, {"operation": "exec"}) == 1
        assert metric(router, USED, {"operation": "exec"}) == 1
    finally:
        client.stop()
        agent.stop()


def test_no_standby_streams_falls_back_to_session_requests(router: Router, wf: str) -> None:
    agent = AgentProc(router.address, wf, "--standby-streams", "0")
    try:
        result = run_client("exec", *client_args(router, wf), "--", "sh", "-c", "echo fallback; exit 4")
        assert (result.returncode, result.stdout) == (4, b"fallback\n")
        assert metric(router, PARKED) == 0
        assert metric(router, USED, {"operation": "exec"}) == 0
        assert metric(router, "router_grpc_sessions_total", {"operation": "exec"}) == 1
    finally:
        agent.stop()


def test_standby_streams_from_the_environment(router: Router, wf: str) -> None:
    agent = AgentProc(router.address, wf, env={"OSMO_STANDBY_STREAMS": "5"})
    try:
        wait_value(router, PARKED, 5)
    finally:
        agent.stop()


def test_killed_agent_leaves_no_parked_stream(router: Router, wf: str) -> None:
    agent = AgentProc(router.address, wf)
    try:
        wait_value(router, PARKED, 2)
        agent.signal(signal.SIGKILL)
        agent.wait_exit()
        wait_value(router, PARKED, 0)
        wait_value(router, "router_grpc_agents_registered", 0)
    finally:
        agent.stop()


def test_agent_reparks_after_a_router_restart(wf: str) -> None:
    first = Router()
    port = first.port
    agent = AgentProc(first.address, wf)
    second = None
    try:
        wait_value(first, PARKED, 2)
        first.signal(signal.SIGKILL)
        first.wait_exit()
        second = Router("--port", str(port))
        wait_value(second, PARKED, 2)
        result = run_client("exec", *client_args(second, wf), "--", "echo", "again")
        assert (result.returncode, result.stdout) == (0, b"again\n")
        assert metric(second, USED, {"operation": "exec"}) == 1
    finally:
        agent.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_sigterm_with_parked_streams_exits_within_the_drain_timeout(wf: str) -> None:
    router = Router("--drain-timeout", "10s")
    agent = AgentProc(router.address, wf)
    try:
        wait_value(router, PARKED, 2)
        started = time.monotonic()
        router.signal(signal.SIGTERM)
        assert router.wait_exit(20) == 0
        # Parked streams are ended at once: they hold nothing up (the drain timeout is 10s).
        assert time.monotonic() - started < 5
    finally:
        agent.stop()
        router.stop()


def test_websocket_client_takes_a_standby_stream(router: Router, wf: str) -> None:
    agent = AgentProc(router.address, wf)
    try:
        wait_value(router, PARKED, 2)
        ws = ["--ws-address", f"127.0.0.1:{router.ws_port}", "--transport", "ws"]
        result = run_client("exec", *client_args(router, wf), *ws, "--", "echo", "over-ws")
        assert (result.returncode, result.stdout) == (0, b"over-ws\n"), result.stderr
        assert metric(router, USED, {"operation": "exec"}) == 1
    finally:
        agent.stop()


# --- a scripted agent ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_router_opens_the_session_on_a_parked_stream(router: Router, wf: str) -> None:
    agent = RawAgent(router.address, wf)
    client_channel = raw_channel(router.address)
    try:
        await agent.start()
        first, second = await agent.standby(), await agent.standby()
        await wait_metric(router, PARKED, 2)
        assert metric(router, ACTIVE, {"operation": "exec"}) == 0

        client = RawCall(client_channel, EXEC, None)
        assert await client.send(exec_init(wf, ["echo"]))
        ready = pb.ExecResponse.FromString(await client.read() or b"")
        assert ready.WhichOneof("kind") == "ready"
        # The oldest parked stream gets the SessionOpen; no SessionRequest on Register.
        opened = pb.ConnectResponse.FromString(await first.read() or b"")
        assert opened.WhichOneof("kind") == "open"
        assert opened.open.session_key == ready.ready.session_key
        assert list(opened.open.exec.command) == ["echo"]
        await wait_metric(router, PARKED, 1)  # down...
        await wait_metric(router, ACTIVE, 1, {"operation": "exec"})

        third = await agent.standby()  # ...and back up as the agent replaces it
        await wait_metric(router, PARKED, 2)

        assert await first.send(frame(data=b"hi\n"), frame(exit_status=pb.ExitStatus(code=0)), frame(half_close={}))
        end = await first.finish()
        assert end.code == grpc.StatusCode.OK
        got = pb.ExecResponse.FromString(await client.read() or b"")
        assert got.frame.data == b"hi\n"
        assert await client.send(frame(half_close={}))
        assert (await client.finish()).code == grpc.StatusCode.OK
        await wait_metric(router, ACTIVE, 0, {"operation": "exec"})
        assert metric(router, USED, {"operation": "exec"}) == 1

        # The agent closing a parked stream takes it out of the pool.
        assert (await second.finish()).code == grpc.StatusCode.OK
        await wait_metric(router, PARKED, 1)
        # Its Register stream ending ends the rest, cleanly (status OK, no SessionOpen).
        agent.register.cancel()
        outcome = await third.finish(half_close=False)
        assert (outcome.code, outcome.responses) == (grpc.StatusCode.OK, [])
        await wait_metric(router, PARKED, 0)
    finally:
        await agent.close()
        await client_channel.close()


@pytest.mark.asyncio
async def test_parked_streams_per_agent_are_capped(router: Router, wf: str) -> None:
    hostile = RawAgent(router.address, wf)
    real = AgentProc(router.address, f"{wf}-real")
    try:
        await hostile.start()
        calls = [await hostile.standby() for _ in range(20)]
        await wait_metric(router, PARKED, MAX_STANDBY_STREAMS + 2)  # + the real agent's two
        refused = []
        for call in calls[MAX_STANDBY_STREAMS:]:
            outcome = await call.finish(half_close=False, timeout=10)
            refused.append(outcome.code)
        assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * (20 - MAX_STANDBY_STREAMS)
        assert "maximum of 8 standby streams" in outcome.details
        assert metric(router, ACTIVE, {"operation": "exec"}) == 0
        assert metric(router, "router_grpc_rendezvous_pending") == 0

        # The router still serves a normal session, for another agent and for the hostile one's workflow.
        result = run_client("exec", *client_args(router, f"{wf}-real"), "--", "echo", "still-served")
        assert (result.returncode, result.stdout) == (0, b"still-served\n")
        channel = raw_channel(router.address)
        client = RawCall(channel, EXEC, None)
        assert await client.send(exec_init(wf, ["true"]))
        assert pb.ExecResponse.FromString(await client.read() or b"").WhichOneof("kind") == "ready"
        client.cancel()
        await channel.close()
    finally:
        await hostile.close()
        real.stop()


@pytest.mark.asyncio
async def test_standby_streams_need_a_registration_of_the_same_agent(router: Router, wf: str) -> None:
    agent = RawAgent(router.address, wf)
    try:
        # No registration yet.
        outcome = await (await agent.standby()).finish(half_close=False)
        assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION, outcome
        await agent.start()
        # Another agent id, another task, a session key: refused.
        for init, code in (
            ({"agent_id": "someone-else"}, grpc.StatusCode.FAILED_PRECONDITION),
            ({"task": "t1"}, grpc.StatusCode.FAILED_PRECONDITION),
            ({"key": "k" * 22}, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            outcome = await (await agent.standby(**init)).finish(half_close=False)
            assert outcome.code == code, (init, outcome)
        # Sending a frame while parked is a protocol error.
        call = await agent.standby()
        await wait_metric(router, PARKED, 1)
        assert await call.send(frame(data=b"too early"))
        outcome = await call.finish(half_close=False)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        await wait_metric(router, PARKED, 0)
    finally:
        await agent.close()


@pytest.mark.asyncio
async def test_standby_streams_carry_the_agent_credentials(tmp_path: Path, wf: str) -> None:
    signer = Signer.rs256()
    key = tmp_path / "jwt.pub.pem"
    key.write_bytes(signer.public_pem())
    router = Router("--tls-enabled=false", "--auth=jwt", "--jwt-public-key", str(key), secure=True)
    agent_token = signer.token("pod-1", workflows=[wf], role="agent")
    agent = RawAgent(router.address, wf, token=agent_token)
    try:
        await agent.start()
        for token, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (signer.token("alice", workflows=["*"]), grpc.StatusCode.PERMISSION_DENIED),  # a user
            (signer.token("pod-2", workflows=["other"], role="agent"), grpc.StatusCode.PERMISSION_DENIED),
        ):
            call = RawCall(agent.channel, CONNECT, token)
            await call.send(standby_init(wf))
            outcome = await call.finish(half_close=False)
            assert outcome.code == code, (token, outcome)
        assert metric(router, PARKED) == 0
        await agent.standby()
        await wait_metric(router, PARKED, 1)
        # The real agent with its token parks its pool and serves sessions on it.
        real_token = signer.token("pod-3", workflows=[f"{wf}-real"], role="agent")
        real = AgentProc(router.address, f"{wf}-real", "--token", real_token)
        try:
            await wait_metric(router, PARKED, 3)
            user = signer.token("alice", workflows=[f"{wf}-real"])
            args = ["--router-address", router.address, "--workflow-id", f"{wf}-real", "--tls=false", "--token", user]
            result = await asyncio.to_thread(run_client, "exec", *args, "--", "echo", "authorized")
            assert (result.returncode, result.stdout) == (0, b"authorized\n"), result.stderr
            assert metric(router, USED, {"operation": "exec"}) == 1
        finally:
            real.stop()
    finally:
        await agent.close()
        router.stop()


# --- scale-out -------------------------------------------------------------------------------------


def test_a_session_through_another_replica_uses_the_owners_standby_stream(wf: str) -> None:
    from tests.redis_harness import RedisServer

    redis = RedisServer()
    secret = "peer-secret-for-tests-0123456789"
    procs: list[Proc] = []
    try:
        a = Router("--redis-url", redis.url, "--peer-secret", secret)
        procs.append(a)
        b = Router("--redis-url", redis.url, "--peer-secret", secret)
        procs.append(b)
        procs.append(AgentProc(a.address, wf))
        wait_value(a, PARKED, 2)
        result = run_client("exec", *client_args(b, wf), "--", "sh", "-c", "echo via-b; exit 3")
        assert (result.returncode, result.stdout) == (3, b"via-b\n"), result.stderr
        # A paired the relayed session on a parked stream; B parked nothing and paired nothing.
        assert metric(a, USED, {"operation": "exec"}) == 1
        assert metric(b, "router_grpc_sessions_total", {"operation": "exec"}) == 0
        wait_value(a, PARKED, 2)
        assert metric(b, PARKED) == 0

        # A standby stream that reaches a replica without the agent's registration is refused.
        async def stray() -> grpc.StatusCode:
            channel = raw_channel(b.address)
            call = RawCall(channel, CONNECT, None)
            await call.send(standby_init(wf))
            outcome = await call.finish(half_close=False)
            await channel.close()
            return outcome.code

        assert asyncio.run(stray()) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        for proc in procs:
            proc.stop()
        redis.stop()


@pytest.mark.asyncio
async def test_agents_killed_during_the_hand_over_leave_no_traceback_and_no_pending_task(wf: str) -> None:
    """50 times: a session takes a parked stream while the agent's connection is torn down.

    The "agent" is a scripted one whose whole channel is closed (its TCP connection reset, as when
    the process is killed) at the moment the client's init goes out, so the router's SessionOpen
    write races with the stream's end. The router must fail the session cleanly every time.
    """
    # A kill just before the hand-over leaves the session asking a registration that is gone: it
    # then waits out the rendezvous timeout, kept short here.
    router = Router("--rendezvous-timeout", "2s")
    client_channel = raw_channel(router.address)
    try:
        outcomes: list[grpc.StatusCode] = []
        for attempt in range(50):
            agent = RawAgent(router.address, wf, agent_id=f"victim-{attempt}")
            await agent.start()
            await agent.standby()
            await wait_metric(router, PARKED, 1)
            client = RawCall(client_channel, EXEC, None)
            # Both at once; a growing offset walks the kill across the hand-over window.
            kill = asyncio.create_task(_kill_after(agent, attempt % 10 * 0.0005))
            written = await client.send(exec_init(wf, ["cat"]), frame(half_close={}))
            await kill
            # No done_writing: a half-close of the call racing with its end is what grpc.aio reports
            # as INTERNAL on this side, whatever the router did.
            outcome = await client.finish(timeout=20, half_close=False)
            # A write of ours that met the end of the call (the router ended it first) is the same
            # client-side race: grpc.aio then reports INTERNAL instead of the router's status.
            outcomes.append(grpc.StatusCode.UNAVAILABLE if not written and outcome.code == INTERNAL else outcome.code)
            await wait_metric(router, PARKED, 0)
        assert set(outcomes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
        # Most kills land after the hand-over began: the session fails as the agent's, not by timeout.
        assert outcomes.count(grpc.StatusCode.UNAVAILABLE) >= 25, outcomes
        await wait_metric(router, ACTIVE, 0, {"operation": "exec"})
        assert metric(router, "router_grpc_rendezvous_pending") == 0
        healthy = AgentProc(router.address, wf)
        try:
            result = run_client("exec", *client_args(router, wf), "--", "echo", "still-serving")
            assert (result.returncode, result.stdout) == (0, b"still-serving\n"), result.stderr
        finally:
            healthy.stop()
    finally:
        await client_channel.close()
        router.stop()
    log = "\n".join(router.lines)
    for sign in ("Traceback", "Task was destroyed but it is pending", "ExecuteBatchError", "Exception in callback"):
        assert sign not in log, log[-3000:]


INTERNAL = grpc.StatusCode.INTERNAL


async def _kill_after(agent: RawAgent, delay: float) -> None:
    await asyncio.sleep(delay)  # the race's offset, not a synchronisation
    await agent.channel.close(grace=None)
