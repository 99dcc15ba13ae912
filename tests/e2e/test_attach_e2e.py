"""Detach, attach and sessions end to end (issue 17): real router, agent and client processes, real PTYs.

Network cuts are injected by a TCP proxy on loopback between the client and the router
(tests/cut_proxy.py): a cut resets every connection and refuses new ones until restored.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from osmo_router.client.attach import list_sessions
from osmo_router.client.config import ClientConfig
from osmo_router.dial.config import DialConfig
from osmo_router.wire.protocol import pb
from tests.cut_proxy import CutProxy
from tests.forward_servers import wait_line
from tests.harness import AgentProc, Proc, Router, cli_env, client_cmd, metric_value, run_client
from tests.raw_grpc import EXEC, Outcome, RawCall, raw_channel
from tests.security_kit import Signer

#: A session key as the client prints it.
KEY = rb"[A-Za-z0-9_-]{16,}"
#: The end of bash's prompt (root's or anyone's).
PROMPT = rb"[$#] "
#: Longest a step of these tests may take (each wait is bounded by it).
STEP = 30.0
#: (rows, columns) of the clients' terminals.
TERMINAL_SIZE = (30, 100)
#: A program that prints its terminal's size at each SIGWINCH, until interrupted.
SHOWS_SIZE = (
    "import os, signal\n"
    "signal.signal(signal.SIGWINCH, lambda *_: print('size %dx%d' % os.get_terminal_size()[::-1], flush=True))\n"
    "print('waiting', flush=True)\n"
    "while True:\n"
    "    signal.pause()\n"
)


def _controlling_tty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class TtyClient:
    """An osmo-net-client on a real PTY of its own (its controlling terminal); what it shows is kept."""

    def __init__(self, *args: str, size: tuple[int, int] = TERMINAL_SIZE) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
        self.proc = subprocess.Popen(
            client_cmd(*args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=cli_env({"TERM": "dumb", "PS1": "$ "}),
            preexec_fn=_controlling_tty,
        )
        os.close(slave)
        self.fd = master
        self.text = b""

    def type(self, keys: bytes) -> int:
        """Type keys; returns where the screen was (to wait for what follows)."""
        mark = len(self.text)
        os.write(self.fd, keys)
        return mark

    def wait_for(self, pattern: bytes, start: int = 0, timeout: float = STEP) -> re.Match[bytes]:
        """The first match of `pattern` shown after offset `start`, waiting at most `timeout` s."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (match := compiled.search(self.text, start)) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {pattern!r}; screen: {self.text[-600:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"terminal closed before {pattern!r}; screen: {self.text[-600:]!r}"
                self.text += chunk
        return match

    def run(self, line: bytes, pattern: bytes, timeout: float = STEP) -> re.Match[bytes]:
        """Type a command line, wait for `pattern` in what follows."""
        return self.wait_for(pattern, self.type(line + b"\r"), timeout)

    def exit_code(self, timeout: float = STEP) -> int:
        """Wait for the client to exit (reading the terminal meanwhile, so it never blocks on output)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"the client did not exit; screen: {self.text[-600:]!r}"
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.text += os.read(self.fd, 65536)
                except OSError:
                    pass
        return self.proc.wait(5)

    def close(self) -> None:
        """Kill the client if it still runs; close the terminal."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def proxied(router: Router, workflow: str) -> Iterator[tuple[CutProxy, list[str]]]:
    """A cut proxy in front of the router, and the client flags that go through it."""
    proxy = CutProxy("127.0.0.1", router.port)
    try:
        yield proxy, ["--router-address", proxy.address, "--workflow-id", workflow, "--tls=false"]
    finally:
        proxy.close()


def _shell_state(client: TtyClient) -> tuple[bytes, bytes]:
    """The shell's PID and $X, as the shell itself prints them."""
    match = client.run(b"echo pid=$$ x=$X", rb"pid=(\d+) x=(\S*)\r?\n")
    return match.group(1), match.group(2)


def test_attach_makes_the_program_draw_again_at_the_same_size(agent: AgentProc, client_args: list[str]) -> None:
    """An attached client sees nothing until the program draws: the agent makes it, with a size change
    it can see, even when the new terminal has the size the session's had (no SIGWINCH from the kernel)."""
    first = TtyClient("exec", *client_args, "--tty", "--", sys.executable, "-c", SHOWS_SIZE)
    second: TtyClient | None = None
    try:
        first.wait_for(rb"waiting")
        key = first.wait_for(rb"detached from session (" + KEY + rb")", first.type(b"\x1dd")).group(1).decode()
        assert first.exit_code() == 0
        assert b"size" not in first.text  # nothing changed its size while the first client was attached
        second = TtyClient("attach", key, *client_args)
        # The last size the program reads is its terminal's, the same as before.
        second.wait_for(rb"size 30x101\r\n(.*\r\n)*size 30x100\r\n")
        second.type(b"\x03")
        assert second.exit_code() == 130
    finally:
        first.close()
        if second is not None:
            second.close()


# The 30 s cut (a shorter one, e.g. 3, is a quick check: `-k cut` after editing this list).
@pytest.mark.parametrize("cut_seconds", [30])
def test_tty_shell_survives_a_network_cut(
    agent: AgentProc, proxied: tuple[CutProxy, list[str]], cut_seconds: float
) -> None:
    proxy, args = proxied
    client = TtyClient("exec", *args, "--tty", "--", "bash", "--norc", "--noprofile", "-i")
    try:
        client.run(b"X=kept-$((6*7))", PROMPT)
        before = _shell_state(client)
        assert before[1] == b"kept-42"
        proxy.cut()
        client.wait_for(rb"connection lost")
        # Typed during the cut: held by the client, delivered after the resume.
        mark = client.type(b"echo typed-during-$((1+1))-cut\r")
        time.sleep(cut_seconds)  # the fault itself: how long the network stays cut
        proxy.restore()
        restored = time.monotonic()
        client.wait_for(rb"session resumed", mark)
        print(f"resumed {time.monotonic() - restored:.2f}s after a {cut_seconds}s cut")
        client.wait_for(rb"typed-during-2-cut", mark)
        assert _shell_state(client) == before  # the same shell: same PID, same variables
        client.type(b"exit 3\r")
        assert client.exit_code() == 3
    finally:
        client.close()


def test_escape_key_detaches_while_the_network_is_cut(
    agent: AgentProc, proxied: tuple[CutProxy, list[str]], client_args: list[str]
) -> None:
    """Ctrl-] d during a resume: the agent holds the session anyway, so the client leaves it there (it said
    "cannot be detached (it is not resumable)" and stayed in raw mode, resuming for up to 300 s)."""
    proxy, args = proxied
    client = TtyClient("exec", *args, "--tty", "--", "bash", "--norc", "--noprofile", "-i")
    attached: TtyClient | None = None
    try:
        client.run(b"X=kept-$((6*7))", PROMPT)
        assert _shell_state(client)[1] == b"kept-42"  # the shell ran it: nothing of it is in flight at the cut
        proxy.cut()
        client.wait_for(rb"connection lost")
        mark = client.type(b"\x1dd")
        assert client.exit_code() == 0
        key = client.wait_for(rb"detached from session (" + KEY + rb")", mark).group(1).decode()
        client.wait_for(rb"the connection was down", mark)
        proxy.restore()
        attached = TtyClient("attach", key, *client_args)
        attached.run(b"echo x=$X", rb"x=kept-42")
    finally:
        client.close()
        if attached is not None:
            attached.close()


def test_sessions_right_after_exec_detach_lists_the_session(agent: AgentProc, client_args: list[str]) -> None:
    """A script's `exec --detach` then `sessions` found nothing: the agent reported its list 0.25 s after a change."""
    address = client_args[client_args.index("--router-address") + 1]
    workflow = client_args[client_args.index("--workflow-id") + 1]
    config = ClientConfig(DialConfig(address, tls=False), workflow)
    for _ in range(3):
        started = run_client("exec", *client_args, "--detach", "--", "sleep", "60")
        assert started.returncode == 0, started.stderr
        key = started.stdout.decode().strip()
        # Asked from this process at once (a new CLI process takes a few hundred ms to start: the race's window).
        listed = asyncio.run(list_sessions(config))
        assert key in [entry.session_key for entry in listed], listed


INTERRUPTIBLE = "trap 'echo got-int; exit 7' INT; echo started; while :; do sleep 0.1; done"


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_the_network_is_cut(agent: AgentProc, proxied: tuple[CutProxy, list[str]], presses: int) -> None:
    """A pipe-mode Ctrl-C during a cut waits for the resume, and the user is told so (it waited without a word);
    a second one leaves at once, saying what becomes of the command."""
    proxy, args = proxied
    client = Proc(client_cmd("exec", *args, "--", "sh", "-c", INTERRUPTIBLE))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        proxy.cut()
        wait_line(client, lambda line: "connection lost" in line)
        client.popen.send_signal(signal.SIGINT)
        wait_line(client, lambda line: "the connection is down: SIGINT reaches the command once" in line)
        if presses == 2:
            client.popen.send_signal(signal.SIGINT)
            assert client.wait_exit(STEP) == 130
            assert any("left while resuming: the agent ends the command once" in line for line in client.lines)
            return
        proxy.restore()
        wait_line(client, lambda line: "session resumed" in line)
        assert client.wait_exit(STEP) == 7, (client.lines, client.out_lines)  # the command got it after the resume
        assert "got-int" in client.out_lines
    finally:
        client.stop()


def test_detach_then_attach_from_another_process(agent: AgentProc, router: Router, client_args: list[str]) -> None:
    script = "echo produced-while-detached; read line; echo got=$line; exit 7"
    started = run_client("exec", *client_args, "--detach", "--", "sh", "-c", script)
    assert started.returncode == 0, started.stderr
    key = started.stdout.decode().strip()
    assert re.fullmatch(KEY.decode(), key), started.stdout
    assert f"osmo-net-client attach {key}".encode() in started.stderr
    attached = run_client("attach", key, *client_args, input=b"hello\n")
    assert attached.returncode == 7, attached.stderr
    assert attached.stdout == b"produced-while-detached\ngot=hello\n"
    router.wait_for(lambda r: r.get("event") == "session detach" and r.get("operation") == "exec")
    router.wait_for(lambda r: r.get("event") == "session attach" and r.get("user") == "anonymous")


def test_attach_from_a_terminal_to_a_session_without_one_keeps_the_terminal_cooked(
    agent: AgentProc, client_args: list[str]
) -> None:
    """As docker attach follows the container's TTY setting: Enter is a newline and Ctrl-D the end of input
    (in raw mode, the bug, `od` got "\\r" and a 004 byte and never ended)."""
    started = run_client("exec", *client_args, "--detach", "--", "od", "-c")
    assert started.returncode == 0, started.stderr
    client = TtyClient("attach", started.stdout.decode().strip(), *client_args)
    try:
        client.type(b"hello\r")
        client.type(b"\x04")
        client.wait_for(rb"h   e   l   l   o  \\n")
        assert client.exit_code() == 0
    finally:
        client.close()


def test_messages_on_a_raw_terminal_end_their_line(agent: AgentProc, client_args: list[str]) -> None:
    """On a raw terminal "\\n" only moves down: the agent's "command not found" left the next line indented."""
    client = TtyClient("exec", *client_args, "--tty", "--", "no-such-command-here")
    try:
        client.wait_for(rb"no-such-command-here: command not found\r\n")
        assert client.exit_code() == 127
    finally:
        client.close()


def _end_client(client: TtyClient, how: str) -> int:
    """End a TTY client as its user would: close its terminal (the kernel's SIGHUP) or SIGTERM it; its exit."""
    if how == "close-terminal":
        os.close(client.fd)
        client.fd = -1
        return client.proc.wait(STEP)
    client.proc.terminate()
    return client.exit_code()


@pytest.mark.parametrize(("how", "status"), [("close-terminal", 129), ("sigterm", 143)])
def test_an_exec_tty_client_that_is_ended_hangs_the_session_up(
    agent: AgentProc, client_args: list[str], tmp_path: Path, how: str, status: int
) -> None:
    """As ssh: the remote command is hung up at once, not held by the agent for its resume grace (300 s)."""
    marker = tmp_path / "hup"
    script = f"trap 'echo hup > {marker}; exit 0' HUP; echo ready; while :; do sleep 0.05; done"
    client = TtyClient("exec", *client_args, "--tty", "--", "sh", "-c", script)
    try:
        client.wait_for(rb"ready")
        assert _end_client(client, how) == status
        _until(marker.exists, "the remote command hung up")
        assert marker.read_text() == "hup\n"
    finally:
        client.close()


@pytest.mark.parametrize(("how", "status"), [("close-terminal", 129), ("sigterm", 143)])
def test_an_attached_tty_client_that_is_ended_detaches(
    agent: AgentProc, client_args: list[str], how: str, status: int
) -> None:
    """As closing a tmux window: the session was made to outlive terminals, so it is left detached."""
    script = "echo ready; read line; echo got=$line; exit 5"
    started = run_client("exec", *client_args, "--detach", "--tty", "--", "sh", "-c", script)
    assert started.returncode == 0, started.stderr
    key = started.stdout.decode().strip()
    client = TtyClient("attach", key, *client_args)
    try:
        client.wait_for(rb"ready")
        _until(lambda: any(s["session_key"] == key and s["attached"] for s in _listed(client_args)), "attached")
        assert _end_client(client, how) == status
        _until(lambda: any(s["session_key"] == key and not s["attached"] for s in _listed(client_args)), "detached")
    finally:
        client.close()
    again = run_client("attach", key, *client_args, input=b"bye\n")
    assert again.returncode == 5, again.stderr
    assert b"got=bye" in again.stdout


def test_escape_key_detaches_a_tty_and_attach_takes_over(
    agent: AgentProc, client_args: list[str], tmp_path: Path
) -> None:
    first = TtyClient("exec", *client_args, "--tty", "--", "bash", "--norc", "--noprofile", "-i")
    second: TtyClient | None = None
    try:
        first.run(b"X=from-first", PROMPT)
        before = _shell_state(first)
        mark = first.type(b"\x1dd")  # Ctrl-] d
        said = first.wait_for(rb"detached from session (" + KEY + rb"); attach again with: ([^\r\n]+)", mark)
        key = said.group(1).decode()
        assert first.exit_code() == 0
        first.close()
        # The hint is the whole command, connection flags included: pasted as printed, it attaches.
        hint = shlex.split(said.group(2).decode())
        assert hint[:3] == ["osmo-net-client", "attach", key], hint
        second = TtyClient(*hint[1:])
        assert _shell_state(second) == before
        # Ctrl-] twice is one literal Ctrl-]: cat -v shows it as ^]
        mark = second.type(b"cat -v\r")
        second.type(b"\x1d\x1d\r")
        second.wait_for(rb"\^\]", mark)
        second.type(b"\x04")
        second.run(b"", PROMPT)
        # A third process attaches: it takes the session over; the second is told and exits 255.
        third = Proc(client_cmd("attach", key, *client_args), stdin=subprocess.PIPE)
        try:
            assert second.exit_code() == 255
            # Said as the attach it is, on its own line of the raw terminal.
            assert b"osmo-net-client: attach: the session was attached from another client" in second.text
            assert second.text.rstrip(b"\r\n").endswith(b"[ABORTED]") and second.text.endswith(b"\r\n")
            assert third.popen.stdin is not None
            third.popen.stdin.write(b"exit 4\n")
            third.popen.stdin.close()
            assert third.wait_exit(STEP) == 4, third.lines
        finally:
            third.stop()
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_cut_longer_than_the_grace_ends_the_session(
    router: Router, workflow: str, proxied: tuple[CutProxy, list[str]]
) -> None:
    proxy, args = proxied
    agent = AgentProc(router.address, workflow, "--resume-grace", "3")
    client = Proc(client_cmd("exec", *args, "--", "sh", "-c", "echo started; exec sleep 60"))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        proxy.cut()
        cut = time.monotonic()
        assert client.wait_exit(STEP) == 255
        assert time.monotonic() - cut < 15
        text = "\n".join(client.lines)
        assert "could not be resumed within 3s" in text, text
        # The agent ended the session itself once the grace passed (the process is hung up).
        agent.wait_for(lambda r: "did not come back within the resume grace" in r.get("msg", ""))
    finally:
        client.stop()
        agent.stop()


@pytest.fixture
def jwt_router(tmp_path: Path) -> Iterator[tuple[Router, Signer]]:
    """A router with JWT auth (users alice and bob) and an agent for wf-attach."""
    signer = Signer.rs256()
    (tmp_path / "jwt.pem").write_bytes(signer.public_pem())
    router = Router("--tls-enabled=false", "--auth=jwt", "--jwt-public-key", str(tmp_path / "jwt.pem"), secure=True)
    agent = AgentProc(
        router.address, "wf-attach", "--token", signer.token("pod", workflows=["wf-attach"], role="agent")
    )
    try:
        yield router, signer
    finally:
        agent.stop()
        router.stop()


def _listed(args: list[str]) -> list[dict[str, object]]:
    result = run_client("sessions", "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


async def _bob_aims_at(address: str, token: str, key: str) -> tuple[Outcome, Outcome]:
    """How a resume of `key` with a secret of Bob's, and a new session naming `key` itself, end."""

    def init(resume: pb.ResumeToken) -> bytes:
        target = pb.SessionTarget(workflow_id="wf-attach", session_key=key, resume=resume)
        return pb.ExecRequest(init=pb.ExecInit(target=target, command=["true"])).SerializeToString()

    async def ended(resume: pb.ResumeToken) -> Outcome:
        call = RawCall(channel, EXEC, token)
        await call.send(init(resume))
        return await call.finish(half_close=False)  # (a half-close would end the session before it is judged)

    guess = "b0b" * 11
    async with raw_channel(address) as channel:
        resumed = await ended(pb.ResumeToken(secret=guess, resuming=True))
        named = await ended(pb.ResumeToken(secret=guess, key_from_secret=True))
    return resumed, named


def test_only_the_owner_attaches_and_lists(jwt_router: tuple[Router, Signer]) -> None:
    router, signer = jwt_router

    def flags(user: str) -> list[str]:
        token = signer.token(user, workflows=["wf-attach"])
        return ["--router-address", router.address, "--workflow-id", "wf-attach", "--tls=false", "--token", token]

    started = run_client("exec", *flags("alice"), "--detach", "--", "sh", "-c", "echo hi; exec sleep 120")
    assert started.returncode == 0, started.stderr
    key = started.stdout.decode().strip()
    # Named after Alice's resume secret (ResumeToken.key_from_secret): 128 bits of a hash, in hex.
    assert re.fullmatch(r"[0-9a-f]{32}", key), key
    refused = run_client("attach", key, *flags("bob"))
    assert refused.returncode == 255
    assert b"PERMISSION_DENIED" in refused.stderr and b"belongs to another user" in refused.stderr, refused.stderr
    # Nor can Bob resume it with the key and a secret of his own, or start a session of his own by that key.
    bob = signer.token("bob", workflows=["wf-attach"])
    resumed, named = asyncio.run(_bob_aims_at(router.address, bob, key))
    # The agent judges both (the router pairs a resume it cannot check: the session is detached) and
    # refuses them with an Error frame; nothing of Alice's session reaches Bob.
    for outcome, code, words in (
        (resumed, grpc.StatusCode.PERMISSION_DENIED, "belongs to another user"),
        (named, grpc.StatusCode.ALREADY_EXISTS, "already held"),
    ):
        frames = [pb.ExecResponse.FromString(message) for message in outcome.responses]
        errors = [f.frame.error for f in frames if f.frame.WhichOneof("kind") == "error"]
        assert [(e.code, words in e.message) for e in errors] == [(code.value[0], True)], frames
        assert not [f for f in frames if f.frame.WhichOneof("kind") in ("data", "stderr", "exit_status")], frames
    # Alice's list shows it detached (the agent reports changes within a fraction of a second).
    deadline = time.monotonic() + STEP
    while not [s for s in _listed(flags("alice")) if s["session_key"] == key and s["attached"] is False]:
        assert time.monotonic() < deadline, _listed(flags("alice"))
        time.sleep(0.2)
    [entry] = [s for s in _listed(flags("alice")) if s["session_key"] == key]
    assert entry["command"] == "sh -c 'echo hi; exec sleep 120'"  # shell-quoted, as it ran
    assert _listed(flags("bob")) == []
    # Bob's refused attach did not disturb the session: Alice attaches, and ends it.
    attached = Proc(client_cmd("attach", key, *flags("alice")))
    try:
        attached.wait_for(lambda r: r["line"] == "hi", stdout=True)
    finally:
        attached.stop()


def test_sessions_of_a_workflow_without_an_agent_is_an_error_not_an_empty_list(router: Router) -> None:
    """A mistyped workflow (or an agent restarting) used to read "no resumable sessions of yours"."""
    args = ["--router-address", router.address, "--workflow-id", "wf-nobody-serves", "--tls=false"]
    result = run_client("sessions", *args)
    assert result.returncode == 255, result.stderr
    assert b"no agent is registered for workflow 'wf-nobody-serves' [UNAVAILABLE]" in result.stderr
    assert result.stdout == b""


def test_sessions_asked_of_a_replica_without_the_agent(workflow: str) -> None:
    """Scale-out: replica B has no registration for the workflow; it relays ListSessions (and the attach) to A."""
    from tests.redis_harness import RedisServer

    server = RedisServer()
    procs: list[Proc] = []
    try:
        secret = "peer-secret-for-tests-0123456789"
        a = Router("--redis-url", server.url, "--peer-secret", secret)
        procs.append(a)
        b = Router("--redis-url", server.url, "--peer-secret", secret)
        procs.append(b)
        procs.append(AgentProc(a.address, workflow))
        args_a = ["--router-address", a.address, "--workflow-id", workflow, "--tls=false"]
        args_b = ["--router-address", b.address, "--workflow-id", workflow, "--tls=false"]
        started = run_client("exec", *args_a, "--detach", "--", "sh", "-c", "read line; echo got=$line; exit 5")
        assert started.returncode == 0, started.stderr
        key = started.stdout.decode().strip()
        deadline = time.monotonic() + STEP
        while not [s for s in _listed(args_b) if s["session_key"] == key and s["attached"] is False]:
            assert time.monotonic() < deadline, _listed(args_b)
            time.sleep(0.2)
        assert [s["command"] for s in _listed(args_b)] == ["sh -c 'read line; echo got=$line; exit 5'"]
        # The attach through B is relayed to A like any stream.
        attached = run_client("attach", key, *args_b, input=b"via-b\n")
        assert (attached.returncode, attached.stdout) == (5, b"got=via-b\n"), attached.stderr
    finally:
        for proc in procs:
            proc.stop()
        server.stop()


def _replay_bytes(router: Router) -> float:
    return metric_value(router.metrics_text(), "router_grpc_replay_buffer_bytes")


def _until(predicate: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    """Poll (bounded) until `predicate` holds: the agent reports its held sessions every few seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.2)


def test_replay_buffer_bytes_of_a_detached_session_are_reported(
    agent: AgentProc, router: Router, client_args: list[str]
) -> None:
    size = 3_000_000
    started = run_client("exec", *client_args, "--detach", "--", "sh", "-c", f"head -c {size} /dev/zero; read x")
    assert started.returncode == 0, started.stderr
    key = started.stdout.decode().strip()
    # Nobody acknowledges the output while detached: the agent holds all of it, and says so.
    _until(lambda: _replay_bytes(router) >= size, f"{size} replay-buffer bytes")
    attached = run_client("attach", key, *client_args, input=b"done\n")
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == b"\0" * size
    _until(lambda: _replay_bytes(router) == 0, "the replay buffer given back")
