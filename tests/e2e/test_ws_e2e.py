"""The WebSocket migration end to end: every client/agent transport pairing through one router.

Real router, agents, WS backends and clients as processes on loopback; the old protocol is also
spoken byte for byte by raw aiohttp WebSockets.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from osmo_router.wire.wsproto import MAX_REQUEST_TARGET
from tests.e2e.test_exec_e2e import check_tty_size_resize_and_ctrl_c
from tests.e2e.test_rsync_e2e import make_tree, snapshot
from tests.harness import Proc, Router, client_cmd, run_client
from tests.security_kit import Pki, Signer
from tests.ws_fixtures import module_grpc_workflow, module_router  # noqa: F401 (fixtures router, grpc_workflow)
from tests.ws_kit import (
    WsBackendProc,
    client_args,
    delta,
    new_key,
    receive_close,
    receive_until,
    run,
    transport_counts,
    ws_url,
)

PAIRINGS = [("grpc", "grpc"), ("ws", "grpc"), ("grpc", "ws"), ("ws", "ws")]
IDS = [f"{c}-{a}" for c, a in PAIRINGS]


class Pairing:
    """Client flags for one pairing; a WS agent is a backend started for an orchestrator key."""

    def __init__(
        self, router: Router, grpc_workflow: str, client: str, agent: str, *backend_args: str, operation: str = "exec"
    ) -> None:
        self.router, self.client, self.agent = router, client, agent
        self.backend: WsBackendProc | None = None
        extra: list[str] = []
        workflow = grpc_workflow
        if agent == "ws":
            workflow, key = f"wf-ws-{uuid.uuid4().hex[:8]}", new_key()
            self.backend = WsBackendProc(router, workflow, key, *backend_args, operation=operation)
            extra = ["--session-key", key]
        self.args = client_args(router, workflow, client, *extra)

    def finish(self, served: bool = True) -> None:
        """Check that a WS backend served its session (or failed to, when `served` is False) and ended."""
        if self.backend is not None:
            try:
                assert self.backend.wait_exit(20) == (0 if served else 1), self.backend.lines[-5:]
            finally:
                self.backend.stop()


@pytest.mark.parametrize(("client", "agent"), PAIRINGS, ids=IDS)
def test_exec_blob_exit_code_and_metrics(router: Router, grpc_workflow: str, client: str, agent: str) -> None:
    before = transport_counts(router, "exec")
    pairing = Pairing(router, grpc_workflow, client, agent)
    blob = os.urandom(6 * 1024 * 1024)
    try:
        result = run_client("exec", *pairing.args, "--", "sh", "-c", "cat; echo to-err >&2; exit 5", input=blob)
    finally:
        pairing.finish()
    assert result.returncode == 5, result.stderr
    assert hashlib.sha256(result.stdout[: len(blob)]).digest() == hashlib.sha256(blob).digest()
    # Our client and WS agent offer stderr apart (wsproto.STDERR_SUBPROTOCOL): no pairing merges it.
    assert (result.stdout[len(blob) :], result.stderr) == (b"", b"to-err\n")
    assert delta(before, transport_counts(router, "exec")) == {f"client_{client}": 1, f"agent_{agent}": 1}


@pytest.mark.parametrize(("client", "agent"), PAIRINGS, ids=IDS)
def test_exec_env_reaches_the_command(router: Router, grpc_workflow: str, client: str, agent: str) -> None:
    pairing = Pairing(router, grpc_workflow, client, agent)
    script = 'printf "%s|%s|%s" "$GREETING" "$SPACED" "$FROM_HERE"'
    env_args = ["-e", "GREETING=hello", "--env", "SPACED=a b=c&d", "-e", "FROM_HERE"]
    try:
        result = run_client("exec", *pairing.args, *env_args, "--", "sh", "-c", script, env={"FROM_HERE": "local"})
    finally:
        pairing.finish()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello|a b=c&d|local"


@pytest.mark.parametrize(("client", "agent"), PAIRINGS, ids=IDS)
def test_exec_workdir(router: Router, grpc_workflow: str, client: str, agent: str, tmp_path: Path) -> None:
    (tmp_path / "sub dir").mkdir()
    pairing = Pairing(router, grpc_workflow, client, agent)
    try:
        result = run_client("exec", *pairing.args, "-w", str(tmp_path / "sub dir"), "--", "pwd")
    finally:
        pairing.finish()
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == str(tmp_path / "sub dir")


def test_exec_workdir_that_cannot_be_entered_is_named(router: Router, grpc_workflow: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = run_client("exec", *client_args(router, grpc_workflow, "grpc"), "--workdir", str(missing), "--", "pwd")
    assert result.returncode == 255
    expected = f"the working directory {missing} cannot be entered: no such directory (exec --workdir)"
    assert expected.encode() in result.stderr, result.stderr


def test_a_command_too_long_for_a_websocket_url_is_refused_before_dialling(router: Router, grpc_workflow: str) -> None:
    """The router reads request targets of up to MAX_REQUEST_TARGET bytes; the client checks its URL against
    that and says what to do instead of the router's bare 400 ("Invalid response status")."""
    for length, first_line in ((MAX_REQUEST_TARGET, b"HTTP/1.1 404"), (MAX_REQUEST_TARGET + 1, b"HTTP/1.0 400")):
        target = "/nothing?" + "a" * (length - len("/nothing?"))
        with socket.create_connection(("127.0.0.1", router.ws_port), timeout=10) as raw:
            raw.sendall(f"GET {target} HTTP/1.1\r\nHost: router\r\n\r\n".encode())
            assert raw.recv(200).startswith(first_line), length
    args = client_args(router, grpc_workflow, "ws")
    result = run_client("exec", *args, "--", "echo", "a" * 20_000)
    assert result.returncode == 255
    assert b"too long for the WebSocket transport" in result.stderr and b"--transport grpc" in result.stderr
    assert not any("bad HTTP request" in line and "/api/router/exec/" in line for line in router.lines)


@pytest.mark.parametrize(("client", "agent"), PAIRINGS[1:], ids=IDS[1:])
def test_tty_size_resize_and_ctrl_c(router: Router, grpc_workflow: str, client: str, agent: str) -> None:
    pairing = Pairing(router, grpc_workflow, client, agent)
    try:
        # SIGWINCH becomes a RESIZE message on a WS leg, a Resize frame on a gRPC one.
        check_tty_size_resize_and_ctrl_c(pairing.args)
    finally:
        pairing.finish()


def test_old_client_bytes_to_a_grpc_agent(router: Router, grpc_workflow: str) -> None:
    """An old client: size JSON first, RESIZE messages, empty message = EOF, no extensions."""

    async def body(http: aiohttp.ClientSession) -> None:
        url = ws_url(router, "exec", grpc_workflow, "client", new_key())
        async with http.ws_connect(url) as ws:
            await ws.send_bytes(b'{"Rows": 30, "Cols": 100}')
            await ws.send_bytes(b"stty size\r")
            await receive_until(ws, b"30 100")
            await ws.send_bytes(b'\x00RESIZE:{"Rows": 40, "Cols": 120}')
            await ws.send_bytes(b"stty size\r")
            await receive_until(ws, b"40 120")
            # A reader in the terminal's cooked mode (readline's own mode would swallow an early ^D).
            await ws.send_bytes(b"exec sh -c 'echo rea''dy; cat'\r")
            await receive_until(ws, b"ready\r\n")
            await ws.send_bytes(b"")  # EOF: cat reads end of input and exits, and the session ends
            code, reason, _ = await receive_close(ws)
            assert (code, reason) == (1000, "")  # no exit status in the old protocol

    run(body)


def test_old_client_meets_old_backend_byte_for_byte(router: Router) -> None:
    """Both sides old: every byte passes unchanged, the size message verbatim, EOF and close too."""
    workflow, key = f"wf-old-{uuid.uuid4().hex[:8]}", new_key()
    every_byte = bytes(range(256)) * 64

    async def body(http: aiohttp.ClientSession) -> None:
        backend = await http.ws_connect(ws_url(router, "exec", workflow, "backend", key))
        client = await http.ws_connect(ws_url(router, "exec", workflow, "client", key, "timeout=10"))
        await client.send_bytes(b'{"Rows": 24, "Cols": 80}')
        assert (await backend.receive_bytes()) == b'{"Rows": 24, "Cols": 80}'
        for message in (b"ls -l\r", every_byte, b'\x00RESIZE:{"Rows": 50, "Cols": 132}', b""):
            await client.send_bytes(message)
            assert (await backend.receive_bytes()) == message
        await backend.send_bytes(every_byte)
        assert (await client.receive_bytes()) == every_byte
        await backend.close()
        code, reason, rest = await receive_close(client)
        assert (code, reason, rest) == (1000, "", b"")

    run(body)


def test_old_port_forward_control_pipe_passes_through(router: Router) -> None:
    """The old port-forward control channel (JSON between old client and old backend) is just bytes."""
    workflow, key = f"wf-pf-{uuid.uuid4().hex[:8]}", new_key()

    async def body(http: aiohttp.ClientSession) -> None:
        client = await http.ws_connect(ws_url(router, "portforward", workflow, "client", key))
        backend = await http.ws_connect(ws_url(router, "portforward", workflow, "backend", key))
        control = b'{"key": "PORTFORWARD-1", "cookie": ""}'
        await client.send_bytes(control)
        assert (await backend.receive_bytes()) == control
        await client.close()
        code, _, _ = await receive_close(backend)
        assert code is not None

    run(body)


def test_rendezvous_timeout_query_parameter(router: Router) -> None:
    async def body(http: aiohttp.ClientSession) -> None:
        # A new client (extensions asked for) learns why: 4000 and the status.
        url = ws_url(router, "portforward", f"wf-none-{uuid.uuid4().hex[:8]}", "client", new_key(), "timeout=0.5&eof=1")
        async with http.ws_connect(url) as ws:
            code, reason, _ = await receive_close(ws, timeout=10)
        assert code == 4000
        assert reason.startswith("DEADLINE_EXCEEDED")
        # An old client gets what the old router sent: a normal close.
        url = ws_url(router, "portforward", f"wf-none-{uuid.uuid4().hex[:8]}", "client", new_key(), "timeout=0.5")
        async with http.ws_connect(url) as ws:
            code, reason, _ = await receive_close(ws, timeout=10)
        assert code == 1000

    run(body)


def test_bad_size_message_is_refused(router: Router, grpc_workflow: str) -> None:
    async def body(http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(ws_url(router, "exec", grpc_workflow, "client", new_key())) as ws:
            await ws.send_bytes(b"not json")
            code, reason, _ = await receive_close(ws)
        assert code == 4000
        assert reason.startswith("INVALID_ARGUMENT")

    run(body)


def test_version_and_unknown_operation(router: Router) -> None:
    async def body(http: aiohttp.ClientSession) -> None:
        async with http.get(f"http://127.0.0.1:{router.ws_port}/api/router/version") as resp:
            assert resp.status == 200
            assert await resp.json() == "0.1.0"
        async with http.get(ws_url(router, "teleport", "wf", "client", "k")) as resp:
            assert resp.status == 400

    run(body)


def _send_and_read_reply(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_a_request_the_router_cannot_parse_is_one_info_line_not_an_error() -> None:
    """A header over aiohttp's line limit, to the WebSocket and the metrics port: a 400, one line in the
    log naming the peer, no ERROR record with a traceback of the parser (a bad client is not an alert)."""
    router = Router()
    try:
        oversized = b"GET /api/router/version HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"y" * 20000 + b"\r\n\r\n"
        for port in (router.ws_port, router.metrics_port):
            reply = _send_and_read_reply(port, oversized)
            assert reply.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), reply[:200]
        # The router still answers a good request; by then both bad ones were logged.
        good = _send_and_read_reply(router.ws_port, b"GET /api/router/version HTTP/1.0\r\n\r\n")
        assert good.split(b"\r\n", 1)[0].endswith(b" 200 OK"), good[:200]
        router.wait_for(lambda r: len([e for e in router.events() if e.get("event") == "bad http request"]) == 2)
        bad = [r for r in router.events() if r.get("event") == "bad http request"]
        assert all(r["level"] == "info" and "from 127.0.0.1: 400 Got more than" in r["msg"] for r in bad), bad
        assert all(len(r["msg"]) < 300 for r in bad), bad
        assert not [r for r in router.events() if r.get("level") == "error"]
    finally:
        router.stop()


def test_fallback_to_websocket_when_grpc_port_is_closed(router: Router, grpc_workflow: str) -> None:
    before = transport_counts(router, "exec")
    args = ["--router-address", "127.0.0.1:1", "--ws-address", f"127.0.0.1:{router.ws_port}"]
    result = run_client("exec", *args, "--workflow-id", grpc_workflow, "--tls=false", "--", "echo", "via-ws")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"via-ws\n"
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "falling back to WebSocket" in lines[0], lines
    assert delta(before, transport_counts(router, "exec")) == {"client_ws": 1, "agent_grpc": 1}


@pytest.mark.parametrize("command", ["exec", "rsync"])
def test_when_neither_port_answers_the_error_names_both(command: str, grpc_workflow: str, tmp_path: Path) -> None:
    """A mistyped --router-address must not read as a problem with a WebSocket port nobody asked for."""
    args = ["--router-address", "127.0.0.1:1", "--ws-address", "127.0.0.1:2", "--workflow-id", grpc_workflow]
    words = ["--", "true"] if command == "exec" else [f"{tmp_path}/", ":/tmp/never/"]
    result = run_client(command, *args, "--tls=false", *words, timeout=60)
    assert result.returncode == 255
    lines = result.stderr.decode().splitlines()
    error = f"osmo-net-client: {command}: cannot reach the router: no answer on its gRPC port (127.0.0.1:1)"
    assert lines[-1].startswith(error), lines
    assert "nor on its WebSocket port (ws://127.0.0.1:2)" in lines[-1]
    assert not any("unexpectedly closed" in line for line in lines), lines  # rsync never started


def test_explicit_grpc_does_not_fall_back(router: Router, grpc_workflow: str) -> None:
    args = ["--router-address", "127.0.0.1:1", "--ws-address", f"127.0.0.1:{router.ws_port}", "--transport", "grpc"]
    result = run_client("exec", *args, "--workflow-id", grpc_workflow, "--tls=false", "--", "true", timeout=60)
    assert result.returncode == 255
    assert b"falling back" not in result.stderr


@pytest.mark.parametrize(("percent", "expected"), [(0, "ws"), (100, "grpc")])
def test_grpc_percent_rollout(router: Router, grpc_workflow: str, percent: int, expected: str) -> None:
    before = transport_counts(router, "exec")
    args = client_args(router, grpc_workflow, "grpc")[:-2]  # no explicit --transport
    result = run_client("exec", *args, "--grpc-percent", str(percent), "--", "echo", "canary")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"canary\n"
    assert delta(before, transport_counts(router, "exec")) == {f"client_{expected}": 1, "agent_grpc": 1}


def test_ws_client_gone_hangs_up_the_remote_process(router: Router, grpc_workflow: str, tmp_path: Path) -> None:
    """A close ends the pipe (old protocol): the session fails and the agent hangs up its process."""
    marker = tmp_path / "hup"
    script = f"trap 'echo hup > {marker}; exit 0' HUP; echo started; while :; do sleep 0.1; done"
    client = Proc(client_cmd("exec", *client_args(router, grpc_workflow, "ws"), "--", "sh", "-c", script))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        client.popen.kill()
        client.wait_exit(10)
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline, "the remote process was not hung up"
            time.sleep(0.05)
        wanted = {"event": "session end", "transport": "ws", "workflow": grpc_workflow, "status": "CANCELLED"}
        router.wait_for(lambda r: wanted.items() <= r.items())
    finally:
        client.stop()


@pytest.mark.parametrize("client", ["grpc", "ws"])
def test_a_killed_ws_backend_fails_the_session_not_exit_0(router: Router, client: str) -> None:
    """A new backend (`agent --transport ws`) always closes with a close frame; one killed mid-exec is the
    agent disconnecting, as for a gRPC agent, not a clean exit 0 (which the old protocol's backends,
    ending every exec without a close frame, still get)."""
    workflow, key = f"wf-kill-{uuid.uuid4().hex[:8]}", new_key()
    backend = WsBackendProc(router, workflow, key)
    args = client_args(router, workflow, client, "--session-key", key)
    exec_ = Proc(client_cmd("exec", *args, "--", "sh", "-c", "echo started; sleep 60"))
    try:
        exec_.wait_for(lambda r: r["line"] == "started", stdout=True)
        backend.popen.kill()
        assert exec_.wait_exit(30) == 255, exec_.lines
        assert any("the backend disconnected" in line for line in exec_.lines), exec_.lines
        wanted = {"event": "session end", "workflow": workflow, "status": "UNAVAILABLE"}
        router.wait_for(lambda r: wanted.items() <= r.items())
    finally:
        exec_.stop()
        backend.stop()


def _raw_upgrade(port: int, ca: Path, path: str, token: str) -> tuple[int, str]:
    """A WebSocket upgrade request over TLS, as a bare HTTP client sends it: the status and the Osmo-Error header."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
        headers |= {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Authorization": f"Bearer {token}"}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Osmo-Error", "")
    finally:
        conn.close()


def test_jwt_and_tls_on_the_websocket_port(tmp_path: Path) -> None:
    """wss with the gRPC port's certificate, and the router's JWT rules, on every WS side."""
    pki, signer = Pki.create(tmp_path), Signer.rs256()
    (tmp_path / "jwt.pem").write_bytes(signer.public_pem())
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    router = Router(*tls, "--auth=jwt", "--jwt-public-key", str(tmp_path / "jwt.pem"), secure=True)
    workflow, key = f"wf-sec-{uuid.uuid4().hex[:8]}", new_key()
    alice = signer.token("alice", workflows=[workflow])
    agent_token = signer.token("pod-1", workflows=[workflow], role="agent")
    backend = WsBackendProc(router, workflow, key, "--tls-ca", str(pki.ca), "--token", agent_token, tls=True)
    try:
        common = ["--router-address", router.address, "--ws-address", f"127.0.0.1:{router.ws_port}"]
        common += ["--workflow-id", workflow, "--tls-ca", str(pki.ca)]
        refused = run_client("exec", *common, "--transport", "ws", "--", "true")
        assert refused.returncode == 255 and b"UNAUTHENTICATED" in refused.stderr
        assert b"bearer token" in refused.stderr, refused.stderr  # the router's reason, not just "401"
        # A gRPC client meets the WS backend on the orchestrator's key, both with their tokens.
        result = run_client("exec", *common, "--token", alice, "--session-key", key, "--", "echo", "wss")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"wss\n"
        assert backend.wait_exit(20) == 0
        # An agent's token cannot open a client session over WebSocket either.
        agent_as_user = run_client("exec", *common, "--transport", "ws", "--token", agent_token, "--", "true")
        assert agent_as_user.returncode == 255 and b"PERMISSION_DENIED" in agent_as_user.stderr
        # Both refused before the upgrade, as docs/migration.md says (they were upgraded, then closed with 4000).
        stranger = signer.token("mallory", workflows=["another-workflow"])
        for token in (stranger, agent_token):
            status, reason = _raw_upgrade(
                router.ws_port, pki.ca, f"/api/router/exec/{workflow}/client/{new_key()}", token
            )
            assert status == 403, (status, reason)
            assert "PERMISSION_DENIED" in reason, reason
    finally:
        backend.stop()
        router.stop()


@pytest.mark.parametrize(("client", "agent"), PAIRINGS, ids=IDS)
def test_rsync_tree_and_blob_intact(
    router: Router, grpc_workflow: str, client: str, agent: str, tmp_path: Path
) -> None:
    local, remote = tmp_path / "local", tmp_path / "container" / "data"
    local.mkdir()
    remote.parent.mkdir()
    make_tree(local, big=False)
    (local / "blob.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    before = transport_counts(router, "rsync")
    pairing = Pairing(router, grpc_workflow, client, agent, operation="rsync")
    try:
        result = run_client("rsync", *pairing.args, f"{local}/", f":{remote}/", timeout=120)
    finally:
        pairing.finish()
    assert result.returncode == 0, result.stderr
    assert snapshot(remote) == snapshot(local)  # modes, links, and the sha256 of every file
    assert delta(before, transport_counts(router, "rsync")) == {f"client_{client}": 1, f"agent_{agent}": 1}


def test_rsync_missing_behind_a_ws_backend_is_reported(router: Router, grpc_workflow: str, tmp_path: Path) -> None:
    """A new WS backend reports errors as the router does (close 4000, `CODE: message`)."""
    pairing = Pairing(router, grpc_workflow, "ws", "ws", "--rsync-binary", "/nonexistent/rsync", operation="rsync")
    try:
        result = run_client("rsync", *pairing.args, f"{tmp_path}/", ":/tmp/x/", timeout=60)
    finally:
        pairing.finish()
    assert result.returncode == 127, result.stderr
    assert b"rsync is missing in the container" in result.stderr
