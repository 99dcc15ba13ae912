"""Through a real HTTP CONNECT proxy (Debian's tinyproxy): the native channel, grpcio's own, the
WebSocket transport (ws:// and wss://), the exclusions and the proxy's refusals (src/osmo_router/dial/proxy.py,
src/osmo_router/transport/ws_dial.py)."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from osmo_router.dial.errors import Peer, probe_peer
from tests.harness import AgentProc, Router, run_client
from tests.redis_harness import free_port
from tests.security_kit import Pki
from tests.ws_kit import WsBackendProc, client_args, new_key


class TinyProxy:
    """tinyproxy on a loopback port, logging every CONNECT it is asked for."""

    def __init__(self, directory: Path, basic_auth: tuple[str, str] | None = None) -> None:
        binary = shutil.which("tinyproxy")
        assert binary, "tinyproxy is missing: scripts/install installs it"
        self.port = free_port()
        self.log = directory / f"tinyproxy-{self.port}.log"
        config = directory / f"tinyproxy-{self.port}.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 600", "LogLevel Connect", "Allow 127.0.0.1"]
        if basic_auth:
            lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
        config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(config)], stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while "Reloading config file finished" not in self.log.read_text():  # bounded: it logs once it listens
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def connects(self) -> list[str]:
        """The host:port of every CONNECT asked for so far."""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP", self.log.read_text())

    def stop(self) -> None:
        """Stop the proxy."""
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[TinyProxy]:
    proc = TinyProxy(tmp_path)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    proc = Router()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def workflow(router: Router) -> Iterator[str]:
    name = f"wf-proxy-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, name)
    yield name
    agent.stop()


def _args(router: Router, workflow: str) -> list[str]:
    return ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]


@pytest.mark.parametrize("channel", ["native", "grpcio"])
def test_exec_through_the_proxy_the_environment_names(
    router: Router, workflow: str, proxy: TinyProxy, channel: str
) -> None:
    """https_proxy, as gRPC core reads it: our native channel tunnels as grpcio's own does."""
    env = {"https_proxy": proxy.url}
    # --transport grpc: no reachability probe (which also goes through the proxy), only the channel's dial.
    args = [*_args(router, workflow), "--transport", "grpc", "--grpc-channel", channel]
    result = run_client("exec", *args, "--", "echo", "hi", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hi\n"
    assert f"127.0.0.1:{router.port}" in proxy.connects()


def test_an_agent_registers_through_the_proxy(router: Router, proxy: TinyProxy) -> None:
    name = f"wf-proxy-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, name, env={"http_proxy": proxy.url})  # waits for its registration
    try:
        assert f"127.0.0.1:{router.port}" in proxy.connects()
        result = run_client("exec", *_args(router, name), "--", "echo", "served")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"served\n"
    finally:
        agent.stop()


def test_no_proxy_and_an_unreachable_proxy(router: Router, workflow: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    bypassed = run_client(
        "exec", *_args(router, workflow), "--", "true", env={"grpc_proxy": dead, "no_proxy": "127.0.0.0/8"}
    )
    assert bypassed.returncode == 0, bypassed.stderr
    failed = run_client("exec", *_args(router, workflow), "--", "true", env={"HTTPS_PROXY": dead})
    assert failed.returncode == 255
    assert b"cannot reach the proxy 127.0.0.1:" in failed.stderr, failed.stderr


def test_a_proxy_that_wants_credentials(router: Router, workflow: str, tmp_path: Path) -> None:
    proxy = TinyProxy(tmp_path, basic_auth=("alice", "s3cret"))
    try:
        refused = run_client("exec", *_args(router, workflow), "--", "true", env={"https_proxy": proxy.url})
        assert refused.returncode == 255
        assert b"refused to connect to 127.0.0.1:" in refused.stderr and b"407" in refused.stderr, refused.stderr
        assert b"http://user:password@host:port" in refused.stderr
        with_credentials = proxy.url.replace("http://", "http://alice:s3cret@")
        result = run_client("exec", *_args(router, workflow), "--", "echo", "in", env={"https_proxy": with_credentials})
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"in\n"
    finally:
        proxy.stop()


def test_the_websocket_transport_over_tls_is_tunnelled(tmp_path: Path, proxy: TinyProxy) -> None:
    """wss:// goes through a CONNECT tunnel (TLS end to end); the probe that picks the transport uses it too."""
    pki = Pki.create(tmp_path)
    router = Router("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--auth=none", secure=True)
    name = f"wf-proxy-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, name, "--tls-ca", str(pki.ca), tls=True)
    try:
        args = ["--router-address", router.address, "--ws-address", f"wss://127.0.0.1:{router.ws_port}"]
        args += ["--workflow-id", name, "--tls-ca", str(pki.ca), "--transport", "ws"]
        result = run_client("exec", *args, "--", "echo", "wss", env={"https_proxy": proxy.url})
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"wss\n"
        assert f"127.0.0.1:{router.ws_port}" in proxy.connects()
    finally:
        agent.stop()
        router.stop()


def _ws_exec_and_backend(router: Router, env: dict[str, str]) -> None:
    """An exec over --transport ws served by `agent --transport ws`, both with `env`; both must succeed."""
    name, key = f"wf-proxy-{uuid.uuid4().hex[:8]}", new_key()
    backend = WsBackendProc(router, name, key, env=env)  # waits until its WebSocket is open
    try:
        result = run_client("exec", *client_args(router, name, "ws", "--session-key", key), "--", "echo", "ws", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"ws\n"
        assert backend.wait_exit(20) == 0, backend.lines[-5:]
    finally:
        backend.stop()


def test_a_plain_websocket_is_tunnelled_too(router: Router, proxy: TinyProxy) -> None:
    """ws:// goes through a CONNECT tunnel as wss:// does (RFC 6455 section 4.1), for the client and for
    `agent --transport ws`: not as a forwarded request, which tinyproxy does not carry as a WebSocket."""
    _ws_exec_and_backend(router, {"http_proxy": proxy.url})
    assert proxy.connects().count(f"127.0.0.1:{router.ws_port}") == 2, proxy.log.read_text()[-2000:]


def test_no_proxy_bypasses_the_proxy_for_a_websocket(router: Router) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    _ws_exec_and_backend(router, {"http_proxy": dead, "no_proxy": "localhost,127.0.0.1"})
    failed = run_client("exec", *client_args(router, "wf", "ws"), "--", "true", env={"http_proxy": dead})
    assert failed.returncode == 255
    assert b"cannot reach the proxy 127.0.0.1:" in failed.stderr, failed.stderr


def _first_request(listener: socket.socket, into: list[bytes]) -> None:
    """Read one HTTP request head (at most 64 KiB) from the listener's first connection, refuse it with a 403."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536 and (chunk := conn.recv(4096)):
            head += chunk
        into.append(head)
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_proxy_credentials_go_to_the_proxy_only(tmp_path: Path) -> None:
    """Through a proxy that wants credentials, the WebSocket request the router's port receives inside the
    tunnel is origin-form and carries no Proxy-Authorization (the CONNECT did)."""
    proxy = TinyProxy(tmp_path, basic_auth=("alice", "s3cret"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    port, received = listener.getsockname()[1], list[bytes]()
    reader = threading.Thread(target=_first_request, args=(listener, received), daemon=True)
    reader.start()
    try:
        args = ["--router-address", f"127.0.0.1:{free_port()}", "--ws-address", f"127.0.0.1:{port}"]
        args += ["--workflow-id", "wf", "--tls=false", "--transport", "ws"]
        env = {"http_proxy": proxy.url.replace("http://", "http://alice:s3cret@")}
        result = run_client("exec", *args, "--", "true", env=env)
        reader.join(30)
    finally:
        listener.close()
        proxy.stop()
    assert result.returncode == 255 and b"403" in result.stderr, result.stderr  # the stand-in's refusal
    assert f"127.0.0.1:{port}" in proxy.connects()
    assert received and received[0].startswith(b"GET /api/router/exec/wf/client/"), received
    assert b"proxy-authorization" not in received[0].lower()


def test_the_diagnosis_probe_goes_through_the_proxy(
    proxy: TinyProxy, tmp_path: Path, router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed dial the client and agent probe the router to name the cause (dial/errors.py): through the
    proxy the dial took, or the probe judges a path the connection never takes (one the proxy exists to avoid)."""
    (tmp_path / "pki").mkdir()
    pki = Pki.create(tmp_path / "pki")
    tls_router = Router(
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--auth=none", secure=True
    )
    try:
        monkeypatch.setenv("https_proxy", proxy.url)
        found = asyncio.run(probe_peer(tls_router.address)), asyncio.run(probe_peer(router.address))
        assert found == (Peer.TLS, Peer.NOT_TLS)
        assert {f"127.0.0.1:{tls_router.port}", f"127.0.0.1:{router.port}"} <= set(proxy.connects())
        # As a user meets it: a plaintext client through the proxy is told the router speaks TLS.
        args = ["--router-address", tls_router.address, "--workflow-id", "wf", "--tls=false", "--transport", "grpc"]
        result = run_client("exec", *args, "--", "true", env={"https_proxy": proxy.url})
        assert result.returncode == 255
        assert b"the router speaks TLS; drop --tls=false" in result.stderr, result.stderr
    finally:
        tls_router.stop()
