"""An exec whose stdout's reader exits, or whose stdout cannot be written, ends as a local command would.

Real router, agent and client processes. `osmo-net-client exec -- PRODUCER | head -1` must return
like `PRODUCER | head -1` does: the remote command gets SIGPIPE (exit 141 through the client), and one
that ignores SIGPIPE is ended all the same (SIGTERM after client/exec.py's PIPE_GRACE); over the old
WebSocket protocol, which carries no signals, the client ends the session itself. A stdout that
fails otherwise (`> /dev/full`) is reported in one line and exits 1, as `echo hi > /dev/full` does.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import AgentProc, Router, cli_env, client_cmd
from tests.ws_kit import client_args as transport_args

#: Bound on every wait here (the escalation to SIGTERM takes client/exec.py's PIPE_GRACE, 2 s).
WAIT = 60.0
#: A producer that never ends on its own, writing a line every 50 ms.
FOREVER = "while :; do echo line; sleep 0.05; done"


def _read_one_line_and_leave(client_args: list[str], script: str) -> subprocess.CompletedProcess[bytes]:
    """`exec -- sh -c SCRIPT | head -1`: read one line, close the pipe, wait (bounded) for the client."""
    argv = client_cmd("exec", *client_args, "--", "sh", "-c", script)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline() == b"line\n"
        proc.stdout.close()  # the reader is gone, as `head -1` after its line
        proc.wait(WAIT)
        return subprocess.CompletedProcess(argv, proc.returncode, b"", proc.stderr.read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_command_gets_sigpipe_once_nobody_reads_its_output(agent: AgentProc, client_args: list[str]) -> None:
    result = _read_one_line_and_leave(client_args, FOREVER)
    assert result.returncode == 128 + 13, result.stderr  # killed by SIGPIPE, as in a local pipeline


def test_a_command_ignoring_sigpipe_is_ended_all_the_same(agent: AgentProc, client_args: list[str]) -> None:
    result = _read_one_line_and_leave(client_args, f"trap '' PIPE; {FOREVER}")
    assert result.returncode == 128 + 15, result.stderr  # SIGTERM, PIPE_GRACE after the SIGPIPE


@pytest.mark.parametrize(
    "command",
    # Small writes (written in the loop), and output that arrives in chunks above PIPE_BUF (written in
    # the writer thread, whose ENOSPC was taken for a reader gone: exit 0, nothing said).
    [FOREVER, "seq 1 100000", "head -c 10000000 /dev/zero"],
)
def test_a_stdout_that_fails_is_reported_and_exits_1(agent: AgentProc, client_args: list[str], command: str) -> None:
    with open("/dev/full", "wb") as full:
        argv = client_cmd("exec", *client_args, "--", "sh", "-c", command)
        result = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, env=cli_env(), timeout=WAIT, check=False)
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 1, err
    assert "cannot write to stdout: No space left on device" in err
    assert "Traceback" not in err


def test_over_the_websocket_transport_the_client_ends_the_session(
    router: Router, agent: AgentProc, workflow: str
) -> None:
    result = _read_one_line_and_leave(transport_args(router, workflow, "ws"), FOREVER)
    assert result.returncode == 128 + 13, result.stderr  # as the pipeline's producer would report it
