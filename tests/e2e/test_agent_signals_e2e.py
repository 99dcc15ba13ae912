"""A command run through an agent takes Ctrl-C, Ctrl-\\ and the hang-up by default even when the
agent was started with them ignored (`nohup`, a script's background job): agent/process.py
default_signals_for_commands. Real router, agent or WS backend, and client processes on loopback.
"""

from __future__ import annotations

import signal
import subprocess
import uuid

from tests.harness import AgentProc, Router, run_client
from tests.ws_kit import WsBackendProc, client_args, new_key

#: Starts its arguments with SIGINT, SIGQUIT and SIGHUP ignored, as `nohup cmd &` in a script does.
IGNORING = ("sh", "-c", "trap '' INT QUIT HUP; exec \"$@\"", "sh")
USER_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


def ignored(status: bytes) -> set[signal.Signals]:
    """The user signals a /proc/PID/status text says its process ignores."""
    line = next(line for line in status.decode().splitlines() if line.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return {sig for sig in USER_SIGNALS if mask & (1 << (sig - 1))}


def test_the_launcher_makes_a_process_ignore_them() -> None:
    """The control: without an agent in between, the launched command does inherit the ignores."""
    status = subprocess.run([*IGNORING, "cat", "/proc/self/status"], capture_output=True, timeout=30, check=True)
    assert ignored(status.stdout) == set(USER_SIGNALS)


def test_grpc_agent_started_ignoring_them_runs_commands_that_take_them(router: Router) -> None:
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow, launcher=IGNORING)
    try:
        args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
        result = run_client("exec", *args, "--", "cat", "/proc/self/status", timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        assert ignored(result.stdout) == set()
        with open(f"/proc/{agent.popen.pid}/status", "rb") as own:
            assert ignored(own.read()) == set()  # handled by the agent (as a no-op or a stop), not ignored
        agent.signal(signal.SIGHUP)  # which the agent, as started, shrugs off
        exec_again = run_client("exec", *args, "--", "echo", "still here", timeout=60)
        assert (exec_again.returncode, exec_again.stdout) == (0, b"still here\n"), exec_again.stderr.decode()
    finally:
        agent.stop()


def test_ws_backend_started_ignoring_them_runs_commands_that_take_them(router: Router) -> None:
    workflow, key = f"wf-ws-{uuid.uuid4().hex[:8]}", new_key()
    backend = WsBackendProc(router, workflow, key, launcher=IGNORING)
    try:
        args = client_args(router, workflow, "ws", "--session-key", key)
        result = run_client("exec", *args, "--", "cat", "/proc/self/status", timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        assert ignored(result.stdout) == set()
        assert backend.wait_exit(20) == 0, backend.lines[-5:]
    finally:
        backend.stop()
