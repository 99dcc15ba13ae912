"""Scale-out with several agents (tasks) of one workflow on different replicas, and a client naming no task.

One router chooses the task-less agent or else the oldest one and names every task (core/registry.py `pick`,
core/session.py DefaultedTask); two replicas sharing Redis must make the same choice and say the same,
whichever replica the client reaches, from the directory's registrations (scaleout/redis_directory.py).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.test_scaleout_e2e import SECRET, Cluster, args_for
from tests.e2e.test_tasks_e2e import read_line
from tests.harness import AgentProc, Router, cli_env, client_cmd, run_client
from tests.redis_harness import RedisServer

DEFAULTED = "osmo-net-client: defaulted to task 'first' out of: 'first', 'second' (pass --task to choose)"


def _agent(cluster: Cluster, router: Router, workflow: str, task: str) -> AgentProc:
    """An agent for `task` whose commands see WHICH=task (so the served one is known)."""
    proc = AgentProc(router.address, workflow, "--task", task, env={"WHICH": task})
    cluster.procs.append(proc)
    return proc


@pytest.fixture
def two_replicas() -> Iterator[tuple[Cluster, Router, Router, str]]:
    """Replica A holds task 'first' (registered first), replica B task 'second', of one workflow."""
    server = RedisServer()
    cluster = Cluster(server)
    try:
        a = cluster.router("--peer-secret", SECRET)
        b = cluster.router("--peer-secret", SECRET)
        workflow = f"wf-tasks-{uuid.uuid4().hex[:8]}"
        _agent(cluster, a, workflow, "first")
        _agent(cluster, b, workflow, "second")
        yield cluster, a, b, workflow
    finally:
        cluster.stop()
        server.stop()


def test_the_same_agent_and_notice_whichever_replica_the_client_reaches(
    two_replicas: tuple[Cluster, Router, Router, str],
) -> None:
    _, a, b, workflow = two_replicas
    for router in (a, b, a, b):
        result = run_client("exec", *args_for(router, workflow), "--", "sh", "-c", 'echo "$WHICH"')
        assert result.returncode == 0, result.stderr
        assert (result.stdout, result.stderr.decode().splitlines()[:1]) == (b"first\n", [DEFAULTED]), router.port


def test_a_resume_after_a_restart_goes_back_to_the_task_it_was_given(
    two_replicas: tuple[Cluster, Router, Router, str],
) -> None:
    """The client reaches B, is given A's 'first' and told so; A restarts and a task-less agent (the default
    from then on, and B's own) came to B: the resume names 'first', so it reaches the agent holding it."""
    cluster, a, b, workflow = two_replicas
    proc = subprocess.Popen(
        client_cmd("exec", *args_for(b, workflow), "--", "sh", "-c", 'echo "$WHICH"; cat'),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert read_line(proc.stdout) == b"first\n"
        cluster.procs.append(AgentProc(b.address, workflow, env={"WHICH": "task-less"}))
        a.popen.kill()
        a.wait_exit(30)
        a.stop()
        cluster.router("--peer-secret", SECRET, "--port", str(a.port))
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
