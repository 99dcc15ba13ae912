"""exec end to end: real router, agent and client processes, a real PTY."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import random
import re
import signal
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

from tests.harness import AgentProc, Proc, Router, cli_env, client_cmd, metric_value, run_client


def test_stdin_reaches_stdout(agent: AgentProc, client_args: list[str]) -> None:
    result = run_client("exec", *client_args, "--", "cat", input=b"hello through the router\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello through the router\n"


def test_stdout_and_stderr_apart_and_exit_code(agent: AgentProc, client_args: list[str]) -> None:
    script = "echo to-out; echo to-err >&2; exit 7"
    result = run_client("exec", *client_args, "--", "sh", "-c", script)
    assert result.returncode == 7
    assert result.stdout == b"to-out\n"
    assert result.stderr == b"to-err\n"


def test_death_by_signal_gives_128_plus_n(agent: AgentProc, client_args: list[str]) -> None:
    result = run_client("exec", *client_args, "--", "sh", "-c", "kill -TERM $$")
    assert result.returncode == 128 + signal.SIGTERM


def test_stdin_eof_propagates(agent: AgentProc, client_args: list[str]) -> None:
    result = run_client("exec", *client_args, "--", "wc", "-c", input=b"x" * 12345)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"12345"


def test_32_mib_blob_intact(agent: AgentProc, client_args: list[str], tmp_path: Path) -> None:
    blob = os.urandom(32 * 1024 * 1024)
    result = run_client("exec", *client_args, "--", "cat", input=blob, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len(blob)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(blob).digest()


def test_legacy_operation_form(agent: AgentProc, client_args: list[str]) -> None:
    result = run_client("--operation=exec", *client_args, "--", "echo", "legacy")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"legacy\n"


def test_flags_from_environment(agent: AgentProc, router: Router, workflow: str) -> None:
    env = {"OSMO_ROUTER_ADDRESS": router.address, "OSMO_WORKFLOW_ID": workflow, "OSMO_TLS": "false"}
    result = run_client("exec", "--", "echo", "from-env", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"from-env\n"


def test_unknown_workflow_gives_255_and_a_message(router: Router) -> None:
    result = run_client(
        "exec", "--router-address", router.address, "--workflow-id", "no-such-wf", "--tls=false", "--", "true"
    )
    assert result.returncode == 255
    assert b"no-such-wf" in result.stderr
    assert b"UNAVAILABLE" in result.stderr


def test_missing_command_gives_127(agent: AgentProc, client_args: list[str]) -> None:
    result = run_client("exec", *client_args, "--", "definitely-not-a-command-xyz")
    assert result.returncode == 127
    assert b"command not found" in result.stderr


def test_rendezvous_timeout_gives_deadline_exceeded() -> None:
    router = Router("--rendezvous-timeout", "1s")
    try:
        started = time.monotonic()
        # An orchestrator-issued key: the router waits for an agent to present it; none does.
        result = run_client(
            "exec",
            "--router-address",
            router.address,
            "--workflow-id",
            "wf-x",
            "--tls=false",
            "--session-key",
            "k" * 22,
            "--",
            "true",
            timeout=30,
        )
        assert result.returncode == 255
        assert b"DEADLINE_EXCEEDED" in result.stderr
        assert time.monotonic() - started < 20
        text = router.metrics_text()
        assert metric_value(text, "router_grpc_errors_total", {"code": "DEADLINE_EXCEEDED"}) == 1
        assert metric_value(text, "router_grpc_sessions_active", {"operation": "exec"}) == 0
    finally:
        router.stop()


def _wait_metric(router: Router, name: str, labels: dict[str, str], value: float, timeout: float = 20) -> None:
    """Poll /metrics (bounded) until a sample reaches `value`."""
    deadline = time.monotonic() + timeout
    while True:
        current = metric_value(router.metrics_text(), name, labels)
        if current == value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {current}, expected {value}")
        time.sleep(0.05)


def test_agent_killed_mid_session(router: Router, workflow: str, client_args: list[str]) -> None:
    """The client tries to resume for its grace (issue 17: here 2 s), then says why it could not."""
    agent = AgentProc(router.address, workflow)
    client = Proc(client_cmd("exec", *client_args, "--resume-grace", "2s", "--", "sh", "-c", "echo started; sleep 60"))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        agent.popen.kill()
        started = time.monotonic()
        assert client.wait_exit(30) == 255
        assert time.monotonic() - started < 25
        assert any("could not be resumed within 2s" in line and "UNAVAILABLE" in line for line in client.lines), (
            client.lines
        )
        _wait_metric(router, "router_grpc_sessions_active", {"operation": "exec"}, 0)
    finally:
        client.stop()
        agent.stop()


def test_an_agent_told_to_stop_tells_its_sessions_clients(
    router: Router, workflow: str, client_args: list[str]
) -> None:
    """SIGTERM to the agent (a pod being deleted): its clients hear why and exit 255 at once. They took
    it for a break and tried to resume, for their whole grace (300 s), a session that went with it."""
    agent = AgentProc(router.address, workflow)
    client = Proc(client_cmd("exec", *client_args, "--", "sh", "-c", "echo started; sleep 60"))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        os.kill(agent.pid, signal.SIGTERM)
        assert client.wait_exit(30) == 255
        assert any("the agent is shutting down" in line and "[UNAVAILABLE]" in line for line in client.lines), (
            client.lines
        )
        assert agent.wait_exit(30) == 0
    finally:
        client.stop()
        agent.stop()


def test_client_killed_hangs_up_remote_process(
    router: Router, workflow: str, client_args: list[str], tmp_path: Path
) -> None:
    """The agent keeps the process for its resume grace (issue 17: here 2 s), then hangs it up."""
    agent = AgentProc(router.address, workflow, "--resume-grace", "2")
    marker = tmp_path / "hup"
    script = f"trap 'echo hup > {marker}; exit 0' HUP; echo started; while :; do sleep 0.1; done"
    client = Proc(client_cmd("exec", *client_args, "--", "sh", "-c", script))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        client.popen.kill()
        client.wait_exit(10)
        agent.wait_for(lambda r: "did not come back within the resume grace (2s)" in r.get("msg", ""))
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline, "the remote process was not hung up"
            time.sleep(0.05)
        assert marker.read_text() == "hup\n"
        _wait_metric(router, "router_grpc_sessions_active", {"operation": "exec"}, 0)
    finally:
        client.stop()
        agent.stop()


def test_stalled_reader_trips_flow_control_without_blocking_others(workflow: str) -> None:
    router = Router("--flow-control-timeout", "2s", "--flow-control-buffer", "4")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    # stdout is a pipe this test never reads, and the session is not resumable (--resume-grace 0): the
    # client stops reading from the router once its stream window is full. (A resumable session is
    # paced by its acknowledgements instead and the router holds nothing: test_unread_stdout_e2e.py.)
    stalled = subprocess.Popen(
        client_cmd("exec", *args, "--resume-grace", "0", "--", "sh", "-c", "while :; do cat /etc/services; done"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        # Another session keeps working while the stalled one fills its buffers.
        result = run_client("exec", *args, "--", "echo", "still-served")
        assert result.returncode == 0 and result.stdout == b"still-served\n"
        end = router.wait_for(
            lambda r: r.get("event") == "session end" and r.get("status") == "RESOURCE_EXHAUSTED", timeout=60
        )
        assert end["operation"] == "exec"
        assert metric_value(router.metrics_text(), "router_grpc_flow_control_timeouts_total") >= 1
        result = run_client("exec", *args, "--", "echo", "after")
        assert result.stdout == b"after\n"
    finally:
        stalled.kill()
        stalled.wait(10)
        assert stalled.stdout is not None
        stalled.stdout.close()
        agent.stop()
        router.stop()


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _controlling_tty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyReader:
    """Accumulates what a PTY master shows; waits (bounded) for a pattern."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = b""

    def wait_for(self, pattern: bytes, timeout: float = 30) -> re.Match[bytes]:
        import select

        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.text)) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {pattern!r}; screen: {self.text[-500:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"terminal closed before {pattern!r}; screen: {self.text[-500:]!r}"
                self.text += chunk
        return match


def check_tty_size_resize_and_ctrl_c(client_args: list[str]) -> None:
    """Through `exec --tty`: the remote sees the local size, follows a resize, and Ctrl-C ends it with 130."""
    master, slave = pty.openpty()
    _set_winsize(slave, 30, 100)
    script = "trap 'echo size=$(stty size)' WINCH; echo size=$(stty size); while :; do sleep 0.05; done"
    proc = subprocess.Popen(
        client_cmd("exec", *client_args, "--tty", "--", "sh", "-c", script),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=cli_env({"TERM": "xterm"}),
        preexec_fn=_controlling_tty,
    )
    os.close(slave)
    screen = PtyReader(master)
    try:
        screen.wait_for(rb"size=30 100")
        _set_winsize(master, 40, 120)  # the kernel sends SIGWINCH to the client
        screen.wait_for(rb"size=40 120")
        os.write(master, b"\x03")  # Ctrl-C in raw mode travels as a byte to the remote terminal
        assert proc.wait(30) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_tty_size_resize_and_ctrl_c(agent: AgentProc, client_args: list[str]) -> None:
    check_tty_size_resize_and_ctrl_c(client_args)


def test_tty_mode_restores_the_local_terminal(agent: AgentProc, client_args: list[str]) -> None:
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        client_cmd("exec", *client_args, "--tty", "--", "sh", "-c", "exit 3"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=cli_env(),
        preexec_fn=_controlling_tty,
    )
    try:
        assert proc.wait(30) == 3
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(slave)
        os.close(master)


def test_default_command_is_the_shell(agent: AgentProc, client_args: list[str]) -> None:
    result = run_client("exec", *client_args, input=b"echo shell-ok; exit 4\n")
    assert result.returncode == 4
    assert result.stdout == b"shell-ok\n"


def test_tty_with_piped_input_runs_without_a_terminal(agent: AgentProc, client_args: list[str]) -> None:
    """`echo cmd | exec --tty -- bash` never returned: a terminal's end of input is a ^D byte, lost or taken as
    input. As ssh -t: a notice, no remote terminal, and the piped input's end ends the command."""
    script = "tty || true; cat"
    result = run_client("exec", *client_args, "--tty", "--", "sh", "-c", script, input=b"piped\n", timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"not a tty\npiped\n"
    assert b"stdin is not a terminal: running without one" in result.stderr


def test_tty_sets_term(agent: AgentProc, client_args: list[str]) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        client_cmd("exec", *client_args, "--tty", "--", "sh", "-c", "echo term=$TERM"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=cli_env({"TERM": "vt220"}),
        preexec_fn=_controlling_tty,
    )
    os.close(slave)
    try:
        PtyReader(master).wait_for(rb"term=vt220")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def _router_on_a_fixed_port() -> tuple[Router, str]:
    """A router on a port below the kernel's ephemeral range, and that port.

    The router must come back on the same port. A port from bind(0) lies in the ephemeral range,
    where any test's outgoing connection may take it in the second between being picked and being
    bound ("Address already in use", seen once in CI); below the range only an explicit bind can.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        ephemeral_low = int(ports.read().split()[0])
    rng = random.Random()
    for _ in range(10):
        port = str(rng.randrange(max(1024, ephemeral_low - 12000), ephemeral_low))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", int(port)))
            except OSError:
                continue  # in use: another one
        try:
            return Router("--port", port), port
        except AssertionError as err:
            if "Address already in use" not in str(err):
                raise
            # taken meanwhile: another one
    raise AssertionError("no free port below the ephemeral range in 10 tries")


def test_agent_reconnects_when_the_router_comes_back(workflow: str) -> None:
    first, port = _router_on_a_fixed_port()
    agent = AgentProc(first.address, workflow)
    second: Router | None = None
    try:
        first.stop()
        second = Router("--port", port)
        # The agent logs a second registration once its backoff brings it back.
        agent.wait_for(lambda r: r.get("event") == "registered" and r.get("router_id") == second.router_id)
        result = run_client(
            "exec", "--router-address", second.address, "--workflow-id", workflow, "--tls=false", "--", "echo", "back"
        )
        assert result.returncode == 0 and result.stdout == b"back\n"
    finally:
        agent.stop()
        if second is not None:
            second.stop()


def _close_stdin_and_stdout() -> None:
    os.close(0)
    os.close(1)


def test_closed_stdin_and_stdout_read_and_write_nothing(agent: AgentProc, client_args: list[str]) -> None:
    # `osmo-net-client exec ... <&- >&-`: the client's next sockets must not take descriptors 0 and
    # 1 (uvloop aborts when it closes one: "uv__close: Assertion `fd > STDERR_FILENO' failed").
    proc = subprocess.run(
        client_cmd("exec", *client_args, "--", "sh", "-c", "cat; echo out; echo err >&2; exit 7"),
        stdin=subprocess.DEVNULL,  # (closed in the child before the exec, as stdout)
        stderr=subprocess.PIPE,
        env=cli_env(),
        preexec_fn=_close_stdin_and_stdout,
        timeout=60,
    )
    assert (proc.returncode, proc.stderr) == (7, b"err\n")


def test_options_after_the_command_are_the_commands_and_an_unknown_one_before_it_is_refused(
    agent: AgentProc, client_args: list[str]
) -> None:
    # `exec echo -t -d x` once ran `echo x` in a TTY, detached: -t and -d were taken as --tty and --detach.
    result = run_client("exec", *client_args, "echo", "-t", "-d", "--detach", "x")
    assert (result.returncode, result.stdout) == (0, b"-t -d --detach x\n"), result.stderr
    # A mistyped option was run as the command ("--tyy: command not found", 127).
    result = run_client("exec", *client_args, "--tyy", "--", "echo", "ran")
    assert result.returncode == 2 and result.stdout == b"", result
    assert b"No such option '--tyy'" in result.stderr


def test_words_that_are_not_utf8_are_a_usage_error(client_args: list[str], tmp_path: Path) -> None:
    """The session carries the command and rsync's remote paths as text: bytes that are not UTF-8
    (`$'caf\\xe9'`) are refused before anything is sent, not a traceback."""
    latin1 = os.fsdecode(b"caf\xe9")  # what Python makes of such an argv word
    exec_result = run_client("exec", *client_args, "--", "printf", "%s", latin1)
    rsync_result = run_client("rsync", *client_args, str(tmp_path), f":/tmp/{latin1}/")
    for result, what in ((exec_result, "COMMAND word 3"), (rsync_result, "remote path word 1")):
        err = result.stderr.decode(errors="replace")
        assert result.returncode == 2, err
        assert f"{what} " in err and "is not UTF-8" in err, err
        assert "Traceback" not in err
