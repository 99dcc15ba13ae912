"""Agent identity end to end: a task's credential cannot be borrowed, and long-lived streams outlive no token.

A TLS+JWT router, a real agent for task t1 holding a token bound to t1, and an intruder holding a
valid agent token of the same workflow for task t2 (as code in another task of the workflow could
read one): it can neither register over t1, park standby streams on it, nor join t1's sessions.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from osmo_router.wire.protocol import pb
from tests.harness import AgentProc, Proc, Router, cli_env, client_cmd, metric_value, run_client
from tests.raw_grpc import CONNECT, REGISTER, RawCall
from tests.security_kit import Pki, Signer

WF = "wf-identity"
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Setup:
    pki: Pki
    signer: Signer
    router: Router

    def user_flags(self, *args: str) -> list[str]:
        token = self.signer.token("alice", workflows=[WF])
        flags = ["--router-address", self.router.address, "--workflow-id", WF, "--tls-ca", str(self.pki.ca)]
        return [*flags, "--token", token, *args]

    def agent(self, token: str, *args: str, wait: bool = True) -> AgentProc:
        tls = ("--tls-ca", str(self.pki.ca))
        return AgentProc(self.router.address, WF, *tls, "--token", token, *args, tls=True, wait=wait)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    pki = Pki.create(tmp_path)
    signer = Signer.rs256()
    key_file = tmp_path / "jwt.pub.pem"
    key_file.write_bytes(signer.public_pem())
    router = Router(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--auth=jwt", "--jwt-public-key", str(key_file), "--credential-recheck", "1s"),
        secure=True,
    )
    try:
        yield Setup(pki, signer, router)
    finally:
        router.stop()


async def _raw(setup: Setup, method: str, token: str, first: bytes) -> grpc.StatusCode:
    """Open a raw stream over TLS with `token`, send `first`, and return how the router ended it."""
    credentials = grpc.ssl_channel_credentials(root_certificates=setup.pki.ca.read_bytes())
    async with grpc.aio.secure_channel(setup.router.address, credentials) as channel:
        call = RawCall(channel, method, token)
        await call.send(first)
        outcome = await call.finish(half_close=False, timeout=15)
    return outcome.code


def _hello(task: str, agent_id: str) -> bytes:
    return pb.RegisterRequest(hello=pb.AgentHello(workflow_id=WF, task=task, agent_id=agent_id)).SerializeToString()


def _connect(task: str, agent_id: str, *, key: str = "", standby: bool = False) -> bytes:
    init = pb.ConnectInit(workflow_id=WF, task=task, agent_id=agent_id, session_key=key, standby=standby)
    return pb.ConnectRequest(init=init).SerializeToString()


def test_another_tasks_token_cannot_register_over_park_on_or_join_a_task(setup: Setup) -> None:
    owner_token = setup.signer.token("pod-t1", workflows=[WF], role="agent", task="t1")
    agent = setup.agent(owner_token, "--task", "t1", "--agent-id", "real-t1", "--standby-streams", "0")
    intruder = setup.signer.token("pod-t2", workflows=[WF], role="agent", task="t2")
    unbound = setup.signer.token("pod-any", workflows=[WF], role="agent")
    try:
        # Register over t1, or over the task-less agent: the t2 token serves t2 only.
        for task in ("t1", ""):
            assert asyncio.run(_raw(setup, REGISTER, intruder, _hello(task, "evil"))) == DENIED
        # A workflow-wide token of another subject may not replace the live registration either.
        assert asyncio.run(_raw(setup, REGISTER, unbound, _hello("t1", "evil"))) == DENIED
        assert (
            metric_value(setup.router.metrics_text(), "router_grpc_agent_replacements_total", {"outcome": "refused"})
            == 1
        )
        # Standby streams on the real registration, by its agent id: refused for both.
        for token in (intruder, unbound):
            code = asyncio.run(_raw(setup, CONNECT, token, _connect("t1", "real-t1", standby=True)))
            assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION)
        # A session of t1 waits for its agent (stopped); the intruders present its key: refused.
        agent.signal(signal.SIGSTOP)
        env = {"OSMO_SESSION_KEY": "orchestrated-key-1"}
        client = Proc(client_cmd("exec", *setup.user_flags("--task", "t1", "--", "echo", "from-t1")), env=cli_env(env))
        assert asyncio.run(_wait_pending(setup)) >= 1
        key = "orchestrated-key-1"
        assert asyncio.run(_raw(setup, CONNECT, intruder, _connect("t1", "evil", key=key))) == DENIED
        assert (
            asyncio.run(_raw(setup, CONNECT, unbound, _connect("t1", "evil", key=key)))
            == grpc.StatusCode.ALREADY_EXISTS
        )
        agent.signal(signal.SIGCONT)
        assert client.wait_exit(30) == 0
        assert client.out_lines == ["from-t1"]
    finally:
        agent.signal(signal.SIGCONT)
        agent.stop()


def test_a_refused_registration_is_audited_with_who_tried(setup: Setup) -> None:
    """The audit's `session refused` names the verified credential of a refused Register, as for any stream."""
    owner_token = setup.signer.token("pod-t1", workflows=[WF], role="agent", task="t1")
    agent = setup.agent(owner_token, "--task", "t1", "--agent-id", "real-t1", "--standby-streams", "0")
    try:
        # Another agent credential over t1's live registration, and a user's token: both refused.
        unbound = setup.signer.token("pod-intruder", workflows=[WF], role="agent")
        assert asyncio.run(_raw(setup, REGISTER, unbound, _hello("t1", "evil"))) == DENIED
        user = setup.signer.token("mallory", workflows=[WF])
        assert asyncio.run(_raw(setup, REGISTER, user, _hello("t2", "evil"))) == DENIED

        held = setup.router.wait_for(
            lambda r: r.get("event") == "session refused" and "another agent credential" in str(r.get("reason")),
            timeout=15,
        )
        assert (held.get("user"), held.get("role")) == ("pod-intruder", "agent"), held
        not_agent = setup.router.wait_for(
            lambda r: r.get("event") == "session refused" and "mallory is not an agent" in str(r.get("reason")),
            timeout=15,
        )
        assert (not_agent.get("user"), not_agent.get("role")) == ("mallory", "user"), not_agent
        # The token itself is never logged.
        assert not any(unbound in line or user in line for line in setup.router.lines)
    finally:
        agent.stop()


async def _wait_pending(setup: Setup) -> float:
    """Sessions waiting for their second side, once there is one (bounded)."""
    async with asyncio.timeout(15):
        while True:
            pending = metric_value(setup.router.metrics_text(), "router_grpc_rendezvous_pending")
            if pending >= 1:
                return pending
            await asyncio.sleep(0.05)


def test_an_expired_token_ends_the_registration_and_a_renewed_one_keeps_serving(setup: Setup, tmp_path: Path) -> None:
    token_file = tmp_path / "agent.token"
    token_file.write_text(setup.signer.token("pod-1", workflows=[WF], role="agent", ttl=6))
    agent = setup.agent("", "--token-file", str(token_file))
    try:
        in_flight = Proc(client_cmd("exec", *setup.user_flags("--", "sh", "-c", "echo started; sleep 9; echo done")))
        in_flight.wait_for(lambda r: r["line"] == "started", stdout=True)
        token_file.write_text(setup.signer.token("pod-1", workflows=[WF], role="agent", ttl=600))
        ended = setup.router.wait_for(lambda r: r.get("event") == "credential ended", timeout=30)
        assert "expired" in ended["msg"]
        # The agent registers again with the renewed token; the session in flight went on.
        agent.wait_for(lambda _r: sum(e.get("event") == "registered" for e in agent.events()) >= 2, timeout=30)
        assert in_flight.wait_exit(30) == 0 and in_flight.out_lines == ["started", "done"]
        result = run_client("exec", *setup.user_flags("--", "echo", "renewed"))
        assert result.returncode == 0 and result.stdout == b"renewed\n", result.stderr
    finally:
        agent.stop()


def test_an_expired_token_without_renewal_serves_no_new_session(setup: Setup, tmp_path: Path) -> None:
    agent = setup.agent(setup.signer.token("pod-2", workflows=[WF], role="agent", ttl=4))
    try:
        setup.router.wait_for(lambda r: r.get("event") == "credential ended", timeout=30)
        result = subprocess.run(
            client_cmd("exec", *setup.user_flags("--", "echo", "x")), capture_output=True, timeout=60
        )
        assert result.returncode == 255 and b"no agent is registered" in result.stderr, result.stderr
    finally:
        agent.stop()


def test_an_agent_refused_again_and_again_keeps_one_connection_to_the_router(setup: Setup) -> None:
    """A token that does not grant the workflow (revoked, rotated wrongly): each retry dialled a new channel and
    left the last open, one more connection to the router per retry (an operator's per-address cap and
    descriptors, about 360 an hour per agent)."""
    agent = setup.agent(setup.signer.token("pod", workflows=["another-workflow"], role="agent"), wait=False)
    try:
        for failures in range(1, 7):  # retries 0.2 s apart, doubling: six within a few seconds
            agent.wait_for(
                lambda r, n=failures: len([e for e in agent.events() if e.get("event") == "register failed"]) >= n
            )
        opened = metric_value(setup.router.metrics_text(), "router_http_connections_open", {"port": "grpc"})
        assert opened <= 2, f"{opened:g} connections open after six refused registrations"
    finally:
        agent.stop()
