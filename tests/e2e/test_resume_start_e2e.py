"""A break before the agent's first Resume frame reached the client (docs/resume.md): real processes.

A chaos probe cut the client's link in the first ~100 ms of `exec`: the client exited 255 ("the
session broke before it started") while the agent had started the command and held the session for
its grace, so the command ran on unseen and its output was lost. Now, when the router's ready says
the agent recognises resumes, the client resumes such a session: it finds it (the output arrives,
the command ran once) or the agent says it never received it (and then never runs it).

The cuts are placed exactly by tests/hold_proxy.py: the client's proxy lets the router's ready
through and holds everything after it, so the agent's Resume frame never arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osmo_router.client.resume import CONFIRM_WAIT
from tests.forward_servers import (
    connect,
    echo,
    echo_round_trip,
    forwarded_ports,
    recv_exactly,
    start_forward,
    tcp_server,
    wait_line,
)
from tests.harness import AgentProc, Proc, Router, client_cmd
from tests.hold_proxy import HoldProxy
from tests.raw_grpc import wait_metric

#: Longest a step may take.
STEP = 30.0


@pytest.fixture
def rig(workflow: str) -> Iterator[tuple[Router, HoldProxy, HoldProxy, AgentProc]]:
    """A router, a proxy for the client and one for the agent, the agent."""
    router = Router()
    client_proxy = HoldProxy("127.0.0.1", router.port)
    agent_proxy = HoldProxy("127.0.0.1", router.port)
    agent = AgentProc(agent_proxy.address, workflow, "--resume-grace", "60")
    try:
        yield router, client_proxy, agent_proxy, agent
    finally:
        agent.stop()
        client_proxy.close()
        agent_proxy.close()
        router.stop()


def _wait_file(path: Path, timeout: float = STEP) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written within {timeout:g}s"
        time.sleep(0.02)


def _forward_args(proxy: HoldProxy, workflow: str) -> list[str]:
    return ["--router-address", proxy.address, "--workflow-id", workflow, "--tls=false", "--resume-grace", "60"]


def _exec(proxy: HoldProxy, workflow: str, command: str) -> Proc:
    args = ["--router-address", proxy.address, "--workflow-id", workflow, "--tls=false", "--resume-grace", "60"]
    return Proc(client_cmd("exec", *args, "--", "sh", "-c", command))


def test_cut_after_the_command_started_resumes_and_runs_it_once(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str, tmp_path: Path
) -> None:
    _router, client_proxy, _agent_proxy, _agent = rig
    runs = tmp_path / "runs"
    client_proxy.hold_after_first_message()
    client = _exec(client_proxy, workflow, f"echo ran >> {runs}; echo out-from-the-command; exit 7")
    try:
        assert client_proxy.held.wait(STEP), client.lines  # the ready passed, the Resume frame is held
        assert client_proxy.client_spoke.wait(STEP), client.lines  # ...and the client took it
        _wait_file(runs)  # the agent started the command (and holds the session)
        client_proxy.cut()
        client_proxy.restore()
        code = client.wait_exit(STEP)
    finally:
        client.stop()
    assert runs.read_text() == "ran\n", "the command must run exactly once"
    assert client.out_lines == ["out-from-the-command"], client.lines
    assert code == 7, client.lines
    assert any("session resumed" in line for line in client.lines), client.lines


def test_cut_before_the_ready_resumes_the_started_command_and_runs_it_once(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str, tmp_path: Path
) -> None:
    """The router's SessionReady never reaches the client: it knows the key all the same (named after its
    resume secret, ResumeToken.key_from_secret) and resumes the command the agent started."""
    router, client_proxy, _agent_proxy, _agent = rig
    runs = tmp_path / "runs"
    client_proxy.hold_before_first_message()
    client = _exec(client_proxy, workflow, f"echo ran >> {runs}; echo out-from-the-command; exit 7")
    try:
        assert client_proxy.held.wait(STEP), client.lines  # the ready is held: the client never gets it
        _wait_file(runs)  # the agent started the command (and holds the session)
        client_proxy.cut()
        client_proxy.restore()
        code = client.wait_exit(STEP)
    finally:
        client.stop()
    assert runs.read_text() == "ran\n", "the command must run exactly once"
    assert client.out_lines == ["out-from-the-command"], client.lines
    assert code == 7, client.lines
    assert any("session resumed" in line for line in client.lines), client.lines
    resumed = router.wait_event("session resumed")
    assert resumed["operation"] == "exec", resumed


@pytest.mark.parametrize("ready", ["passed", "held"])
def test_cut_before_the_agent_got_the_session_says_the_command_did_not_run(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str, tmp_path: Path, ready: str
) -> None:
    """`ready` held: the client never got the router's ready either (it resumes by the key named after its
    secret); the agent's answer is the same, and the command never runs."""
    router, client_proxy, agent_proxy, _agent = rig
    runs = tmp_path / "runs"
    # The session must reach the agent on a parked standby stream (a SessionRequest would be held too,
    # and the agent would never join: no ready).
    asyncio.run(wait_metric(router, "router_grpc_standby_streams", 2))
    agent_proxy.pause()  # the router's SessionOpen for the agent stays in the proxy
    if ready == "held":
        client_proxy.hold_before_first_message()
    else:
        client_proxy.hold_after_first_message()
    client = _exec(client_proxy, workflow, f"echo ran >> {runs}; echo out; exit 7")
    try:
        assert client_proxy.held.wait(STEP), client.lines  # paired (a standby stream): the ready was sent
        if ready == "passed":
            assert client_proxy.client_spoke.wait(STEP), client.lines  # ...and the client took it
        agent_proxy.cut()  # the SessionOpen is lost with the agent's connections
        router.wait_for(lambda r: "unregistered" in r.get("msg", ""), timeout=STEP)
        agent_proxy.restore()
        client_proxy.cut()
        client_proxy.restore()
        code = client.wait_exit(STEP)
    finally:
        client.stop()
    assert code == 255, client.lines
    assert any(
        "the session broke before it started" in line and "the command did not start" in line for line in client.lines
    ), client.lines
    # The refusal came from the agent, registered again: it never ran the command (its SessionOpen was
    # lost, and the resume it refused keeps it from running should one still come).
    assert not runs.exists(), "the command must not run"


def test_a_session_whose_stream_ended_before_the_agent_answered_is_held_and_resumed(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str, tmp_path: Path
) -> None:
    """The agent gets the SessionOpen only after the router ended the stream (the client was cut).

    Its first Resume frame then fails to go out. The session used to fail there and stay in the
    agent's table with nothing running it: the client's resume found it and waited forever.
    """
    router, client_proxy, agent_proxy, _agent = rig
    runs = tmp_path / "runs"
    asyncio.run(wait_metric(router, "router_grpc_standby_streams", 2))
    agent_proxy.pause()  # the SessionOpen (and then the stream's cancel) wait in the proxy
    client_proxy.hold_after_first_message()
    client = _exec(client_proxy, workflow, f"echo ran >> {runs}; echo out-from-the-command; exit 7")
    try:
        assert client_proxy.held.wait(STEP), client.lines
        assert client_proxy.client_spoke.wait(STEP), client.lines
        client_proxy.cut()
        client_proxy.restore()
        ended = router.wait_event("session end", timeout=STEP)  # the router ended the first stream
        # The cut reaches the router as the client's stream ending (CANCELLED, "the client went away")
        # or, when a write to it comes first, as the connection lost (UNAVAILABLE): seen both under load.
        assert ended.get("status") in ("CANCELLED", "UNAVAILABLE"), ended
        agent_proxy.unpause()
        code = client.wait_exit(STEP)
    finally:
        client.stop()
    assert runs.read_text() == "ran\n", "the command must run exactly once"
    assert client.out_lines == ["out-from-the-command"], client.lines
    assert code == 7, client.lines


def test_a_forwarded_connection_cut_before_its_ready_resumes(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str
) -> None:
    """A forwarded connection's first bytes reached the container's server, and the router's ready for
    its session never reached the client: the client resumes it by the key named after its secret
    (ResumeToken.key_from_secret), and the local application sees the server's answer, then goes on.
    Before, that connection was reset (no key to resume with)."""
    router, client_proxy, _agent_proxy, _agent = rig
    received = threading.Event()

    def answer_then_echo(conn: socket.socket) -> None:
        first = recv_exactly(conn, 5)
        received.set()
        conn.sendall(first.upper())
        echo(conn)

    with tcp_server(answer_then_echo) as target:
        forward, (local_port,) = start_forward(_forward_args(client_proxy, workflow), f":{target}")
        local = None
        try:
            client_proxy.pause()  # nothing more reaches the client: the new session's ready stays in the proxy
            local = connect(local_port)
            local.sendall(b"hello")  # goes out with the session's init, before its ready
            assert received.wait(STEP), forward.lines  # the agent started the session and the server got them
            client_proxy.cut()  # the ready is lost with the connection
            client_proxy.restore()
            local.settimeout(STEP)
            assert recv_exactly(local, 5) == b"HELLO", forward.lines
            local.sendall(b"again")
            assert recv_exactly(local, 5) == b"again", forward.lines
        finally:
            if local is not None:
                local.close()
            forward.stop()
    # The connection's session, resumed unconfirmed: the agent sent the server's answer again.
    router.wait_for(
        lambda r: r.get("event") == "session resumed" and r.get("replayed_to_client") == len(b"HELLO"), timeout=STEP
    )


def test_a_forward_whose_watch_is_cut_before_its_ready_starts_all_the_same(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str
) -> None:
    """The port-forward's first session (its watch) loses its ready with the connection: the forward
    resumes it by the key named after its secret, then listens and forwards as usual."""
    _router, client_proxy, _agent_proxy, _agent = rig
    client_proxy.hold_before_first_message()
    # Past STEP: the forward must not wait its connect timeout for an agent's answer the resume brought.
    args = [*_forward_args(client_proxy, workflow), "--connect-timeout", str(2 * STEP)]
    with tcp_server(echo) as target:
        forward = Proc(client_cmd("port-forward", *args, f":{target}"))
        try:
            assert client_proxy.held.wait(STEP), forward.lines  # paired: the watch's ready is held
            client_proxy.cut()
            client_proxy.restore()
            forward.wait_for(lambda _: bool(forwarded_ports(forward.out_lines)), timeout=STEP, stdout=True)
            (local_port,) = forwarded_ports(forward.out_lines)
            assert echo_round_trip(local_port, b"after the cut") == b"after the cut", forward.lines
            assert forward.popen.poll() is None, forward.lines
        finally:
            forward.stop()


def test_a_forwarded_connection_whose_session_never_reached_the_agent_is_reset_with_the_cause(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str
) -> None:
    """The router's SessionOpen for a new connection is lost on its way to the agent and the client never
    got the ready: its resume is refused by the agent (it never received the session), and the local
    connection is reset with that cause instead of waiting; the container's server never saw it."""
    router, client_proxy, agent_proxy, _agent = rig
    accepted = threading.Event()

    def count(conn: socket.socket) -> None:
        accepted.set()
        echo(conn)

    with tcp_server(count) as target:
        forward, (local_port,) = start_forward(_forward_args(client_proxy, workflow), f":{target}")
        local = None
        try:
            watch = router.wait_event("session start")["session"]
            asyncio.run(wait_metric(router, "router_grpc_standby_streams", 2))
            agent_proxy.pause()  # the SessionOpen stays in the proxy
            client_proxy.pause()  # and the ready
            local = connect(local_port)
            local.sendall(b"hello")
            router.wait_for(lambda r: r.get("event") == "session start" and r.get("session") != watch, timeout=STEP)
            agent_proxy.cut()  # the SessionOpen is lost with the agent's connections
            router.wait_for(lambda r: "unregistered" in r.get("msg", ""), timeout=STEP)
            agent_proxy.restore()
            client_proxy.cut()
            client_proxy.restore()
            local.settimeout(STEP)
            with contextlib.suppress(ConnectionResetError):
                assert local.recv(1) == b"", forward.lines
            wait_line(forward, lambda line: "never received the session: the connection was not opened" in line)
        finally:
            if local is not None:
                local.close()
            forward.stop()
    assert not accepted.is_set(), "the server must not see a connection the agent never opened"


def test_a_forwarded_connection_cut_before_its_ready_with_more_than_its_replay_window_held_loses_nothing(
    rig: tuple[Router, HoldProxy, HoldProxy, AgentProc], workflow: str
) -> None:
    """The local application sends more than the replay window (8 MiB) before the router's ready, and
    the ready is cut and the router stays out of reach for longer than CONFIRM_WAIT: the connection's
    sender, waiting for room in the replay buffer, must not give resume up while the session is being
    resumed (it dropped what was held, then the message it was sending: the server missed bytes, or the
    resume ended DATA_LOSS). Every byte reaches the server once, in order."""
    router, client_proxy, _agent_proxy, _agent = rig
    payload = random.Random(73).randbytes(12 << 20)
    received = [0]

    def digest_after_eof(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        while data := conn.recv(1 << 20):
            digest.update(data)
            received[0] += len(data)
        conn.sendall(f"{received[0]} {digest.hexdigest()}".encode())

    with tcp_server(digest_after_eof) as target:
        forward, (local_port,) = start_forward(_forward_args(client_proxy, workflow), f":{target}")
        local = None
        sender = None
        try:
            watch = router.wait_event("session start")["session"]
            client_proxy.pause()  # the session's ready (and every ack, every window update) stays in the proxy
            local = connect(local_port)

            def send() -> None:
                with contextlib.suppress(OSError):
                    assert local is not None
                    local.sendall(payload)
                    local.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            # The connection's session started (its first message cannot be whole at the router: the
            # router's window updates stay in the proxy too).
            router.wait_for(lambda r: r.get("event") == "session start" and r.get("session") != watch, timeout=STEP)
            client_proxy.cut()  # the ready is lost with the connection; the client resumes
            # The router out of reach for longer than the client's CONFIRM_WAIT (the scenario, not a wait
            # for something): the sender meanwhile waits for room, the replay window full.
            time.sleep(CONFIRM_WAIT + 2)
            client_proxy.restore()
            answer = recv_exactly(local, 100)
            assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode(), forward.lines
        finally:
            if local is not None:
                local.close()
            if sender is not None:
                sender.join(STEP)
            forward.stop()
