"""An exec whose stdout nobody reads for a while (`osmo exec ... | less`, paused) stays alive and in hand.

Real router, agent and client processes. The client's stdout is a pipe the test fills and then leaves
unread. While it is full:
- the session pauses end to end: the client takes what the agent sent within its replay window and
  acknowledges only what it wrote out, so the agent stops and the router holds nothing for it;
- it outlives several times the router's keepalive bound (`--keepalive-time 1s --keepalive-timeout
  1s`); the router's flow-control timeout is set far above the pause, so nothing but a dropped
  connection could end it, and afterwards every byte arrives with the command's exit code;
- Ctrl-C (SIGINT to the client) still reaches the remote command at once: the client's writes to a
  full stdout may not hold its event loop, where its signal handlers, pings and input run.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PYTHON, AgentProc, Router, cli_env, client_cmd, metric_value

KEEPALIVE = 1.0  # --keepalive-time and --keepalive-timeout, seconds
#: How long stdout stays unread once full: three times what the router allows an unanswered ping.
PAUSE = 6 * KEEPALIVE
OUTPUT = 8 * 1024 * 1024  # far more than the pipe, the router's windows and the client's buffers hold


@pytest.fixture
def router() -> Iterator[Router]:
    """A router that drops a peer leaving a ping unanswered for 2 s, and whose flow-control timeout
    is far above the pauses here (conftest's `agent` and `client_args` use it)."""
    proc = Router(
        *("--keepalive-time", f"{KEEPALIVE:g}s", "--keepalive-timeout", f"{KEEPALIVE:g}s"),
        *("--flow-control-timeout", "120s"),
    )
    yield proc
    proc.stop()


def _exec(client_args: list[str], *command: str) -> subprocess.Popen[bytes]:
    """`osmo-net-client exec -- COMMAND`, its stdout and stderr pipes this test reads (or not)."""
    return subprocess.Popen(
        client_cmd("exec", *client_args, "--", *command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env()
    )


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe behind `fd` (FIONREAD)."""
    count = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return int.from_bytes(count, "little")


def _wait_full(fd: int, timeout: float) -> int:
    """Until the pipe behind `fd` stops filling: the client is blocked on it (bounded); its size."""
    capacity = fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ
    deadline = time.monotonic() + timeout
    while (waiting := _unread(fd)) < capacity and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a pipe's fill level: no event tells it
    assert waiting >= capacity, f"the client wrote {waiting} of {capacity} bytes to stdout in {timeout:g} s"
    return waiting


def test_a_paused_stdout_reader_pauses_the_session_and_keeps_it_past_the_keepalive(
    router: Router, agent: AgentProc, client_args: list[str]
) -> None:
    client = _exec(client_args, "head", "-c", str(OUTPUT), "/dev/zero")
    assert client.stdout is not None and client.stderr is not None
    try:
        fd = client.stdout.fileno()
        _wait_full(fd, 30)
        paused_at = time.monotonic()
        time.sleep(PAUSE)  # the pause under test: stdout left unread, not a wait for an event
        assert client.poll() is None, "the client exited while its stdout was full"
        held = metric_value(router.metrics_text(), "router_grpc_buffered_bytes")
        assert held == 0, f"the router holds {held:g} bytes for a session paced by its acknowledgements"
        received = 0
        deadline = paused_at + PAUSE + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            received += len(chunk)
        code = client.wait(30)
        said = client.stderr.read().decode(errors="replace")
        assert (received, code) == (OUTPUT, 0), f"received {received} of {OUTPUT} bytes, exit {code}: {said}"
        # The router logs the end once both directions are done: it may come just after the client exited.
        end = router.wait_for(lambda r: r.get("event") == "session end", timeout=30)
        assert end.get("status") == "OK", end
        assert len([r for r in router.events() if r.get("event") == "session end"]) == 1
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


#: The remote command: writes OUTPUT bytes, then waits; on SIGINT it leaves a mark and exits 3.
ON_SIGINT = (
    "import os, signal, sys\n"
    "def stop(*_):\n"
    "    open(sys.argv[1], 'w').close()\n"
    "    os._exit(3)\n"
    "signal.signal(signal.SIGINT, stop)\n"
    "sys.stdout.buffer.write(b'0' * int(sys.argv[2]))\n"
    "sys.stdout.flush()\n"
    "signal.pause()\n"
)


def test_ctrl_c_reaches_the_command_while_stdout_is_full(
    router: Router, agent: AgentProc, client_args: list[str], tmp_path: Path
) -> None:
    mark = tmp_path / "interrupted"
    client = _exec(client_args, PYTHON, "-c", ON_SIGINT, str(mark), str(OUTPUT))
    assert client.stdout is not None and client.stderr is not None
    try:
        fd = client.stdout.fileno()
        _wait_full(fd, 30)
        client.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for the mark the command leaves: no event crosses processes here
        assert mark.exists(), "SIGINT did not reach the remote command within 10 s while stdout was full"
        while os.read(fd, 1 << 20):  # the output written before the signal, then EOF
            pass
        code = client.wait(30)
        assert code == 3, client.stderr.read().decode(errors="replace")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_with_an_agent_that_does_not_resume_the_unread_output_waits_in_the_router_and_its_limit_ends_it(
    workflow: str,
) -> None:
    # An agent that keeps no replay window (--resume-grace 0, as an older agent): the client takes at
    # most its own replay window of output it has not written, then leaves the rest to the stream's
    # flow control, so the router's flow-control timeout ends the session with its own status. (Taking
    # everything would end it on the client's side, "the peer sent past its replay window".)
    router = Router("--flow-control-timeout", "3s")
    agent = AgentProc(router.address, workflow, "--resume-grace", "0")
    client = _exec(["--router-address", router.address, "--workflow-id", workflow, "--tls=false"],
                   "head", "-c", str(64 * OUTPUT), "/dev/zero")  # fmt: skip
    try:
        end = router.wait_for(lambda r: r.get("event") == "session end", timeout=60)
        assert (end["status"], "flow-control" in str(end.get("reason"))) == ("RESOURCE_EXHAUSTED", True), end
    finally:
        client.kill()
        client.wait()
        agent.stop()
        router.stop()


def test_a_session_the_router_ended_for_unread_stdout_says_so_on_the_client(workflow: str) -> None:
    # A client that does not resume (--resume-grace 0) whose stdout is not read past the router's
    # flow-control timeout: the router ends the session (RESOURCE_EXHAUSTED), and as the client does
    # not read, its status cannot reach it; the native server resets the stream (RST_STREAM CANCEL)
    # once its close grace passed.
    # Once stdout is read again the client must name the cause (it stopped reading), not print a
    # bare "Received RST_STREAM: cancelled [CANCELLED]" that looks like someone cancelled it.
    router = Router("--flow-control-timeout", "2s")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", "--resume-grace", "0"]
    client = _exec(args, "head", "-c", str(8 * OUTPUT), "/dev/zero")
    assert client.stdout is not None and client.stderr is not None
    try:
        end = router.wait_for(lambda r: r.get("event") == "session end", timeout=60)
        assert end["status"] == "RESOURCE_EXHAUSTED", end
        router.wait_for(lambda r: r.get("event") == "stream_reset", timeout=60)  # the status was dropped
        while os.read(client.stdout.fileno(), 1 << 20):  # stdout read again: the client takes the end
            pass
        code = client.wait(30)
        said = client.stderr.read().decode(errors="replace")
        assert code == 255, said
        assert "stopped reading" in said and "[RESOURCE_EXHAUSTED]" in said, said
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        agent.stop()
        router.stop()
