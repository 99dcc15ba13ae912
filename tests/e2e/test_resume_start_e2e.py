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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
        assert ended.get("status") == "CANCELLED", ended
        agent_proxy.unpause()
        code = client.wait_exit(STEP)
    finally:
        client.stop()
    assert runs.read_text() == "ran\n", "the command must run exactly once"
    assert client.out_lines == ["out-from-the-command"], client.lines
    assert code == 7, client.lines
