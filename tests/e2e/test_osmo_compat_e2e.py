"""Migration for real (issue 16): OSMO's own CLI and backends through the router's WebSocket port.

The OSMO sides are the emulations in tests/osmo_emu (written from NVIDIA/OSMO's source, see
docs/migration.md): `client.py` for the OSMO CLI (websockets 11), `backend.py` run as a process for
osmo-ctrl/osmo-user. Pairings:

- old client + old backend, old client + gRPC agent, old client + WebSocket agent
  (`osmo-router agent --transport ws`), new client (`osmo-net-client --transport ws --session-key K
  --legacy-backend`) + old backend;

and cases: exec with a command, interactive exec with resize, TCP forward (one at a time, and a
burst before the backend joins), UDP, rsync up and down, a workflow named by its UUID, `?timeout=`,
JWT auth. Content is checked by sha256, ends by exit status or close code.

Cases an old URL cannot describe (our agents serving an old client's command, port, UDP or rsync
module; a workflow the client names otherwise than its backend) start with the orchestrator creating
the session through RouterControlService (tests/control_kit.py), as OSMO's service would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pty
import re
import shlex
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import control_kit as control
from tests.e2e.test_exec_e2e import PtyReader, _controlling_tty, _set_winsize
from tests.forward_servers import echo, tcp_server, udp_echo_server
from tests.harness import PYTHON, ROOT, AgentProc, Proc, Router, cli_env, client_cmd, run_client
from tests.osmo_emu import client as osmo
from tests.ws_fixtures import module_grpc_workflow, module_router  # noqa: F401 (fixtures router, grpc_workflow)
from tests.ws_kit import WsBackendProc

WAIT = 60.0
#: Alone, after the parallel part of the suite (scripts/test): the OSMO CLI emulation runs in the test
#: process, and under four parallel workers its close handshake sometimes ended as ConnectionClosedError
#: although the router closed with 1000 (seen in 2 of ~6 parallel runs, never alone; not yet explained).
pytestmark = pytest.mark.serial


def ws_base(router: Router) -> str:
    return f"ws://127.0.0.1:{router.ws_port}"


def new_key() -> str:
    """A key as the OSMO service issues it (common.generate_unique_id: uuid4 hex)."""
    return uuid.uuid4().hex


def run(coro_factory, timeout: float = WAIT):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            return await coro_factory()

    return asyncio.run(main())


class OldBackend(Proc):
    """tests/osmo_emu/backend.py as a process (osmo-ctrl + osmo-user); dial retries 0.2 s apart, not 1 s."""

    def __init__(self, router: Router, operation: str, workflow: str, key: str, *args: str, wait: bool = True) -> None:
        argv = [PYTHON, "-m", "tests.osmo_emu.backend", operation, "--base", ws_base(router)]
        argv += ["--workflow", workflow, "--key", key, "--retry-delay", "0.2", *args]
        super().__init__(argv, cwd=str(ROOT))
        if wait:
            self.wait_event("connected")


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    """200 KiB of base64 text lines (printable, so a terminal passes it unchanged but for CRLF)."""
    import base64

    path = tmp_path / "blob.txt"
    path.write_bytes(base64.encodebytes(os.urandom(150 * 1024)))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def terminal_text(data: bytes) -> bytes:
    """What a terminal's output stands for: CRLF back to LF."""
    return data.replace(b"\r\n", b"\n")


@pytest.fixture
def stopper() -> Iterator[list[Proc]]:
    """Processes to stop at the end of the test."""
    procs: list[Proc] = []
    yield procs
    for proc in procs:
        proc.stop()


# --- exec with a command (workflow.py _run_exec_command) -----------------------------------------


def _exec_command_via(router: Router, workflow: str, key: str, blob: Path, stopper: list[Proc], backend: str) -> None:
    command = f"cat {blob}"
    if backend == "old":
        stopper.append(OldBackend(router, "exec", workflow, key, "--command", command))
    elif backend == "ws":
        script = blob.parent / "entry.sh"
        script.write_text(f"#!/bin/sh\nexec {command}\n")
        script.chmod(0o755)
        stopper.append(WsBackendProc(router, workflow, key, "--shell", str(script), operation="exec"))
    text, ended = run(lambda: osmo.exec_command(ws_base(router), workflow, key, "", "task1"))
    assert ended.how == "closed ok" and ended.close_code == 1000, ended
    assert all(line.startswith("[task1] ") for line in text.splitlines(True))
    assert sha(terminal_text(bytes(ended.output))) == sha(blob.read_bytes())


@pytest.mark.parametrize("backend", ["old", "ws"])
def test_exec_command_old_client(router: Router, blob: Path, stopper: list[Proc], backend: str) -> None:
    """The entry command is the backend's (told out of band); the client sends the size and reads to the end.

    The WS agent stands in for the out-of-band command with its agent-wide `--shell` (the one
    place our agents take a command that no URL names).
    """
    _exec_command_via(router, f"wf-{uuid.uuid4().hex[:8]}", new_key(), blob, stopper, backend)


def test_exec_command_old_client_grpc_agent(router: Router, blob: Path, stopper: list[Proc]) -> None:
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    script = blob.parent / "entry.sh"
    script.write_text(f"#!/bin/sh\nexec cat {blob}\n")
    script.chmod(0o755)
    stopper.append(AgentProc(router.address, workflow, "--shell", str(script)))
    _text, ended = run(lambda: osmo.exec_command(ws_base(router), workflow, new_key(), "", "task1"))
    assert ended.how == "closed ok" and ended.close_code == 1000, ended
    assert sha(terminal_text(bytes(ended.output))) == sha(blob.read_bytes())


def _alias_router(tmp_path: Path, stopper: list[Proc]) -> tuple[Router, Path]:
    """A router with --ws-workflow-aliases at a file that does not exist yet (the test writes it)."""
    aliases = tmp_path / "aliases.json"
    router = Router("--ws-workflow-aliases", str(aliases))
    stopper.append(router)
    return router, aliases


def test_exec_workflow_named_by_uuid(router: Router, blob: Path, stopper: list[Proc]) -> None:
    """The user typed the workflow's name; osmo-ctrl dials with the workflow's ID (cmdArgs.Workflow).

    The orchestrator created the session with the workflow's names (CreateSession, no alias file).
    """
    name, workflow_id, key = f"my-wf-{uuid.uuid4().hex[:4]}", str(uuid.uuid4()), new_key()
    control.create_session(router.address, control.created(workflow_id, key, "exec", aliases=(name,)))
    stopper.append(OldBackend(router, "exec", workflow_id, key, "--command", f"cat {blob}"))
    _text, ended = run(lambda: osmo.exec_command(ws_base(router), name, key, "", "task1"), timeout=15)
    assert ended.how == "closed ok" and ended.close_code == 1000, ended
    assert sha(terminal_text(bytes(ended.output))) == sha(blob.read_bytes())


def test_exec_workflow_named_by_uuid_with_aliases(tmp_path: Path, blob: Path, stopper: list[Proc]) -> None:
    """--ws-workflow-aliases: the orchestrator maps the UUID the user typed to the ID osmo-ctrl dials with.

    The file is written after the router started: it is read again when it changes.
    """
    router, aliases = _alias_router(tmp_path, stopper)
    typed, workflow_id, key = str(uuid.uuid4()), f"my-wf-{uuid.uuid4().hex[:4]}", new_key()
    stopper.append(OldBackend(router, "exec", workflow_id, key, "--command", f"cat {blob}"))
    aliases.write_text(json.dumps({typed: workflow_id}))
    _text, ended = run(lambda: osmo.exec_command(ws_base(router), typed, key, "", "task1"), timeout=15)
    assert ended.how == "closed ok" and ended.close_code == 1000, ended
    assert sha(terminal_text(bytes(ended.output))) == sha(blob.read_bytes())


# --- interactive exec with resize (workflow.py _run_exec_interactive) ----------------------------


def _interactive(router: Router, workflow: str, key: str) -> osmo.Ended:
    async def body() -> osmo.Ended:
        term = osmo.Terminal(30, 100)
        session = asyncio.create_task(osmo.exec_interactive(ws_base(router), workflow, key, "", term))
        await term.keys.put(b"stty size\r")
        await term.wait_for(b"30 100")
        await term.resizes.put((40, 120))
        await asyncio.sleep(0.2)  # the resize is its own message; let it arrive before the next line
        await term.keys.put(b"stty size\r")
        await term.wait_for(b"40 120")
        await term.keys.put(b"exit\r")
        return await session

    ended: osmo.Ended = run(body)
    return ended


@pytest.mark.parametrize("backend", ["old", "grpc", "ws"])
def test_interactive_exec_with_resize(router: Router, grpc_workflow: str, stopper: list[Proc], backend: str) -> None:
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    if backend == "old":
        stopper.append(OldBackend(router, "exec", workflow, key, "--command", "/bin/sh"))
    elif backend == "ws":
        stopper.append(WsBackendProc(router, workflow, key, "--shell", "/bin/sh", operation="exec"))
    else:
        workflow = grpc_workflow
    ended = _interactive(router, workflow, key)
    # `exit` ends the shell; the session ends with a normal close (the old protocol has no exit status).
    assert ended.how == "closed ok" and ended.close_code == 1000, ended


# --- TCP port-forward (port_forward.py run_tcp_with_sock) ----------------------------------------


def _echo_through(port: int, size: int = 64 * 1024, timeout: float = 10) -> bool:
    """One connection: send `size` random bytes, read as many back, compare by sha256, close."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(payload)
        got = b""
        while len(got) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return sha(got) == sha(payload)


def _start_tcp_backend(router: Router, backend: str, workflow: str, key: str, target: int, wait: bool) -> Proc:
    if backend == "old":
        return OldBackend(router, "portforward", workflow, key, "--port", str(target), wait=wait)
    return WsBackendProc(router, workflow, key, operation="portforward")


@pytest.mark.parametrize(
    "backend",
    ["old", "ws", "old-created"],
)
def test_tcp_forward_one_at_a_time_old_client(router: Router, stopper: list[Proc], backend: str) -> None:
    """Old backend as with the old router; our WS agent and osmo-ctrl with a created session (the router
    serves both control channels, announcing each connection to the backend as OSMO's CLI did)."""
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with tcp_server(echo) as target:
        if backend != "old":
            control.create_session(router.address, control.created(workflow, key, "portforward", port=target))
            backend = backend.removesuffix("-created")
        stopper.append(_start_tcp_backend(router, backend, workflow, key, target, wait=True))

        async def body() -> list[bool]:
            forward, task = osmo.start_tcp_forward(ws_base(router), workflow, key)
            await forward.ready.wait()
            results = []
            for _ in range(3):
                results.append(await asyncio.to_thread(_echo_through, forward.port))
            forward.close.set()
            await task
            return results

        assert run(body) == [True, True, True]


def test_tcp_forward_old_client_grpc_agent(router: Router, grpc_workflow: str) -> None:
    """The orchestrator created the session (port): the router serves the control channel, each connection
    becomes a PortForward session to the gRPC agent on the created port."""
    key = new_key()
    with tcp_server(echo) as target:
        control.create_session(router.address, control.created(grpc_workflow, key, "portforward", port=target))

        async def body() -> list[bool]:
            forward, task = osmo.start_tcp_forward(ws_base(router), grpc_workflow, key, timeout=10)
            await forward.ready.wait()
            try:
                pending = [asyncio.to_thread(_echo_through, forward.port, 64 * 1024, 10) for _ in range(4)]
                results = list(await asyncio.gather(*pending))
                results.append(await asyncio.to_thread(_echo_through, forward.port, 1024, 5))
                return results
            finally:
                forward.close.set()
                await task

        assert run(body) == [True] * 5


def _reply_then_close(conn: socket.socket) -> None:
    """A target that answers a request and closes first (HTTP/1.0, a `QUIT`): 5 bytes in, 3 out, FIN."""
    got = b""
    while len(got) < 5 and (chunk := conn.recv(5 - len(got))):
        got += chunk
    conn.sendall(b"bye")


def _read_to_eof(port: int, timeout: float = 10) -> tuple[bytes, bool]:
    """Send 5 bytes, read until EOF: what came back, and whether the EOF came within `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"hello")
        got = b""
        try:
            while chunk := sock.recv(100):
                got += chunk
        except TimeoutError:
            return got, False
    return got, True


def test_tcp_forward_old_client_grpc_agent_target_closes_first(router: Router, grpc_workflow: str) -> None:
    """The container's server closes first: OSMO's CLI (no half-close) must see its connection end,
    as it did with osmo-ctrl, which closed both ends when one ended. Before, the agent's half-close was
    dropped towards the old client and the connection hung until the client's own EOF."""
    key = new_key()
    with tcp_server(_reply_then_close) as target:
        control.create_session(router.address, control.created(grpc_workflow, key, "portforward", port=target))

        async def body() -> tuple[bytes, bool]:
            forward, task = osmo.start_tcp_forward(ws_base(router), grpc_workflow, key, timeout=10)
            await forward.ready.wait()
            try:
                return await asyncio.to_thread(_read_to_eof, forward.port)
            finally:
                forward.close.set()
                await task

        assert run(body) == (b"bye", True)


def _sink(received: list[bytes], done: threading.Event) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        data = bytearray()
        with contextlib.suppress(OSError):
            while chunk := conn.recv(1 << 20):
                data += chunk
        received.append(bytes(data))
        done.set()

    return handle


@pytest.mark.parametrize("backend", ["grpc", "old"])
def test_tcp_forward_old_client_upload_then_close_delivers_every_byte(
    router: Router, grpc_workflow: str, stopper: list[Proc], backend: str
) -> None:
    """OSMO's CLI sends a file and closes its connection's WebSocket at the local EOF (1.6): the old
    router relayed every message before closing the backend. Before, the close was taken for a break
    and the frames still queued were dropped (the target got a reset, or a short file and an EOF)."""
    payload = os.urandom(8 * 1024 * 1024)
    received: list[bytes] = []
    done = threading.Event()
    workflow, key = (grpc_workflow, new_key()) if backend == "grpc" else (f"wf-{uuid.uuid4().hex[:8]}", new_key())
    with tcp_server(_sink(received, done)) as target:
        if backend == "grpc":
            control.create_session(router.address, control.created(workflow, key, "portforward", port=target))
        else:
            stopper.append(_start_tcp_backend(router, "old", workflow, key, target, wait=True))

        def send() -> None:
            with socket.create_connection(("127.0.0.1", forward.port), timeout=10) as sock:
                sock.sendall(payload)

        async def body() -> None:
            nonlocal forward
            forward, task = osmo.start_tcp_forward(ws_base(router), workflow, key, timeout=10)
            await forward.ready.wait()
            try:
                await asyncio.to_thread(send)
                await asyncio.to_thread(done.wait, WAIT)
            finally:
                forward.close.set()
                await task

        forward: osmo.Forward
        run(body)
    assert done.is_set()
    assert [len(r) for r in received] == [len(payload)] and sha(received[0]) == sha(payload)


def test_tcp_forward_burst_before_backend_joins_old_client(router: Router, stopper: list[Proc]) -> None:
    """Eight connections wait (their control JSONs queued in the router) until osmo-ctrl connects."""
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with tcp_server(echo) as target:

        async def body() -> list[bool]:
            forward, task = osmo.start_tcp_forward(ws_base(router), workflow, key)
            await forward.ready.wait()
            pending = [asyncio.create_task(asyncio.to_thread(_echo_through, forward.port)) for _ in range(8)]
            while forward.announced < 4:  # noqa: ASYNC110 - four control messages sent, to be queued
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            stopper.append(OldBackend(router, "portforward", workflow, key, "--port", str(target), wait=False))
            try:
                return list(await asyncio.wait_for(asyncio.gather(*pending), 15))
            finally:
                forward.close.set()
                await task

        assert run(body) == [True] * 8


# --- UDP port-forward (port_forward.py run_udp) --------------------------------------------------


def _udp_round(router: Router, workflow: str, key: str, start_backend) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Ten datagrams of distinct sizes from one local socket; the replies as they came back."""

    async def body() -> list[bytes]:
        ready, stop = asyncio.Event(), asyncio.Event()
        local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        local.bind(("127.0.0.1", 0))
        port = osmo.bind_local().getsockname()[1]  # a free port for the forward
        endpoint = f"api/router/portforward/{workflow}/client"
        task = asyncio.create_task(osmo.run_udp(ws_base(router), "127.0.0.1", port, endpoint, 30, key, "", ready, stop))
        await ready.wait()
        for n in range(10):
            local.sendto(bytes([65 + n]) * (100 + n), ("127.0.0.1", port))
        await asyncio.sleep(2.0)  # the datagrams are sent and queued in the router
        start_backend()
        local.settimeout(0.5)
        replies: list[bytes] = []
        loop_deadline = asyncio.get_running_loop().time() + 8
        while len(replies) < 10 and asyncio.get_running_loop().time() < loop_deadline:
            try:
                replies.append(await asyncio.to_thread(local.recv, 65536))
            except TimeoutError:
                continue
        stop.set()
        await task
        local.close()
        return replies

    replies: list[bytes] = run(body)
    return replies


def _udp_one_at_a_time(port: int, count: int = 5) -> list[bytes]:
    """Datagrams of distinct sizes from one local socket, each sent after the previous reply came back.

    A datagram whose reply is late is sent again (the first may arrive before the backend's socket
    exists); a second reply to an earlier datagram is then skipped, anything else is kept as it came.
    """
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as local:
        local.bind(("127.0.0.1", 0))
        local.settimeout(2)
        for n in range(count):
            datagram = bytes([97 + n]) * (50 + 7 * n)
            for _ in range(5):
                local.sendto(datagram, ("127.0.0.1", port))
                try:
                    while (reply := local.recv(65536)) in replies:
                        pass
                except TimeoutError:
                    continue
                replies.append(reply)
                break
    return replies


EXPECTED_UDP_SEQUENTIAL = [b"echo:" + bytes([97 + n]) * (50 + 7 * n) for n in range(5)]


@pytest.mark.parametrize("created", [False, True])
def test_udp_one_at_a_time_old_client_old_backend(router: Router, stopper: list[Proc], created: bool) -> None:
    """As with the old router; and with a created UDP session, where the router translates OSMO's framing
    to Datagram frames and back (lossless between two old sides)."""
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with udp_echo_server() as target:
        if created:
            session = control.created(workflow, key, "portforward", port=target, udp=True)
            control.create_session(router.address, session)
        stopper.append(OldBackend(router, "portforward", workflow, key, "--port", str(target), "--udp"))

        async def body() -> list[bytes]:
            ready, stop = asyncio.Event(), asyncio.Event()
            port = osmo.bind_local().getsockname()[1]
            endpoint = f"api/router/portforward/{workflow}/client"
            task = asyncio.create_task(
                osmo.run_udp(ws_base(router), "127.0.0.1", port, endpoint, 30, key, "", ready, stop)
            )
            await ready.wait()
            replies = await asyncio.to_thread(_udp_one_at_a_time, port)
            stop.set()
            await task
            return replies

        assert run(body) == EXPECTED_UDP_SEQUENTIAL


EXPECTED_UDP = sorted(b"echo:" + bytes([65 + n]) * (100 + n) for n in range(10))


def test_udp_one_datagram_per_message_old_client_old_backend(router: Router, stopper: list[Proc]) -> None:
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with udp_echo_server() as target:
        replies = _udp_round(
            router,
            workflow,
            key,
            lambda: stopper.append(
                OldBackend(router, "portforward", workflow, key, "--port", str(target), "--udp", wait=False)
            ),
        )
    assert sorted(replies) == EXPECTED_UDP


@pytest.mark.parametrize(
    "agent",
    ["grpc", "ws"],
)
def test_udp_old_client_our_agent(router: Router, grpc_workflow: str, stopper: list[Proc], agent: str) -> None:
    """A created UDP forward: OSMO's 6-byte sender header per message becomes the agent's Datagram frames."""
    workflow, key = grpc_workflow, new_key()
    start = lambda: None  # noqa: E731 - the gRPC agent is registered already
    if agent == "ws":
        workflow = f"wf-{uuid.uuid4().hex[:8]}"

        def start() -> None:
            stopper.append(WsBackendProc(router, workflow, key, operation="portforward"))

    with udp_echo_server() as target:
        session = control.created(workflow, key, "portforward", port=target, udp=True)
        control.create_session(router.address, session)
        replies = _udp_round(router, workflow, key, start)
    assert sorted(replies) == EXPECTED_UDP


# --- rsync (rsync.py RsyncClient) ----------------------------------------------------------------


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _make_source(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(300 * 1024))
    (root / "sub" / "b.txt").write_text("hello\n" * 1000)


def _rsync_up_down_old_client(
    router: Router, workflow: str, keys: tuple[str, str], tmp_path: Path, timeout: int = 30
) -> None:
    """An upload, then a download, each its own RsyncClient run with its own key.

    OSMO's CLI asks the service for each run (`POST api/workflow/{id}/rsync/task/{task}`), which
    answers a new key `RSYNC-<id>` (workflow_service.py action_request_helper) and tells osmo-ctrl
    to open a new control channel for it (ctrl.go ActionRsync -> userPortForwardTCP): one key
    serves one run, and the old router ended the backend's control channel with the client's.
    """
    src, down = tmp_path / "src", tmp_path / "down"
    _make_source(src)

    async def body() -> tuple[tuple[int, str], tuple[int, str]]:
        up = await osmo.rsync_client(
            ws_base(router),
            workflow,
            keys[0],
            "",
            direction="upload",
            local_path=f"{src}/",
            remote_path="data/",
            timeout=timeout,
        )
        back = await osmo.rsync_client(
            ws_base(router),
            workflow,
            keys[1],
            "",
            direction="download",
            local_path=str(down),
            remote_path="data",
            timeout=timeout,
        )
        return up, back

    (up_code, up_err), (down_code, down_err) = run(body, timeout=4 * timeout)
    assert up_code == 0, up_err
    assert down_code == 0, down_err
    assert _tree(down / "data") == _tree(src)


def test_backend_speaks_first_before_the_client_joins(router: Router) -> None:
    """The rsync daemon greets first (`@RSYNCD: ...`): what a backend sends while it waits reaches the client first.

    osmo-ctrl dials the connection's backend side as soon as the control message arrives and
    forwards the daemon's greeting at once, often before the CLI's side of that connection joined.
    """
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    greeting = b"@RSYNCD: 31.0 sha512 sha256 sha1 md5 md4\n"

    async def body() -> tuple[bytes, bytes]:
        backend = await osmo.websockets.client.connect(
            f"{ws_base(router)}/api/router/portforward/{workflow}/backend/{key}", open_timeout=10
        )
        await backend.send(greeting)
        await asyncio.sleep(0.3)  # the router reads (and keeps) it while no client is there
        client = await osmo.create_websocket(ws_base(router), f"api/router/rsync/{workflow}/client/{key}")
        async with asyncio.timeout(10):
            first = await client.recv()
            await client.send(b"osmo\n")
            answer = await backend.recv()
        await client.close()
        await backend.close()
        return bytes(first) if isinstance(first, bytes) else first.encode(), bytes(answer)  # type: ignore[arg-type]

    assert run(body, timeout=30) == (greeting, b"osmo\n")


def test_rsync_up_and_down_old_client_old_backend(router: Router, stopper: list[Proc], tmp_path: Path) -> None:
    workflow, keys = f"wf-{uuid.uuid4().hex[:8]}", (new_key(), new_key())
    remote = tmp_path / "remote"
    remote.mkdir()
    for key in keys:  # osmo-ctrl opens one control channel per rsync action (per key)
        stopper.append(OldBackend(router, "rsync", workflow, key, "--root", str(remote)))
    _rsync_up_down_old_client(router, workflow, keys, tmp_path, timeout=8)
    assert _tree(remote / "data") == _tree(tmp_path / "src")


@pytest.mark.parametrize(
    "agent",
    ["grpc", "ws"],
)
def test_rsync_up_and_down_old_client_our_agent(
    router: Router, grpc_workflow: str, tmp_path: Path, stopper: list[Proc], agent: str
) -> None:
    """Created rsync sessions (module `osmo` at a directory): the agent serves rsync's daemon protocol."""
    workflow, keys = grpc_workflow, (new_key(), new_key())
    remote = tmp_path / "remote"
    remote.mkdir()
    if agent == "ws":
        workflow = f"wf-{uuid.uuid4().hex[:8]}"
    for key in keys:
        session = control.created(workflow, key, "rsync", module="osmo", path=str(remote))
        control.create_session(router.address, session)
        if agent == "ws":
            stopper.append(WsBackendProc(router, workflow, key, operation="rsync"))
    _rsync_up_down_old_client(router, workflow, keys, tmp_path, timeout=8)
    assert _tree(remote / "data") == _tree(tmp_path / "src")


# --- ?timeout= (rsync's RsyncClient passes it) ---------------------------------------------------


def test_timeout_expiry_closes_with_1000(router: Router) -> None:
    async def body() -> osmo.Ended:
        endpoint = f"api/router/rsync/wf-none-{uuid.uuid4().hex[:6]}/client/{new_key()}"
        ws = await osmo.create_websocket(ws_base(router), endpoint, params={"timeout": "1"}, timeout=10)
        ended = osmo.Ended()
        try:
            await ws.recv()
        except osmo.websockets.exceptions.ConnectionClosed as err:
            ended.closed_by(err)
        return ended

    ended = run(body, timeout=20)
    assert (ended.how, ended.close_code) == ("closed ok", 1000), ended


# --- auth (--auth=jwt) ---------------------------------------------------------------------------


#: What marks OSMO's backend tokens in these tests (`--ws-backend-role`): OSMO's default `ctrl_roles`.
OSMO_CTRL_ROLE = "osmo-ctrl"


def _jwt_router(tmp_path: Path, stopper: list[Proc], *args: str) -> tuple[Router, object]:
    from tests.security_kit import Signer

    signer = Signer.rs256()
    (tmp_path / "jwt.pem").write_bytes(signer.public_pem())
    pem = str(tmp_path / "jwt.pem")
    router = Router("--tls-enabled=false", "--auth=jwt", "--jwt-public-key", pem, *args, secure=True)
    stopper.append(router)
    return router, signer


def _osmo_ctrl_token(signer: object, workflow: str) -> str:
    """The token osmo-ctrl holds: auth_service.py _create_jwt_from_refresh_token -> auth.py create_idtoken_jwt.

    `unique_name` (the submitting user), `roles` (service_auth.ctrl_roles, by default
    `["osmo-user", "osmo-ctrl"]`), `osmo_workflow_id`, and no `sub`.
    """
    return signer.token(  # type: ignore[attr-defined,no-any-return]
        None, unique_name="alice", roles=["osmo-user", OSMO_CTRL_ROLE], osmo_workflow_id=workflow, iss="osmo"
    )


async def _handshake_status(url: str, token: str, first: bytes | None = None, reason: bool = False) -> int | str:
    """The HTTP status of a WebSocket handshake with `Authorization: Bearer token`; 101 when upgraded.

    With `first`, an upgraded WebSocket sends it and reads on: its close (`code reason`) is the answer.
    With `reason`, a refused handshake answers `status Osmo-Error` (the router's reason header).
    """
    headers = {"Authorization": f"Bearer {token}"}
    try:
        ws = await osmo.websockets.client.connect(url, extra_headers=headers, open_timeout=10)
    except osmo.websockets.exceptions.InvalidStatusCode as err:
        if reason:
            return f"{err.status_code} {err.headers.get('Osmo-Error', '')}"
        return int(err.status_code)
    if first is None:
        await ws.close()
        return 101
    await ws.send(first)
    try:
        async with asyncio.timeout(10):
            await ws.recv()
    except osmo.websockets.exceptions.ConnectionClosed as err:
        return f"{err.rcvd.code if err.rcvd else None} {err.rcvd.reason if err.rcvd else ''}"
    await ws.close()
    return "open"


@pytest.mark.parametrize("client", ["old", "new"])
def test_old_backend_under_jwt_auth(tmp_path: Path, blob: Path, stopper: list[Proc], client: str) -> None:
    """A JWT router with --ws-backend-role: the CLI with the user's token, osmo-ctrl with the workflow's."""
    router, signer = _jwt_router(tmp_path, stopper, "--ws-backend-role", OSMO_CTRL_ROLE, "--ws-backend-issuer", "osmo")
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    user = signer.token("alice", workflows=[workflow])  # type: ignore[attr-defined]
    service = _osmo_ctrl_token(signer, workflow)
    command = f"cat {blob}" if client == "old" else f"sh -c 'cat > {blob.parent / 'got.txt'}'"
    backend = OldBackend(router, "exec", workflow, key, "--command", command, "--token", service, wait=False)
    stopper.append(backend)
    first = backend.wait_for(lambda r: r.get("event") in ("connected", "dial failed"))
    assert first["event"] == "connected", first
    if client == "new":
        args = [*new_client_args(router, workflow, key), "--token", user]
        result = run_client("exec", *args, input=blob.read_bytes(), timeout=60)
        assert result.returncode == 0, result.stderr
        assert sha((blob.parent / "got.txt").read_bytes()) == sha(blob.read_bytes())
        return

    async def body() -> osmo.Ended:
        ws = await osmo.create_websocket(ws_base(router), f"api/router/exec/{workflow}/client/{key}", token=user)
        ended = osmo.Ended()
        await ws.send(osmo.size_message(24, 80))
        try:
            while True:
                ended.output += await ws.recv()  # type: ignore[operator]
        except osmo.websockets.exceptions.ConnectionClosed as err:
            ended.closed_by(err)
        return ended

    ended = run(body)
    assert ended.close_code == 1000, ended
    assert sha(terminal_text(bytes(ended.output))) == sha(blob.read_bytes())


def test_osmo_backend_token_serves_its_workflow_on_the_ws_backend_endpoint_only(
    tmp_path: Path, stopper: list[Proc]
) -> None:
    """An OSMO backend token: refused for another workflow, on the client endpoint, and without the flag."""
    router, signer = _jwt_router(tmp_path, stopper, "--ws-backend-role", OSMO_CTRL_ROLE)
    plain, _ = _jwt_router(tmp_path, stopper)  # same key, no --ws-backend-role
    workflow, other = f"wf-{uuid.uuid4().hex[:8]}", f"wf-{uuid.uuid4().hex[:8]}"
    service = _osmo_ctrl_token(signer, workflow)

    def url(r: Router, wf: str, side: str) -> str:
        return f"{ws_base(r)}/api/router/exec/{wf}/{side}/{new_key()}?timeout=1"

    size = osmo.size_message(24, 80)

    async def body() -> dict[str, int | str]:
        return {
            "own workflow, backend": await _handshake_status(url(router, workflow, "backend"), service),
            "other workflow, backend": await _handshake_status(url(router, other, "backend"), service),
            "own workflow, client": await _handshake_status(url(router, workflow, "client"), service, size),
            "router without the flag": await _handshake_status(url(plain, workflow, "backend"), service),
        }

    assert run(body, timeout=60) == {
        "own workflow, backend": 101,
        "other workflow, backend": 403,
        "own workflow, client": 403,  # refused before the upgrade, as the other refusals (docs/migration.md)
        "router without the flag": 401,
    }


def test_workflow_alias_is_authorized_as_the_resolved_workflow(tmp_path: Path, stopper: list[Proc]) -> None:
    """Under --auth=jwt an aliased URL is the workflow it resolves to: a token for the typed name only is refused."""
    aliases = tmp_path / "aliases.json"
    typed, workflow_id = str(uuid.uuid4()), f"wf-{uuid.uuid4().hex[:8]}"
    aliases.write_text(json.dumps({typed: workflow_id}))
    router, signer = _jwt_router(tmp_path, stopper, "--ws-workflow-aliases", str(aliases))
    user = signer.token("alice", workflows=[typed])  # type: ignore[attr-defined]
    url = f"{ws_base(router)}/api/router/exec/{typed}/client/{new_key()}"
    answer = run(lambda: _handshake_status(url, user, osmo.size_message(24, 80), reason=True), timeout=30)
    assert answer == f"403 PERMISSION_DENIED: alice has no access to workflow {workflow_id!r}"


def test_old_client_with_user_token_reaches_grpc_agent_under_jwt(tmp_path: Path, stopper: list[Proc]) -> None:
    """The OSMO CLI's `Authorization: Bearer <id token>` is what the router checks: with our agent it works."""
    router, signer = _jwt_router(tmp_path, stopper)
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent_token = signer.token("pod-1", workflows=[workflow], role="agent")  # type: ignore[attr-defined]
    stopper.append(AgentProc(router.address, workflow, "--token", agent_token, "--shell", "/bin/sh"))
    user = signer.token("alice", workflows=[workflow])  # type: ignore[attr-defined]

    async def body() -> osmo.Ended:
        term = osmo.Terminal(24, 80)
        endpoint = f"api/router/exec/{workflow}/client/{new_key()}"
        ws = await osmo.create_websocket(ws_base(router), endpoint, token=user)
        await ws.send(osmo.size_message(24, 80))
        ended = osmo.Ended()
        await ws.send(b"echo to''ken-ok; exit\r")
        try:
            while True:
                data = await ws.recv()
                await term.write(data if isinstance(data, bytes) else data.encode())
        except osmo.websockets.exceptions.ConnectionClosed as err:
            ended.closed_by(err)
        ended.output = term.output
        return ended

    ended = run(body)
    assert ended.close_code == 1000, ended
    assert b"token-ok" in ended.output


# --- new client (`osmo-net-client --transport ws --session-key K --legacy-backend`) + old backend ----


def new_client_args(router: Router, workflow: str, key: str, transport: str = "ws") -> list[str]:
    """The new CLI for an old backend (`--legacy-backend` works over either transport; WS is the migration's)."""
    return [
        "--router-address", router.address, "--ws-address", f"127.0.0.1:{router.ws_port}",
        "--workflow-id", workflow, "--tls=false", "--transport", transport, "--session-key", key, "--legacy-backend",
    ]  # fmt: skip


@pytest.mark.parametrize("transport", ["ws", "grpc"])
def test_new_client_exec_pipe_eof_reaches_old_backend(
    router: Router, blob: Path, stopper: list[Proc], transport: str
) -> None:
    """stdin EOF becomes the terminal's ^D: the backend's `cat` ends, and so does the session (exit 0)."""
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    out = blob.parent / "received.txt"
    stopper.append(OldBackend(router, "exec", workflow, key, "--command", f"sh -c 'stty -echo; cat > {out}'"))
    args = new_client_args(router, workflow, key, transport)
    result = run_client("exec", *args, input=blob.read_bytes(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert sha(out.read_bytes()) == sha(blob.read_bytes())


def test_new_client_exec_unfinished_line_then_eof(router: Router, stopper: list[Proc]) -> None:
    """Input that does not end a line: ^D^D (the first ends the line, the second is the EOF)."""
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    command = """sh -c 'stty -echo; printf count=; wc -c'"""
    stopper.append(OldBackend(router, "exec", workflow, key, "--command", command))
    result = run_client("exec", *new_client_args(router, workflow, key), input=b"one\ntwo", timeout=60)
    assert result.returncode == 0, result.stderr
    # (the terminal may echo the input before `stty -echo` ran)
    assert re.search(rb"count=\s*7\s*$", result.stdout), result.stdout


def test_new_client_exec_command_is_refused(router: Router) -> None:
    result = run_client("exec", *new_client_args(router, "wf-x", new_key()), "--", "cat", timeout=30)
    assert result.returncode == 2
    assert b"cannot be carried" in result.stderr


def test_new_client_legacy_needs_session_key(router: Router) -> None:
    args = new_client_args(router, "wf-x", "")
    result = run_client("exec", *args, timeout=30)
    assert result.returncode == 2
    assert b"--legacy-backend needs --session-key" in result.stderr


def test_new_client_tty_size_and_resize_old_backend(router: Router, stopper: list[Proc]) -> None:
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    script = "trap 'echo size=$(stty size)' WINCH; echo size=$(stty size); while :; do sleep 0.05; done"
    stopper.append(OldBackend(router, "exec", workflow, key, "--command", f"sh -c {shlex.quote(script)}"))
    master, slave = pty.openpty()
    _set_winsize(slave, 30, 100)
    proc = subprocess.Popen(
        client_cmd("exec", *new_client_args(router, workflow, key), "--tty"),
        stdin=slave, stdout=slave, stderr=slave, env=cli_env({"TERM": "xterm"}), preexec_fn=_controlling_tty,
    )  # fmt: skip
    os.close(slave)
    screen = PtyReader(master)
    try:
        screen.wait_for(rb"size=30 100")
        _set_winsize(master, 40, 120)
        screen.wait_for(rb"size=40 120")
        os.write(master, b"\x03")  # Ctrl-C is a byte on the terminal: the remote shell dies of SIGINT
        assert proc.wait(30) == 0  # an old backend reports no exit status: a clean end is 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def _new_client_forward(
    router: Router, workflow: str, key: str, target: int, transport: str = "ws"
) -> tuple[Proc, int]:
    from tests.forward_servers import start_forward

    proc, ports = start_forward(new_client_args(router, workflow, key, transport), f":{target}")
    return proc, ports[0]


@pytest.mark.parametrize("transport", ["ws", "grpc"])
def test_new_client_tcp_forward_one_at_a_time(router: Router, stopper: list[Proc], transport: str) -> None:
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with tcp_server(echo) as target:
        stopper.append(OldBackend(router, "portforward", workflow, key, "--port", str(target)))
        proc, port = _new_client_forward(router, workflow, key, target, transport)
        stopper.append(proc)
        assert [_echo_through(port) for _ in range(3)] == [True, True, True]


@pytest.mark.parametrize("transport", ["ws", "grpc"])
def test_new_client_tcp_forward_upload_then_close_delivers_every_byte(
    router: Router, stopper: list[Proc], transport: str
) -> None:
    """The new CLI's local EOF towards an old backend is a half-close behind the data, which the router
    turns into a normal close after it (osmo-ctrl takes no half-close). Before, the CLI aborted the
    connection's session at the local EOF: the frames still queued were dropped and the target got a
    short file and a clean EOF."""
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    payload = os.urandom(8 * 1024 * 1024)
    received: list[bytes] = []
    done = threading.Event()
    with tcp_server(_sink(received, done)) as target:
        stopper.append(OldBackend(router, "portforward", workflow, key, "--port", str(target)))
        proc, port = _new_client_forward(router, workflow, key, target, transport)
        stopper.append(proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
        assert done.wait(WAIT)
    assert [len(r) for r in received] == [len(payload)] and sha(received[0]) == sha(payload)


def test_new_client_tcp_forward_burst_before_backend_joins(router: Router, stopper: list[Proc]) -> None:
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with tcp_server(echo) as target:
        proc, port = _new_client_forward(router, workflow, key, target)
        stopper.append(proc)

        async def body() -> list[bool]:
            pending = [asyncio.create_task(asyncio.to_thread(_echo_through, port)) for _ in range(8)]
            await asyncio.sleep(2.0)  # the control messages are sent and queued in the router
            stopper.append(OldBackend(router, "portforward", workflow, key, "--port", str(target), wait=False))
            return list(await asyncio.wait_for(asyncio.gather(*pending), 20))

        assert run(body) == [True] * 8


def test_new_client_udp_one_at_a_time(router: Router, stopper: list[Proc]) -> None:
    from tests.forward_servers import start_forward

    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with udp_echo_server() as target:
        stopper.append(OldBackend(router, "portforward", workflow, key, "--port", str(target), "--udp"))
        proc, ports = start_forward(new_client_args(router, workflow, key), "--protocol", "udp", f":{target}")
        stopper.append(proc)
        assert _udp_one_at_a_time(ports[0]) == EXPECTED_UDP_SEQUENTIAL


def test_new_client_rsync_up_and_down_old_backend(router: Router, stopper: list[Proc], tmp_path: Path) -> None:
    """rsync's daemon protocol over a remote shell, through one of the old backend's port-forward connections."""
    remote, src, down = tmp_path / "remote", tmp_path / "src", tmp_path / "down"
    remote.mkdir()
    _make_source(src)
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    for direction in ("up", "down"):
        key = new_key()  # the OSMO service hands out a key per rsync request
        backend = OldBackend(router, "rsync", workflow, key, "--root", str(remote))
        stopper.append(backend)
        args = new_client_args(router, workflow, key)
        paths = [f"{src}/", ":/osmo/run/workspace/data/"] if direction == "up" else [":data/", f"{down}/"]
        result = run_client("rsync", *args, *paths, timeout=120)
        assert result.returncode == 0, result.stderr
    assert _tree(remote / "data") == _tree(src)
    assert _tree(down) == _tree(src)


def test_new_client_rsync_path_outside_the_module_is_refused(router: Router, tmp_path: Path) -> None:
    result = run_client("rsync", *new_client_args(router, "wf-x", new_key()), f"{tmp_path}/", ":/etc/", timeout=30)
    assert result.returncode == 2
    assert b"outside module 'osmo'" in result.stderr


def test_new_client_workflow_named_differently_from_the_backend(tmp_path: Path, stopper: list[Proc]) -> None:
    """The user gives the workflow's name; osmo-ctrl dialed with its ID: resolved by --ws-workflow-aliases."""
    router, aliases = _alias_router(tmp_path, stopper)
    workflow_id, key = str(uuid.uuid4()), new_key()
    aliases.write_text(json.dumps({f"my-wf-{key[:4]}": workflow_id}))
    stopper.append(OldBackend(router, "exec", workflow_id, key, "--command", "sh -c 'stty -echo; cat'"))
    result = run_client("exec", *new_client_args(router, f"my-wf-{key[:4]}", key), input=b"hi\n", timeout=30)
    assert result.returncode == 0, result.stderr
    assert b"hi" in result.stdout


@pytest.mark.parametrize("transport", ["ws", "grpc"])
def test_new_client_workflow_named_differently_from_the_backend_without_aliases(
    router: Router, stopper: list[Proc], transport: str
) -> None:
    """Without --ws-workflow-aliases: the created session names the workflow's name, so the two meet."""
    workflow_id, key = str(uuid.uuid4()), new_key()
    session = control.created(workflow_id, key, "exec", aliases=(f"my-wf-{key[:4]}",))
    control.create_session(router.address, session)
    stopper.append(OldBackend(router, "exec", workflow_id, key, "--command", "sh -c 'stty -echo; cat'"))
    args = new_client_args(router, f"my-wf-{key[:4]}", key, transport)
    result = run_client("exec", *args, input=b"hi\n", timeout=30)
    assert result.returncode == 0, result.stderr
    assert b"hi" in result.stdout


@pytest.mark.parametrize("transport", ["ws", "grpc"])
def test_new_client_tcp_forward_old_backend_with_a_created_session(
    router: Router, stopper: list[Proc], transport: str
) -> None:
    """A created TCP key: the router serves both ends of the control channel (the client's over either
    transport); the new CLI and osmo-ctrl (no token needed for its connections' keys) meet on each connection."""
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    with tcp_server(echo) as target:
        control.create_session(router.address, control.created(workflow, key, "portforward", port=target))
        stopper.append(OldBackend(router, "portforward", workflow, key, "--port", str(target)))
        proc, port = _new_client_forward(router, workflow, key, target, transport)
        stopper.append(proc)
        assert [_echo_through(port) for _ in range(3)] == [True, True, True]
