"""Several agents in one workflow (one per task): a client that names no task is told which one it got.

kubectl says `Defaulted container "c" out of: a, b, c` when a pod has several containers and no -c;
the router chooses the task-less agent or else the oldest registered one (core/registry.py `pick`),
and until now said nothing, so a user could exec into the wrong task without knowing.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Iterator
from typing import IO

import pytest

from tests.forward_servers import echo, echo_round_trip, start_forward, tcp_server
from tests.harness import AgentProc, Router, cli_env, client_cmd, run_client

DEFAULTED = "osmo-net-client: defaulted to task 'first' out of: 'first', 'second' (pass --task to choose)"


@pytest.fixture
def two_tasks(router: Router) -> Iterator[list[str]]:
    """Agents for tasks 'first' (registered first) and 'second' of one workflow; the client's arguments."""
    workflow = f"wf-tasks-{uuid.uuid4().hex[:8]}"
    first = AgentProc(router.address, workflow, "--task", "first")
    second = AgentProc(router.address, workflow, "--task", "second")
    yield ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    first.stop()
    second.stop()


def test_exec_without_a_task_is_told_which_agent_it_got(two_tasks: list[str]) -> None:
    result = run_client("exec", *two_tasks, "--", "echo", "served")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"served\n"
    assert result.stderr.decode().splitlines()[0] == DEFAULTED


def test_naming_the_task_says_nothing(two_tasks: list[str]) -> None:
    result = run_client("exec", *two_tasks, "--task", "second", "--", "echo", "served")
    assert result.returncode == 0, result.stderr
    assert b"defaulted" not in result.stderr, result.stderr


def test_one_agent_says_nothing(router: Router) -> None:
    workflow = f"wf-tasks-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow, "--task", "only")
    try:
        args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
        result = run_client("exec", *args, "--", "echo", "served")
        assert result.returncode == 0, result.stderr
        assert b"defaulted" not in result.stderr, result.stderr
    finally:
        agent.stop()


def test_port_forward_tells_it_once_for_all_its_connections(two_tasks: list[str]) -> None:
    with tcp_server(echo) as port:
        proc, (local,) = start_forward(two_tasks, f":{port}")
        try:
            for n in range(3):
                assert echo_round_trip(local, b"hop %d" % n) == b"hop %d" % n
        finally:
            proc.stop()
    assert [line for line in proc.lines if "defaulted" in line] == [DEFAULTED], proc.lines


def test_a_session_resumes_on_the_agent_it_was_given(workflow: str) -> None:
    """After a router restart the router's default may be another agent (here a task-less one came, which
    `pick` prefers); the resume names the task the session was given, so it reaches the agent holding it."""
    router = Router()
    agents = [AgentProc(router.address, workflow, "--task", task) for task in ("first", "second")]
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    proc = subprocess.Popen(
        client_cmd("exec", *args, "--", "cat"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"before\n")
        proc.stdin.flush()
        assert read_line(proc.stdout) == b"before\n"
        agents.append(AgentProc(router.address, workflow))  # task-less: the router's default from now on
        router.popen.kill()
        router.wait_exit(30)
        router.stop()
        router = Router("--port", str(router.port))
        proc.stdin.write(b"after\n")
        proc.stdin.flush()
        assert read_line(proc.stdout) == b"after\n"
        proc.stdin.close()
        assert proc.wait(60) == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert DEFAULTED in stderr and "session resumed" in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for agent in agents:
            agent.stop()
        router.stop()


def read_line(stream: IO[bytes], timeout: float = 120.0) -> bytes:
    """One line from a pipe, bounded (a resume fits well within)."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert result, "no line within the bound"
    return result[0]


def test_port_forward_keeps_to_the_agent_of_its_start(router: Router, two_tasks: list[str]) -> None:
    """As kubectl keeps to the pod it picked: a task-less agent arriving later (the router's default from then
    on; it allows no port the test uses, so a connection given to it would be refused) takes no connection."""
    with tcp_server(echo) as port:
        proc, (local,) = start_forward(two_tasks, f":{port}")
        workflow = two_tasks[two_tasks.index("--workflow-id") + 1]
        late = AgentProc(router.address, workflow, "--allow-ports", "1")
        try:
            for n in range(3):
                assert echo_round_trip(local, b"hop %d" % n) == b"hop %d" % n
        finally:
            proc.stop()
            late.stop()
