"""Limits and session-key rules against a real JWT router, driven by raw gRPC calls.

Each limit must answer with its status and a message, and must not touch anything else: an
established session keeps working and the router serves new sessions once the pressure is gone.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from tests.harness import AgentProc, Proc, Router, client_cmd, run_client
from tests.raw_grpc import (
    ALL_METHODS,
    CONNECT,
    EXEC,
    REGISTER,
    RawCall,
    connect_init,
    exchange,
    exec_init,
    frame,
    hello,
    raw_channel,
    wait_metric,
)
from tests.security_kit import Signer

SIGNER = Signer.rs256()
WF = "wf-limits"
EMPTY_WF = "wf-without-agent"
AGENT_TOKEN = SIGNER.token("pod-1", workflows=[WF, "wf-a"], role="agent")


def user(name: str = "alice", workflows: list[str] | None = None) -> str:
    """A valid user token."""
    return SIGNER.token(name, workflows=workflows or ["*"])


def jwt_router(directory: Path, *flags: str) -> Router:
    """A plaintext router (loopback) that verifies RS256 tokens of SIGNER."""
    key = directory / "jwt.pub.pem"
    key.write_bytes(SIGNER.public_pem())
    return Router("--tls-enabled=false", "--auth=jwt", "--jwt-public-key", str(key), *flags, secure=True)


def new_key() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    router = jwt_router(tmp_path_factory.mktemp("limits"), "--init-timeout", "1s")
    agent = AgentProc(router.address, WF, "--token", AGENT_TOKEN)
    yield router
    agent.stop()
    router.stop()


@pytest_asyncio.fixture
async def channel(shared: Router) -> AsyncIterator[grpc.aio.Channel]:
    ch = raw_channel(shared.address)
    yield ch
    await ch.close()


@pytest.mark.asyncio
async def test_streams_that_send_nothing_are_cut_off_at_the_init_deadline(
    shared: Router, channel: grpc.aio.Channel
) -> None:
    async def silent(method: str) -> tuple[grpc.StatusCode, str, float]:
        token = AGENT_TOKEN if method in (REGISTER, CONNECT) else user()
        call = RawCall(channel, method, token)
        started = time.monotonic()
        outcome = await call.finish(half_close=False)
        return outcome.code, outcome.details, time.monotonic() - started

    results = await asyncio.gather(*(silent(m) for m in ALL_METHODS), silent(EXEC))
    for code, details, elapsed in results:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert "within" in details or "deadline" in details
        assert 0.9 <= elapsed < 10


@pytest.mark.asyncio
async def test_over_long_and_malformed_ids_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    long = "x" * 257
    cases = [
        (EXEC, user(), exec_init(long)),
        (EXEC, user(), exec_init(WF, task=long)),
        (EXEC, user(), exec_init(WF, key=long)),
        (EXEC, user(), exec_init("wf\n\x00evil")),
        (REGISTER, AGENT_TOKEN, hello(WF, agent_id=long)),
        (REGISTER, AGENT_TOKEN, hello(long)),
        (CONNECT, AGENT_TOKEN, connect_init(WF, long)),
        (CONNECT, AGENT_TOKEN, connect_init(WF, new_key(), agent_id=long)),
    ]
    outcomes = await asyncio.gather(*(exchange(channel, m, t, msg) for m, t, msg in cases))
    for outcome in outcomes:
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert "longer than 256" in outcome.details or "control characters" in outcome.details


@pytest.mark.asyncio
async def test_session_keys_are_single_use(shared: Router, channel: grpc.aio.Channel) -> None:
    key = new_key()
    first = RawCall(channel, EXEC, user())
    await first.send(exec_init(WF, ["cat"], key=key))
    ready = await first.read()
    assert ready is not None and ready[:1] == b"\x0a"  # SessionReady: the agent joined
    try:
        again = await exchange(channel, EXEC, user("mallory"), exec_init(WF, key=key))
        assert again.code == grpc.StatusCode.ALREADY_EXISTS, again
        agent_again = await exchange(channel, CONNECT, AGENT_TOKEN, connect_init(WF, key))
        assert agent_again.code == grpc.StatusCode.ALREADY_EXISTS, agent_again
        # The first session is untouched by both attempts.
        await first.send(frame(data=b"still mine"))
        echoed = await first.read()
        assert echoed is not None and b"still mine" in echoed
    finally:
        first.cancel()
    await wait_metric(shared, "router_grpc_sessions_active", 0)


@pytest.mark.asyncio
async def test_orchestrator_key_is_honoured_only_for_its_workflow(shared: Router, channel: grpc.aio.Channel) -> None:
    key = new_key()
    # The orchestrator told an agent of wf-a to present the key: its Connect arrives first and waits.
    agent = RawCall(channel, CONNECT, AGENT_TOKEN)
    await agent.send(connect_init("wf-a", key))
    await wait_metric(shared, "router_grpc_rendezvous_pending", 1)
    try:
        # The same key in wf-b is another session of wf-b's key space: it waits for wf-b's agent and
        # never meets (nor learns of) wf-a's.
        other = RawCall(channel, EXEC, user())
        await other.send(exec_init("wf-b", key=key))
        await wait_metric(shared, "router_grpc_rendezvous_pending", 2)
        other.cancel()
        await wait_metric(shared, "router_grpc_rendezvous_pending", 1)
        no_access = await exchange(channel, EXEC, user("bob", ["wf-b"]), exec_init("wf-a", key=key))
        assert no_access.code == grpc.StatusCode.PERMISSION_DENIED and "no access" in no_access.details
        client = RawCall(channel, EXEC, user())
        await client.send(exec_init("wf-a", ["true"], key=key))
        ready, opened = await asyncio.gather(client.read(), agent.read())
        assert ready is not None and ready[:1] == b"\x0a"
        assert opened is not None and opened[:1] == b"\x0a"  # SessionOpen reached the agent
        client.cancel()
    finally:
        agent.cancel()
    await wait_metric(shared, "router_grpc_rendezvous_pending", 0)
    await wait_metric(shared, "router_grpc_sessions_active", 0)


def _long_running_exec(router: Router) -> Proc:
    """A CLI exec session running `cat`, fed through a pipe."""
    args = ["--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", user("carol")]
    return Proc(client_cmd("exec", *args, "--", "cat"), stdin=subprocess.PIPE)


def _ping(session: Proc, text: str) -> None:
    assert session.popen.stdin is not None
    session.popen.stdin.write(text.encode() + b"\n")
    session.popen.stdin.flush()
    session.wait_for(lambda r: r["line"] == text, stdout=True)


@pytest.mark.asyncio
async def test_rendezvous_flood_hits_the_pending_limit_and_spares_established_sessions(tmp_path: Path) -> None:
    router = jwt_router(tmp_path, "--max-pending-rendezvous", "5")
    agent = AgentProc(router.address, WF, "--token", AGENT_TOKEN)
    established = _long_running_exec(router)
    channel = raw_channel(router.address)
    waiting: list[RawCall] = []
    try:
        _ping(established, "before the flood")
        for _ in range(5):  # orchestrator keys no agent will ever present
            call = RawCall(channel, EXEC, user())
            await call.send(exec_init(EMPTY_WF, key=new_key()))
            waiting.append(call)
        await wait_metric(router, "router_grpc_rendezvous_pending", 5)
        flood = [exchange(channel, EXEC, user(), exec_init(EMPTY_WF, key=new_key())) for _ in range(10)]
        flood += [exchange(channel, CONNECT, AGENT_TOKEN, connect_init(WF, new_key())) for _ in range(5)]
        for outcome in await asyncio.gather(*flood):
            assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
            assert "too many sessions waiting for rendezvous (limit 5)" in outcome.details
        _ping(established, "during the flood")
        for call in waiting:
            call.cancel()
        await wait_metric(router, "router_grpc_rendezvous_pending", 0)
        result = run_client(
            "exec", "--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", user(), "--",
            "echo", "after the flood",
        )  # fmt: skip
        assert result.returncode == 0 and result.stdout == b"after the flood\n", result.stderr
        _ping(established, "after the flood")
        assert established.popen.stdin is not None
        established.popen.stdin.close()
        assert established.wait_exit(30) == 0
    finally:
        await channel.close()
        established.stop()
        agent.stop()
        router.stop()


@pytest.mark.asyncio
async def test_per_user_and_per_router_session_limits(tmp_path: Path) -> None:
    router = jwt_router(tmp_path, "--max-sessions-per-user", "2", "--max-sessions", "3")
    channel = raw_channel(router.address)
    held: list[RawCall] = []

    async def hold(name: str) -> None:
        call = RawCall(channel, EXEC, user(name))
        await call.send(exec_init(EMPTY_WF, key=new_key()))
        held.append(call)

    try:
        await hold("alice")
        await hold("alice")
        await wait_metric(router, "router_grpc_rendezvous_pending", 2)
        third = await exchange(channel, EXEC, user("alice"), exec_init(EMPTY_WF, key=new_key()))
        assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "user alice holds its maximum of 2 sessions" in third.details
        # port-forward to a workflow whose agent is there says the limit is why, not that no agent could
        # be reached (a helper's report, 2026-12-02).
        agent = AgentProc(router.address, WF, "--token", AGENT_TOKEN)
        try:
            forward = await asyncio.to_thread(
                run_client,
                "port-forward", "--router-address", router.address, "--workflow-id", WF, "--tls=false",
                "--token", user("alice"), ":9",
            )  # fmt: skip
        finally:
            agent.stop()
        assert forward.returncode == 255, forward.stderr
        assert b"cannot forward" in forward.stderr and b"cannot reach" not in forward.stderr, forward.stderr
        await hold("bob")
        await wait_metric(router, "router_grpc_rendezvous_pending", 3)
        fourth = await exchange(channel, EXEC, user("carol"), exec_init(EMPTY_WF, key=new_key()))
        assert fourth.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "router holds its maximum of 3 sessions" in fourth.details
        for call in held:
            call.cancel()
        await wait_metric(router, "router_grpc_rendezvous_pending", 0)
        await hold("alice")  # the slots came back
        await wait_metric(router, "router_grpc_rendezvous_pending", 1)
    finally:
        for call in held:
            call.cancel()
        await channel.close()
        router.stop()


@pytest.mark.asyncio
async def test_oversized_messages_are_resource_exhausted(tmp_path: Path) -> None:
    limit = 2 * 1024 * 1024
    router = jwt_router(tmp_path, "--max-message-size", str(limit))
    agent = AgentProc(router.address, WF, "--token", AGENT_TOKEN)
    channel = raw_channel(router.address)
    try:
        huge_init = await exchange(channel, EXEC, user(), exec_init(WF, ["x" * (limit + 10)]))
        assert huge_init.code == grpc.StatusCode.RESOURCE_EXHAUSTED, huge_init
        session = RawCall(channel, EXEC, user())
        await session.send(exec_init(WF, ["cat"]))
        assert await session.read() is not None
        await session.send(frame(data=b"small"))
        echoed = await session.read()
        assert echoed is not None and b"small" in echoed
        await session.send(frame(data=b"x" * (limit + 1)))
        outcome = await session.finish()
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        assert "larger than max" in outcome.details
        await wait_metric(router, "router_grpc_sessions_active", 0)
        result = run_client(
            "exec", "--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", user(), "--",
            "echo", "unharmed",
        )  # fmt: skip
        assert result.returncode == 0 and result.stdout == b"unharmed\n", result.stderr
    finally:
        await channel.close()
        agent.stop()
        router.stop()
