"""Scale-out end to end: a real redis-server, several router processes, agents and clients.

The agent registers with replica A, the client dials replica B: B finds the agent in Redis and
relays the stream to A over RouterPeerService. Replica loss, Redis loss and TTL expiry are
provoked for real (SIGKILL, redis-server restarts) and observed from the outside.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from osmo_router.router.core.sessions import scoped_key
from osmo_router.wire.protocol import pb, pb_grpc
from tests.harness import AgentProc, Proc, Router, client_cmd, metric_value, run_client
from tests.redis_harness import RedisServer
from tests.security_kit import Pki, Signer

#: Short directory TTL so expiry is observable in a test (refreshed every third of it).
TTL = 3.0
#: A client of a broken session must have exited within this long.
BROKEN_SESSION_EXIT = 20.0


#: Shared by the tests that leave their replicas healthy: A holds the agent, B relays to it.
SECRET = "peer-secret-for-tests-0123456789"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server on a free loopback port."""
    server = RedisServer()
    yield server
    server.stop()


class Cluster:
    """Router replicas sharing one Redis; stops whatever it started."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.redis = redis_server
        self.procs: list[Proc] = []

    def router(self, *args: str, env: dict[str, str] | None = None, secure: bool = False) -> Router:
        """A replica with the shared directory (plaintext, no auth unless `secure`)."""
        proc = Router("--redis-url", self.redis.url, f"--directory-ttl={TTL:g}s", *args, env=env, secure=secure)
        self.procs.append(proc)
        return proc

    def agent(self, address: str, workflow: str, *args: str) -> AgentProc:
        """An agent registered with the router(s) at `address`."""
        proc = AgentProc(address, workflow, *args)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process."""
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    """Start replicas and agents with `cluster.router()` / `cluster.agent()`."""
    c = Cluster(redis_server)
    yield c
    c.stop()


@dataclass
class Pair:
    """Two healthy replicas with the peer secret (one from the flag, one from the environment)."""

    cluster: Cluster
    a: Router
    b: Router
    workflow: str


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """Replicas A (holding an agent for `workflow`) and B, for tests that leave them healthy."""
    server = RedisServer()
    c = Cluster(server)
    try:
        a = c.router("--peer-secret", SECRET)
        b = c.router(env={"OSMO_PEER_SECRET": SECRET})
        workflow = f"wf-{uuid.uuid4().hex[:8]}"
        c.agent(a.address, workflow)
        yield Pair(c, a, b, workflow)
    finally:
        c.stop()
        server.stop()


def args_for(router: Router, workflow: str) -> list[str]:
    """Common client flags for one replica."""
    return ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll an observable state (no event exists for it) until true; returns the time it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def sessions_total(router: Router) -> float:
    """Exec sessions this replica paired itself."""
    return metric_value(router.metrics_text(), "router_grpc_sessions_total", {"operation": "exec"})


def test_exec_through_another_replica(pair: Pair) -> None:
    a, b, workflow = pair.a, pair.b, pair.workflow
    before_a, before_b = sessions_total(a), sessions_total(b)
    blob = os.urandom(8 * 1024 * 1024)
    result = run_client("exec", *args_for(b, workflow), "--", "cat", input=blob, timeout=90)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(blob).digest()

    result = run_client("exec", *args_for(b, workflow), "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\n", b"err\n")

    # A served both sessions as its own; B relayed them and paired none itself.
    assert sessions_total(a) - before_a == 2
    assert sessions_total(b) - before_b == 0
    b.wait_for(lambda r: r.get("event") == "relay end" and r.get("replica") == a.router_id)


def test_unknown_workflow_is_unavailable(pair: Pair) -> None:
    result = run_client("exec", *args_for(pair.b, "no-such-workflow"), "--", "true")
    assert result.returncode == 255
    assert b"UNAVAILABLE" in result.stderr and b"no-such-workflow" in result.stderr


def _fake_agent(address: str, workflow: str, key: str, found: dict[str, object]) -> None:
    """An agent that opens its session stream by itself (orchestrator key), answers and ends cleanly."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.RouterAgentServiceStub(channel).Connect()
            await call.write(
                pb.ConnectRequest(init=pb.ConnectInit(session_key=key, agent_id="fake", workflow_id=workflow))
            )
            first = await call.read()
            found["open"] = first.open
            for frame in (
                pb.Frame(data=b"hello from the agent-first side\n"),
                pb.Frame(exit_status=pb.ExitStatus(code=3)),
                pb.Frame(half_close=pb.HalfClose()),
            ):
                await call.write(pb.ConnectRequest(frame=frame))
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass

    try:
        asyncio.run(asyncio.wait_for(run(), 60))
    except BaseException as err:
        found["error"] = err


@pytest.mark.parametrize("first", ["client", "agent"])
def test_orchestrator_key_pairs_across_replicas(pair: Pair, first: str) -> None:
    """A session key from outside: the two sides join on different replicas, in either order."""
    workflow = f"orchestrated-{uuid.uuid4().hex[:8]}"
    key = f"key-{workflow}"
    # Keys live in their workflow's key space: the directory stores the digest of the scoped key.
    entry = "osmo:session:" + hashlib.sha256(scoped_key(workflow, key).encode()).hexdigest()[:32]
    found: dict[str, object] = {}
    agent = threading.Thread(target=_fake_agent, args=(pair.a.address, workflow, key, found), daemon=True)
    client_argv = client_cmd("exec", *args_for(pair.b, workflow), "--session-key", key, "--", "echo", "x")
    client = None
    try:
        if first == "agent":
            agent.start()
        else:
            client = Proc(client_argv)
        # The first side's replica has published the session: the second side can find it.
        wait_until(lambda: entry in pair.cluster.redis.keys(), 20, "the session entry")
        if first == "agent":
            client = Proc(client_argv)
        else:
            agent.start()
        assert client.wait_exit(60) == 3, client.lines
        assert client.out_lines == ["hello from the agent-first side"]
    finally:
        if client is not None:
            client.stop()
    agent.join(30)
    assert "error" not in found, found.get("error")
    opened = found["open"]
    assert isinstance(opened, pb.SessionOpen)
    assert list(opened.exec.command) == ["echo", "x"] and opened.session_key == key
    # Once the session is over, its entry is withdrawn at once (not left to the TTL).
    wait_until(lambda: entry not in pair.cluster.redis.keys(), TTL / 2, "the session entry to be withdrawn")


def test_peer_service_requires_the_secret(pair: Pair) -> None:
    async def forged(secret: str) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(pair.a.address) as channel:
            call = channel.stream_stream("/osmo.router.v1.RouterPeerService/Exec")(
                metadata=(("osmo-peer-secret", secret), ("osmo-peer-identity", '{"sub":"x"}'))
            )
            init = pb.ExecRequest(init=pb.ExecInit(target=pb.SessionTarget(workflow_id=pair.workflow)))
            try:
                await call.write(init.SerializeToString())
            except grpc.aio.AioRpcError as err:
                # The router may refuse the call before the init is even written.
                refused: grpc.StatusCode = err.code()
                return refused
            code: grpc.StatusCode = await call.code()
            return code

    assert asyncio.run(forged("wrong" * 8)) == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(forged("")) == grpc.StatusCode.UNAUTHENTICATED


def _placeholder(module: str) -> bool:
    """True while a feature's client module is still the walking skeleton's placeholder."""
    return "placeholder" in (importlib.import_module(module).__doc__ or "").lower()


@pytest.mark.skipif(_placeholder("osmo_router.client.forward"), reason="port-forward is not in this tree yet")
def test_port_forward_through_another_replica(pair: Pair) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        remote_port = server.getsockname()[1]
        echo = threading.Thread(target=_echo_once, args=(server,), daemon=True)
        echo.start()
        forward = Proc(client_cmd("port-forward", *args_for(pair.b, pair.workflow), f":{remote_port}"))
        try:
            line = forward.wait_for(lambda r: "Forwarding from" in r.get("line", ""), stdout=True)["line"]
            match = re.search(r"127\.0\.0\.1:(\d+) -> (\d+)", line)
            assert match is not None and int(match.group(2)) == remote_port, line
            payload = os.urandom(2 * 1024 * 1024)
            with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=30) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                received = b"".join(iter(lambda: conn.recv(65536), b""))
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        finally:
            forward.stop()
        echo.join(10)


def _echo_once(server: socket.socket) -> None:
    """Echo one TCP connection until its sender half-closes, then close."""
    server.settimeout(60)
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


@pytest.mark.skipif(_placeholder("osmo_router.client.rsync"), reason="rsync is not in this tree yet")
def test_rsync_through_another_replica(pair: Pair, tmp_path: Path) -> None:
    src, dst, back = tmp_path / "src", tmp_path / "dst", tmp_path / "back"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(1024 * 1024))
    (src / "sub" / "b.txt").write_text("through two replicas\n")
    up = run_client("rsync", *args_for(pair.b, pair.workflow), f"{src}/", f":{dst}/", timeout=90)
    assert up.returncode == 0, up.stderr
    assert (dst / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (dst / "sub" / "b.txt").read_text() == "through two replicas\n"
    down = run_client("rsync", *args_for(pair.b, pair.workflow), f":{dst}/", f"{back}/", timeout=90)
    assert down.returncode == 0, down.stderr
    assert (back / "a.bin").read_bytes() == (src / "a.bin").read_bytes()


def test_replica_loss_breaks_sessions_cleanly_and_agents_come_back(cluster: Cluster, workflow: str) -> None:
    a, b = cluster.router(), cluster.router()
    agent = cluster.agent(a.address, workflow)
    # A second agent knows both replicas and moves to the live one by itself.
    roaming = f"{workflow}-roaming"
    roamer = cluster.agent(f"{a.address},{b.address}", roaming)
    # A session that cannot resume (a resumable one resumes: tests/e2e/test_resume_scaleout_e2e.py).
    client = Proc(client_cmd("exec", *args_for(b, workflow), "--resume-grace=0", "--", "sleep", "60"))
    b.wait_for(lambda r: r.get("event") == "relay start")
    a.signal(signal.SIGKILL)
    a.wait_exit()
    started = time.monotonic()
    assert client.wait_exit(BROKEN_SESSION_EXIT) == 255
    assert time.monotonic() - started < BROKEN_SESSION_EXIT
    assert any("UNAVAILABLE" in line for line in client.lines), client.lines

    # While A is gone, its (possibly stale) entry gives a clean, bounded error too.
    result = run_client("exec", *args_for(b, workflow), "--", "true", timeout=BROKEN_SESSION_EXIT)
    assert result.returncode == 255 and b"UNAVAILABLE" in result.stderr, result.stderr
    roamer.wait_for(lambda r: r.get("event") == "registered" and r.get("router_id") == b.router_id)

    # A restarts at the same address; the agent that only knows A re-registers there.
    restarted = cluster.router("--port", str(a.port))
    agent.wait_for(lambda r: r.get("event") == "registered" and r.get("router_id") == restarted.router_id)
    result = run_client("exec", *args_for(b, workflow), "--", "echo", "back")
    assert (result.returncode, result.stdout) == (0, b"back\n"), result.stderr
    result = run_client("exec", *args_for(restarted, roaming), "--", "echo", "moved")
    assert (result.returncode, result.stdout) == (0, b"moved\n"), result.stderr


def test_redis_restart(cluster: Cluster, workflow: str) -> None:
    a, b = cluster.router(), cluster.router()
    cluster.agent(a.address, workflow)
    assert run_client("exec", *args_for(b, workflow), "--", "true").returncode == 0

    cluster.redis.kill()
    # Local pairing does not need Redis.
    result = run_client("exec", *args_for(a, workflow), "--", "echo", "local")
    assert (result.returncode, result.stdout) == (0, b"local\n"), result.stderr
    # A lookup on another replica fails at once, with a message that names the cause.
    result = run_client("exec", *args_for(b, workflow), "--", "true")
    assert result.returncode == 255
    assert b"UNAVAILABLE" in result.stderr and b"Redis" in result.stderr, result.stderr

    cluster.redis.start()
    # The heartbeat re-publishes A's agent into the empty Redis...
    wait_until(lambda: f"osmo:agent:{{{workflow}}}:" in cluster.redis.keys(), 10, "the agent to be re-published")
    # ...and cross-replica sessions work again.
    result = run_client("exec", *args_for(b, workflow), "--", "echo", "resumed")
    assert (result.returncode, result.stdout) == (0, b"resumed\n"), result.stderr
    assert metric_value(b.metrics_text(), "router_grpc_directory_up") == 1


def test_entries_are_withdrawn_on_shutdown_and_expire_after_a_crash(cluster: Cluster, workflow: str) -> None:
    crashing, stopping = cluster.router(), cluster.router("--drain-timeout=5s")
    agent = cluster.agent(crashing.address, workflow)
    cluster.agent(stopping.address, f"{workflow}-stopping")
    # A session waiting for its agent (orchestrator key) is in the directory too.
    waiting = Proc(client_cmd("exec", *args_for(crashing, f"{workflow}-x"), "--session-key", workflow, "--", "true"))
    cluster.procs.append(waiting)
    wait_until(lambda: any(k.startswith("osmo:session:") for k in cluster.redis.keys()), 20, "the session entry")

    # SIGTERM: the replica withdraws its entries as it leaves, without waiting for the TTL.
    stopping.signal(signal.SIGTERM)
    assert stopping.wait_exit(30) == 0
    keys = cluster.redis.keys()
    assert not [k for k in keys if "-stopping" in k], keys
    assert f"osmo:agent:{{{workflow}}}:" in keys, keys

    # SIGKILL: nothing is withdrawn, everything expires within the TTL. (The router goes first: an
    # agent that dies alone is noticed and withdrawn at once.)
    for proc in (crashing, agent):
        proc.signal(signal.SIGKILL)
        proc.wait_exit()
    keys = cluster.redis.keys()
    assert f"osmo:agent:{{{workflow}}}:" in keys and f"osmo:agents:{{{workflow}}}" in keys, keys
    assert any(k.startswith("osmo:session:") for k in keys), keys
    wait_until(lambda: not cluster.redis.keys(), TTL + 5, "every entry to expire")


def test_tls_and_jwt_across_replicas(cluster: Cluster, workflow: str, tmp_path: Path) -> None:
    """Production settings: TLS between everyone (replicas verify each other), JWT, the peer secret."""
    pki = Pki.create(tmp_path)
    signer = Signer.rs256()
    public_key = tmp_path / "jwt.pub.pem"
    public_key.write_bytes(signer.public_pem())
    secure = [
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--peer-tls-ca", str(pki.ca)),
        *("--auth=jwt", "--jwt-public-key", str(public_key), "--peer-secret", SECRET),
    ]
    a, b = cluster.router(*secure, secure=True), cluster.router(*secure, secure=True)
    # This one checks a name the replicas' certificate does not carry: it must refuse to relay.
    mistrusting = cluster.router(*secure, "--peer-tls-server-name=not-the-router.test", secure=True)
    agent_token = signer.token("pod-1", workflows=[workflow], role="agent")
    cluster.procs.append(AgentProc(a.address, workflow, "--tls-ca", str(pki.ca), "--token", agent_token, tls=True))

    def exec_via(router: Router, token: str, *command: str) -> subprocess.CompletedProcess[bytes]:
        dial = ["--router-address", router.address, "--workflow-id", workflow, "--tls-ca", str(pki.ca)]
        return run_client("exec", *dial, "--token", token, "--", *command)

    alice = signer.token("alice", workflows=[workflow])
    result = exec_via(b, alice, "echo", "secure")
    assert (result.returncode, result.stdout) == (0, b"secure\n"), result.stderr
    # A's audit names the real user, whom only B authenticated.
    a.wait_for(lambda r: r.get("event") == "session start" and r.get("user") == "alice")

    result = exec_via(b, signer.token("mallory", workflows=["elsewhere"]), "true")
    assert result.returncode == 255 and b"PERMISSION_DENIED" in result.stderr, result.stderr
    result = exec_via(mistrusting, alice, "true")
    assert result.returncode == 255 and b"unreachable" in result.stderr, result.stderr


def test_without_redis_there_is_no_peer_service(router: Router) -> None:
    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(router.address) as channel:
            call = channel.stream_stream("/osmo.router.v1.RouterPeerService/Exec")()
            code: grpc.StatusCode = await call.code()
            return code

    assert asyncio.run(call()) == grpc.StatusCode.UNIMPLEMENTED
