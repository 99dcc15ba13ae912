"""Faults reported by their real cause (issue 15): real routers, agents, clients and redis-server.

- A closed or reset connection under --tls=false is called a TLS mismatch only when the router
  answers a TLS ClientHello; a router that died, or a peer that closes without TLS, is not.
- A client paused past the router's --flow-control-timeout is told that the router ended the
  session because it stopped reading, not that the agent or router is gone.
- After Redis restarts empty, a client that finds no agent is told the directory is being rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from osmo_router.dial.errors import Peer, probe_peer
from tests.forward_servers import closed_port
from tests.harness import AgentProc, Proc, Router, client_cmd, metric_value, run_client
from tests.redis_harness import RedisServer
from tests.security_kit import Pki

WAIT = 30.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate for the TLS router."""
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_router(pki: Pki) -> Iterator[Router]:
    """A TLS router (no auth: the handshake is what is tested)."""
    router = Router("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--auth=none", secure=True)
    yield router
    router.stop()


@contextlib.contextmanager
def closing_listener() -> Iterator[int]:
    """A TCP port whose listener accepts every connection and closes it at once (no TLS, no HTTP/2)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_probe_tells_tls_from_plaintext_from_nothing(tls_router: Router, router: Router) -> None:
    async def probes() -> list[Peer]:
        with closing_listener() as closer:
            return list(
                await asyncio.gather(
                    probe_peer(tls_router.address),
                    probe_peer(router.address),
                    probe_peer(f"127.0.0.1:{closer}"),
                    probe_peer(f"127.0.0.1:{closed_port()}"),
                )
            )

    assert asyncio.run(probes()) == [Peer.TLS, Peer.NOT_TLS, Peer.NOT_TLS, Peer.REFUSED]


def test_plaintext_client_against_a_tls_router_is_told_to_drop_tls_false(tls_router: Router) -> None:
    result = run_client(
        "exec", "--router-address", tls_router.address, "--workflow-id", "wf", "--tls=false", "--", "true"
    )
    assert result.returncode == 255
    assert "the router speaks TLS; drop --tls=false" in result.stderr.decode()


@pytest.mark.parametrize("command", ["exec", "rsync-shell"])
def test_an_unreadable_tls_ca_is_a_usage_error_not_a_traceback(command: str) -> None:
    args = ["--router-address", "127.0.0.1:1", "--workflow-id", "wf", "--tls", "--tls-ca", "/nonexistent/ca.pem"]
    words = ["--", "true"] if command == "exec" else ["osmo", "rsync", "--server", "."]
    result = run_client(command, *args, *words)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Error: --tls-ca /nonexistent/ca.pem cannot be read: No such file or directory" in stderr
    assert "Traceback" not in stderr


def test_an_unreadable_token_file_is_named_before_the_routers_no_token() -> None:
    """The router can only say "no bearer token: pass --token"; the client names the file it could not read
    (here before failing to reach a router at all: the line comes at start, whatever follows)."""
    args = ["--router-address", "127.0.0.1:1", "--workflow-id", "wf", "--token-file", "/nonexistent/token"]
    result = run_client("exec", *args, "--tls=false", "--transport", "grpc", "--", "true")
    stderr = result.stderr.decode()
    assert result.returncode == 255, stderr
    assert "--token-file /nonexistent/token cannot be read (No such file or directory): no token is sent" in stderr


def test_a_peer_that_closes_without_tls_is_not_called_tls() -> None:
    with closing_listener() as port:
        result = run_client(
            "exec", "--router-address", f"127.0.0.1:{port}", "--workflow-id", "wf", "--tls=false", "--", "true"
        )
    stderr = result.stderr.decode()
    assert result.returncode == 255
    assert "TLS" not in stderr.replace("without TLS", ""), stderr
    assert "answers without TLS" in stderr, stderr


def test_killed_router_is_not_called_a_tls_mismatch(workflow: str) -> None:
    router = Router()
    agent = AgentProc(router.address, workflow)
    # A short resume grace (issue 17): the client tries to resume on the dead router, then names the cause.
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", "--resume-grace", "2s"]
    proc = Proc(client_cmd("exec", *args, "--", "sleep", "60"))
    try:
        router.wait_for(lambda r: r.get("event") == "session start")
        router.popen.kill()
        assert proc.wait_exit(WAIT) == 255
        stderr = "\n".join(proc.lines)
        assert "speaks TLS" not in stderr and "--tls=false" not in stderr, stderr
        assert "closed" in stderr or "reset" in stderr or "refused" in stderr, stderr
        # The agent, which lost the router too, says what happened, not "the router speaks TLS".
        line = agent.wait_for(lambda r: "router connection lost" in r.get("msg", ""))["msg"]
        assert "speaks TLS" not in line, line
    finally:
        proc.stop()
        agent.stop()
        router.stop()


def test_no_agent_after_redis_restarted_empty_says_the_directory_is_being_rebuilt(workflow: str) -> None:
    redis_server = RedisServer()
    secret = "peer-secret-for-tests-0123456789"
    common = ("--redis-url", redis_server.url, "--directory-ttl=30s", "--peer-secret", secret)
    a, b = Router(*common), Router(*common)
    agent = AgentProc(a.address, workflow)
    args_b = ["--router-address", b.address, "--workflow-id", workflow, "--tls=false"]
    try:
        assert run_client("exec", *args_b, "--", "true").returncode == 0  # B finds A's agent in Redis
        # A cannot re-publish while it is stopped: the window stays open for the lookup below.
        a.signal(signal.SIGSTOP)
        redis_server.restart()
        result = run_client("exec", *args_b, "--", "true")
        stderr = result.stderr.decode()
        assert result.returncode == 255
        assert "being rebuilt" in stderr and "retry" in stderr and "UNAVAILABLE" in stderr, stderr
        assert "no agent is registered" not in stderr, stderr
        # The advice holds: once A's heartbeat has re-published, the same command works.
        a.signal(signal.SIGCONT)
        deadline = time.monotonic() + WAIT
        while f"osmo:agent:{{{workflow}}}:" not in redis_server.keys():
            assert time.monotonic() < deadline, "A never re-published its agent"
            time.sleep(0.05)
        result = run_client("exec", *args_b, "--", "echo", "back")
        assert (result.returncode, result.stdout) == (0, b"back\n"), result.stderr
    finally:
        a.signal(signal.SIGCONT)
        for proc in (agent, a, b):
            proc.stop()
        redis_server.stop()


def test_client_paused_past_the_flow_control_timeout_is_told_it_stopped_reading(workflow: str) -> None:
    """The paused client writes too (stdin): its write meets the ended call, and grpc.aio loses the status."""
    # 2 s: the pause (which begins before the router's timer) is surely longer than MIN_STALL.
    router = Router("--flow-control-timeout", "2s")
    agent = AgentProc(router.address, workflow)
    # Without resume: with it the client resumes once it runs again (test_resume_e2e.py); this is
    # the diagnosis a session that ends gets (resume off, the WebSocket transport).
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", "--resume-grace", "0"]
    # Output it never stops producing, input it never stops taking: both directions busy.
    argv = client_cmd("exec", *args, "--", "sh", "-c", "cat /dev/zero & cat >/dev/null")
    proc = Proc(["sh", "-c", f"exec {shlex.join(argv)} </dev/zero >/dev/null"])
    try:
        router.wait_for(lambda r: r.get("event") == "session start")
        proc.signal(signal.SIGSTOP)
        deadline = time.monotonic() + WAIT
        while metric_value(router.metrics_text(), "router_grpc_flow_control_timeouts_total") < 1:
            assert time.monotonic() < deadline, "the router never timed the paused client out"
            time.sleep(0.05)
        router.wait_for(lambda r: r.get("event") == "session end" and r.get("status") == "RESOURCE_EXHAUSTED")
        proc.signal(signal.SIGCONT)
        assert proc.wait_exit(WAIT) == 255
        stderr = "\n".join(proc.lines)
        assert "RESOURCE_EXHAUSTED" in stderr, stderr
        assert "stopped reading" in stderr and "gone" not in stderr, stderr
    finally:
        proc.signal(signal.SIGCONT)
        proc.stop()
        agent.stop()
        router.stop()


@pytest.mark.parametrize(
    "words", [["exec", "--", "true"], ["sessions"], ["attach", "somekey"], ["port-forward", ":8080"]]
)
def test_ctrl_c_while_the_router_does_not_answer_exits_130_quietly(words: list[str]) -> None:
    """Ctrl-C before a session is made: 130, as once it runs and as a shell reports SIGINT (click said
    "Aborted!" and exited 1)."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never answers
    try:
        args = ["--router-address", f"127.0.0.1:{silent.getsockname()[1]}", "--workflow-id", "wf", "--tls=false"]
        proc = Proc(client_cmd(words[0], *args, *words[1:]))
        silent.settimeout(WAIT)
        conn, _ = silent.accept()  # the client is dialling: its loop runs
        try:
            proc.popen.send_signal(signal.SIGINT)
            assert proc.wait_exit(WAIT) == 130, proc.lines
            assert not any("Aborted" in line or "Traceback" in line for line in proc.lines), proc.lines
        finally:
            conn.close()
            proc.stop()
    finally:
        silent.close()
