"""Floods of pending sessions from one identity: other users still pair, nothing pending outlives its socket.

Real JWT router and agent processes on loopback. The router-wide pending limit is set low (40) so
that, without the per-identity limit (20), each flood alone would fill it and refuse everyone. The
floods: one agent token's `Connect` streams with made-up session keys, and one user's WebSocket
connect-and-close requests with `?timeout=3600`, on the client and the backend endpoints.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from tests.harness import AgentProc, Proc, Router, cli_env, client_cmd, run_client
from tests.raw_grpc import CONNECT, RawCall, connect_init, exchange, raw_channel, wait_metric
from tests.security_kit import Signer, jwt_router
from tests.ws_kit import ws_url

WF = "wf-pending"
#: A workflow no agent serves: a client with an orchestrator's key waits there for its backend.
EMPTY_WF = "wf-pending-empty"
#: The workflow whose sessions a user drops before the agent answers.
DROPPED_WF = "wf-pending-dropped"
PER_IDENTITY = 20
ROUTER_WIDE = 40
FLOOD = 30
PENDING = "router_grpc_rendezvous_pending"
SIGNER = Signer.rs256()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    proc = jwt_router(
        tmp_path, SIGNER, "--max-pending-per-identity", str(PER_IDENTITY), "--max-pending-rendezvous", str(ROUTER_WIDE)
    )
    agent = AgentProc(proc.address, WF, "--token", SIGNER.token("pod", workflows=[WF], role="agent"))
    try:
        yield proc
    finally:
        agent.stop()
        proc.stop()


def _alice_pairs(router: Router, text: str) -> None:
    """Another user's session still pairs with the real agent and runs."""
    alice = SIGNER.token("alice", workflows=[WF])
    result = run_client(
        "exec", "--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", alice, "--",
        "echo", text,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, f"{text}\n".encode()), result.stderr[-300:]


@pytest.mark.asyncio
async def test_one_agent_identitys_made_up_keys_fill_only_its_own_share(router: Router) -> None:
    evil = SIGNER.token("pod-evil", workflows=[WF], role="agent")
    channel = raw_channel(router.address)
    held: list[RawCall] = []
    try:
        for _ in range(PER_IDENTITY):
            call = RawCall(channel, CONNECT, evil)
            await call.send(connect_init(WF, secrets.token_urlsafe(16), agent_id="evil"))
            held.append(call)
        await wait_metric(router, PENDING, PER_IDENTITY)
        refused = await asyncio.gather(
            *(exchange(channel, CONNECT, evil, connect_init(WF, secrets.token_urlsafe(16))) for _ in range(FLOOD))
        )
        for outcome in refused:
            assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
            assert f"pod-evil keeps its maximum of {PER_IDENTITY} sessions waiting" in outcome.details, outcome
        await asyncio.to_thread(_alice_pairs, router, "during the agent flood")
        # Every pending session ends with its stream: the attacker's channel goes away.
        await channel.close()
        await wait_metric(router, PENDING, 0)
        await asyncio.to_thread(_alice_pairs, router, "after the agent flood")
    finally:
        await channel.close()


async def _ws_flood(
    session: aiohttp.ClientSession, router: Router, side: str
) -> tuple[list[aiohttp.ClientWebSocketResponse], list[int]]:
    """FLOOD WebSocket upgrades of one side with made-up keys: (the accepted sockets, refusal statuses)."""
    accepted: list[aiohttp.ClientWebSocketResponse] = []
    refused: list[int] = []
    for _ in range(FLOOD):
        workflow = EMPTY_WF if side == "client" else WF
        url = ws_url(router, "portforward", workflow, side, secrets.token_urlsafe(16), "timeout=3600&port=8000")
        try:
            accepted.append(await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5)))
        except aiohttp.WSServerHandshakeError as err:
            refused.append(err.status)
    return accepted, refused


async def _refusals_on_open(sockets: list[aiohttp.ClientWebSocketResponse]) -> int:
    """How many of the accepted sockets the router closed at once (a refusal after the upgrade)."""
    closed = 0
    for ws in sockets:
        try:
            msg = await ws.receive(timeout=0.2)
        except TimeoutError:
            continue
        closed += msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    return closed


@pytest.mark.asyncio
@pytest.mark.parametrize("side", ["client", "backend"])
async def test_websocket_connect_and_close_leaves_nothing_pending(router: Router, side: str) -> None:
    token = SIGNER.token("mallory", workflows=[WF, EMPTY_WF], role="agent" if side == "backend" else "user")
    session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    try:
        sockets, refused_statuses = await _ws_flood(session, router, side)
        # At most her share waits; the others were refused (before or right after the upgrade).
        await wait_metric(router, PENDING, PER_IDENTITY)
        refused = len(refused_statuses) + await _refusals_on_open(sockets)
        assert refused == FLOOD - PER_IDENTITY, (refused_statuses, refused)
        await asyncio.to_thread(_alice_pairs, router, f"during the {side} flood")
        # Connect-and-close: the attacker's sockets go away, and so does every pending session.
        for ws in sockets:
            await ws.close()
        await wait_metric(router, PENDING, 0)
        await asyncio.to_thread(_alice_pairs, router, f"after the {side} flood")
    finally:
        for ws in sockets:
            await ws.close()
        await session.close()


@pytest.mark.asyncio
async def test_sessions_dropped_before_their_agent_joined_leave_nothing_pending(router: Router) -> None:
    """A user who opens sessions and drops them before the agent answers: the agent's Connects that
    follow are refused at once (they used to open new sessions, pending for the rendezvous timeout and
    counted against the agent, so a loop of them filled the router's pending sessions for everybody)."""
    token = SIGNER.token("pod-2", workflows=[DROPPED_WF], role="agent")
    # No standby streams: every session is asked of the agent (a SessionRequest), none pairs at once.
    agent = AgentProc(router.address, DROPPED_WF, "--token", token, "--standby-streams", "0")
    mallory = SIGNER.token("mallory", workflows=[DROPPED_WF])
    args = ["--router-address", router.address, "--workflow-id", DROPPED_WF, "--tls=false", "--token", mallory]
    dropped = 5
    agent.signal(signal.SIGSTOP)  # the session requests wait in its socket: each client stays pending
    clients: list[Proc] = []
    try:
        clients = [Proc(client_cmd("exec", *args, "--", "true"), env=cli_env()) for _ in range(dropped)]
        await wait_metric(router, PENDING, dropped)
        for client in clients:
            client.stop()
        await wait_metric(router, PENDING, 0)
    finally:
        agent.signal(signal.SIGCONT)
        for client in clients:
            client.stop()

    def refused(record: dict[str, object]) -> bool:
        return "the client left before the agent joined" in str(record.get("msg", ""))

    try:
        # Every request is answered by a Connect, and each is refused: nothing waits for a client.
        agent.wait_for(lambda _: len([r for r in agent.events() if refused(r)]) == dropped)
        await wait_metric(router, PENDING, 0)
        await asyncio.to_thread(_alice_pairs, router, "after the dropped sessions")
    finally:
        agent.stop()
