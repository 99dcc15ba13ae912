"""RouterControlService (issue 16): an orchestrator creates sessions ahead of time; real router, agents, OSMO sides.

What a created session carries reaches our agents (the exec command and terminal mode for an old
client); the session key is an old backend's credential under --auth=jwt; and every bad input
(wrong role, unknown or expired key, wrong workflow or operation, malformed control message, limits)
gets a clear error without harming anything else.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest

from tests import control_kit as control
from tests.e2e.test_osmo_compat_e2e import (
    OldBackend,
    _echo_through,
    _handshake_status,
    _jwt_router,
    new_key,
    run,
    sha,
    terminal_text,
    ws_base,
)
from tests.forward_servers import echo, recv_exactly, tcp_server
from tests.harness import AgentProc, Proc, Router, cli_env, metric_value, router_cmd
from tests.osmo_emu import client as osmo
from tests.ws_fixtures import module_grpc_workflow, module_router  # noqa: F401 (fixtures router, grpc_workflow)
from tests.ws_kit import WsBackendProc


@pytest.fixture
def stopper() -> list[Proc]:  # type: ignore[misc]
    """Processes to stop at the end of the test."""
    procs: list[Proc] = []
    yield procs  # type: ignore[misc]
    for proc in procs:
        proc.stop()


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status code a control call fails with (OK when it succeeds)."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("agent", "tty"), [("grpc", False), ("grpc", True), ("ws", False)])
def test_old_client_exec_runs_the_created_command_on_our_agent(
    router: Router, grpc_workflow: str, tmp_path: Path, stopper: list[Proc], agent: str, tty: bool
) -> None:
    """OSMO's group exec names no command; the created one runs (pipe or terminal), the output is the file's."""
    blob = tmp_path / "blob.txt"
    blob.write_bytes(b"line of the created command's output\n" * 3000)
    workflow, key = grpc_workflow, new_key()
    if agent == "ws":
        workflow = f"wf-{uuid.uuid4().hex[:8]}"
    session = control.created(workflow, key, "exec", command=["cat", str(blob)], tty=tty)
    control.create_session(router.address, session)
    if agent == "ws":
        stopper.append(WsBackendProc(router, workflow, key, operation="exec"))
    _text, ended = run(lambda: osmo.exec_command(ws_base(router), workflow, key, "", "task1"))
    assert ended.how == "closed ok" and ended.close_code == 1000, ended
    output = terminal_text(bytes(ended.output)) if tty else bytes(ended.output)
    assert sha(output) == sha(blob.read_bytes())
    assert control.get_session(router.address, key).used is True


def test_control_calls_refuse_bad_input_clearly(router: Router, grpc_workflow: str) -> None:
    """Unknown keys, duplicates, parameters of another operation, a bad port: each its own status."""
    key = new_key()
    control.create_session(router.address, control.created(grpc_workflow, key, "exec"))
    duplicate = control.created(grpc_workflow, key, "exec")
    wrong_params = control.created(grpc_workflow, new_key(), "exec", port=80)
    no_workflow = control.created("", new_key(), "exec")
    assert {
        "get unknown": _code(lambda: control.get_session(router.address, new_key())),
        "terminate unknown": _code(lambda: control.terminate_session(router.address, new_key())),
        "duplicate key": _code(lambda: control.create_session(router.address, duplicate)),
        "exec with a port": _code(lambda: control.create_session(router.address, wrong_params)),
        "no workflow": _code(lambda: control.create_session(router.address, no_workflow)),
    } == {
        "get unknown": grpc.StatusCode.NOT_FOUND,
        "terminate unknown": grpc.StatusCode.NOT_FOUND,
        "duplicate key": grpc.StatusCode.ALREADY_EXISTS,
        "exec with a port": grpc.StatusCode.INVALID_ARGUMENT,
        "no workflow": grpc.StatusCode.INVALID_ARGUMENT,
    }
    # The first session is untouched by the refusals, and counted.
    assert control.get_session(router.address, key).session.workflow_id == grpc_workflow
    held = metric_value(router.metrics_text(), "router_grpc_created_sessions")
    control.terminate_session(router.address, key)
    assert metric_value(router.metrics_text(), "router_grpc_created_sessions") == held - 1 >= 0


def test_created_key_refuses_another_workflow_and_operation(router: Router, grpc_workflow: str) -> None:
    """An old client presenting a created key under another workflow or operation is refused."""
    key = new_key()
    control.create_session(router.address, control.created(grpc_workflow, key, "exec", command=["true"]))
    size = osmo.size_message(24, 80)

    async def body() -> dict[str, int | str]:
        base = f"{ws_base(router)}/api/router"
        return {
            "other workflow": await _handshake_status(f"{base}/exec/wf-other/client/{key}", "", size),
            "other operation": await _handshake_status(f"{base}/rsync/{grpc_workflow}/client/{key}", "", size),
        }

    # Refused before the upgrade: an HTTP status (the cause in the x-osmo-error header).
    assert run(body, timeout=30) == {"other workflow": 403, "other operation": 400}


def test_created_session_expires(router: Router, grpc_workflow: str) -> None:
    """ttl_seconds=1: the session is gone once it passed (GetSession NOT_FOUND), without a janitor tick."""
    key = new_key()
    response = control.create_session(router.address, control.created(grpc_workflow, key, "exec", ttl=1))
    assert response.expires_in_seconds <= 1
    deadline = time.monotonic() + 10
    while _code(lambda: control.get_session(router.address, key)) == grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the created session never expired"
        time.sleep(0.1)
    # Its key now names nothing: an old client's URL with it is an ordinary (uncreated) session again,
    # and creating it anew works.
    control.create_session(router.address, control.created(grpc_workflow, key, "exec"))


def test_terminate_ends_the_running_session(router: Router, grpc_workflow: str) -> None:
    """TerminateSession ends what runs on the key: the old client is closed with 4000 NOT_FOUND."""
    key = new_key()
    control.create_session(router.address, control.created(grpc_workflow, key, "exec", command=["sleep", "60"]))

    async def body() -> tuple[int, osmo.Ended]:
        ws = await osmo.create_websocket(ws_base(router), f"api/router/exec/{grpc_workflow}/client/{key}")
        await ws.send(osmo.size_message(24, 80))
        while control.get_session(router.address, key).active == 0:  # noqa: ASYNC110 - bounded by run's timeout
            await asyncio.sleep(0.05)
        ended_count = (await asyncio.to_thread(control.terminate_session, router.address, key)).ended
        ended = osmo.Ended()
        try:
            while True:
                await ws.recv()
        except osmo.websockets.exceptions.ConnectionClosed as err:
            ended.closed_by(err)
        return ended_count, ended

    count, ended = run(body, timeout=30)
    assert count == 1
    assert (ended.close_code, ended.close_reason) == (4000, "NOT_FOUND: the session was terminated by its orchestrator")
    assert _code(lambda: control.get_session(router.address, key)) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "message",
    [b'{"key": "a", "cookie": ""}{"key": "b", "cookie": ""}', b"[" * 100_000],
    ids=["two-objects", "nested-past-the-parser-depth"],
)
def test_malformed_control_message_ends_that_channel_only(router: Router, grpc_workflow: str, message: bytes) -> None:
    """Two JSON objects in one message (osmo-ctrl's Unmarshal fails too), or arrays nested past the JSON
    parser's depth (a RecursionError, not a ValueError): that channel closes with 4000; another created
    forward on the same agent keeps working."""
    logged = len(router.lines)
    bad, good = new_key(), new_key()
    with tcp_server(echo) as target:
        for key in (bad, good):
            control.create_session(router.address, control.created(grpc_workflow, key, "portforward", port=target))

        async def body() -> tuple[osmo.Ended, bool]:
            ws = await osmo.create_websocket(ws_base(router), f"api/router/portforward/{grpc_workflow}/client/{bad}")
            await ws.send(message)
            ended = osmo.Ended()
            try:
                await ws.recv()
            except osmo.websockets.exceptions.ConnectionClosed as err:
                ended.closed_by(err)
            forward, task = osmo.start_tcp_forward(ws_base(router), grpc_workflow, good, timeout=10)
            await forward.ready.wait()
            try:
                return ended, await asyncio.to_thread(_echo_through, forward.port, 4096, 5)
            finally:
                forward.close.set()
                await task

        ended, ok = run(body, timeout=30)
    assert ended.close_code == 4000 and ended.close_reason.startswith("INVALID_ARGUMENT: a control message"), ended
    assert ok is True
    assert not [line for line in router.lines[logged:] if "Error handling request" in line or "Traceback" in line]


def _service_token(signer: object, sub: str = "osmo-service", workflows: tuple[str, ...] = ("*",)) -> str:
    return signer.token(sub, workflows=list(workflows), role="service")  # type: ignore[attr-defined,no-any-return]


def test_control_api_needs_a_service_token_under_jwt(tmp_path: Path, stopper: list[Proc]) -> None:
    """Only `role: service` may create; a service reaches only its workflows; per-service limits are its own."""
    router, signer = _jwt_router(tmp_path, stopper, "--max-created-per-service", "2")
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    user = signer.token("alice", workflows=[workflow])  # type: ignore[attr-defined]
    agent = signer.token("pod-1", workflows=[workflow], role="agent")  # type: ignore[attr-defined]
    narrow = _service_token(signer, "svc-narrow", ("wf-other",))
    first, second = _service_token(signer, "svc-1"), _service_token(signer, "svc-2")

    def create(token: str | None) -> grpc.StatusCode:
        return _code(lambda: control.create_session(router.address, control.created(workflow, "", "exec"), token))

    assert {
        "no token": create(None),
        "user token": create(user),
        "agent token": create(agent),
        "service for another workflow": create(narrow),
        "service": create(first),
        "service, second": create(first),
        "service, third (limit 2)": create(first),
        "another service": create(second),
    } == {
        "no token": grpc.StatusCode.UNAUTHENTICATED,
        "user token": grpc.StatusCode.PERMISSION_DENIED,
        "agent token": grpc.StatusCode.PERMISSION_DENIED,
        "service for another workflow": grpc.StatusCode.PERMISSION_DENIED,
        "service": grpc.StatusCode.OK,
        "service, second": grpc.StatusCode.OK,
        "service, third (limit 2)": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "another service": grpc.StatusCode.OK,
    }


def test_old_backend_presents_the_created_key_under_jwt(tmp_path: Path, stopper: list[Proc]) -> None:
    """osmo-ctrl with no token: the created key is its credential, for that session only."""
    router, signer = _jwt_router(tmp_path, stopper)
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    service, user = _service_token(signer), signer.token("alice", workflows=[workflow])  # type: ignore[attr-defined]
    control.create_session(router.address, control.created(workflow, key, "exec"), service)
    backend = OldBackend(router, "exec", workflow, key, "--command", "sh -c 'echo served-by-key'", wait=False)
    stopper.append(backend)
    assert backend.wait_for(lambda r: r.get("event") in ("connected", "dial failed"))["event"] == "connected"

    async def refusals() -> dict[str, int | str]:
        base = f"{ws_base(router)}/api/router"
        return {
            "unknown key": await _handshake_status(f"{base}/exec/{workflow}/backend/{new_key()}", ""),
            "other workflow": await _handshake_status(f"{base}/exec/wf-other/backend/{key}", ""),
            "other operation": await _handshake_status(f"{base}/rsync/{workflow}/backend/{key}", ""),
        }

    async def session() -> osmo.Ended:
        ws = await osmo.create_websocket(ws_base(router), f"api/router/exec/{workflow}/client/{key}", token=user)
        await ws.send(osmo.size_message(24, 80))
        ended = osmo.Ended()
        try:
            while True:
                ended.output += await ws.recv()  # type: ignore[operator]
        except osmo.websockets.exceptions.ConnectionClosed as err:
            ended.closed_by(err)
        return ended

    assert run(refusals, timeout=30) == {"unknown key": 401, "other workflow": 403, "other operation": 400}
    ended = run(session, timeout=30)
    assert ended.close_code == 1000, ended
    assert b"served-by-key" in ended.output


def test_created_exec_with_a_registered_agent_under_jwt(tmp_path: Path, stopper: list[Proc]) -> None:
    """A user token reaches the created command on a gRPC agent; the agent is asked with its own token."""
    router, signer = _jwt_router(tmp_path, stopper)
    workflow, key = f"wf-{uuid.uuid4().hex[:8]}", new_key()
    agent = signer.token("pod-1", workflows=[workflow], role="agent")  # type: ignore[attr-defined]
    stopper.append(AgentProc(router.address, workflow, "--token", agent))
    session = control.created(workflow, key, "exec", command=["echo", "created-ok"])
    control.create_session(router.address, session, _service_token(signer))
    user = signer.token("alice", workflows=[workflow])  # type: ignore[attr-defined]

    async def body() -> osmo.Ended:
        ws = await osmo.create_websocket(ws_base(router), f"api/router/exec/{workflow}/client/{key}", token=user)
        await ws.send(osmo.size_message(24, 80))
        ended = osmo.Ended()
        try:
            while True:
                ended.output += await ws.recv()  # type: ignore[operator]
        except osmo.websockets.exceptions.ConnectionClosed as err:
            ended.closed_by(err)
        return ended

    ended = run(body, timeout=30)
    assert ended.close_code == 1000, ended
    assert bytes(ended.output) == b"created-ok\n"


def _session_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`osmo-router session ARGS` as a process."""
    return subprocess.run(router_cmd("session", *args), capture_output=True, timeout=60, env=cli_env())


def test_session_commands_create_get_and_terminate(router: Router, grpc_workflow: str) -> None:
    """`osmo-router session create|get|terminate`: the API from the command line, JSON out, refusals exit 1."""
    dial = ["--router-address", router.address, "--tls=false"]
    name = f"my-{uuid.uuid4().hex[:6]}"
    made = _session_cli(
        "create", *dial, "--workflow-id", grpc_workflow, "--alias", name, "--operation", "exec",
        "--", "echo", "made by the cli",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["session"]["session_key"]
    _text, ended = run(lambda: osmo.exec_command(ws_base(router), name, key, "", "task1"))
    assert (ended.close_code, bytes(ended.output)) == (1000, b"made by the cli\n"), ended
    got = _session_cli("get", *dial, key)
    assert got.returncode == 0 and json.loads(got.stdout)["used"] is True, got
    assert _session_cli("terminate", *dial, key).returncode == 0
    gone = _session_cli("get", *dial, key)
    assert (gone.returncode, gone.stderr.strip()) == (1, b"NOT_FOUND: no such created session")
    wrong = _session_cli("create", *dial, "--workflow-id", grpc_workflow, "--operation", "exec", "--port", "80")
    assert wrong.returncode == 2 and b"takes no parameters of another operation" in wrong.stderr


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """A client's (masked) WebSocket frame, payload under 126 bytes."""
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_ws_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The server's next (unmasked) frame: (opcode, payload)."""

    def exactly(count: int) -> bytes:
        data = recv_exactly(sock, count)
        if len(data) < count:
            raise ConnectionError("the router closed the connection")
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    return first & 0x0F, exactly(length)


def test_the_router_waits_for_an_old_clients_close_frame_before_closing_the_connection(
    router: Router, grpc_workflow: str
) -> None:
    """RFC 6455 7.1.1: the server closes TCP after the client's close frame. A client that answers a
    moment late (OSMO's CLI under load) otherwise finds the connection gone, and its websockets
    reports the close handshake as failed ("closed error" in the emulation, rarely). A raw client
    here, which answers the close frame 1 s late, on purpose."""
    key = new_key()
    control.create_session(router.address, control.created(grpc_workflow, key, "exec", command=["echo", "done"]))
    sock = socket.create_connection(("127.0.0.1", router.ws_port), timeout=30)
    with sock:
        path = f"/api/router/exec/{grpc_workflow}/client/{key}"
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: router\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(_ws_frame(0x2, osmo.size_message(24, 80)))  # as OSMO's group exec starts
        output = b""
        while (frame := _read_ws_frame(sock))[0] != 0x8:
            output += frame[1]
        code = int.from_bytes(frame[1][:2], "big")
        sock.settimeout(1.0)
        try:  # the close frame is not answered yet: the router must still hold the connection
            early = sock.recv(1)
            held = f"closed early ({early!r})"
        except TimeoutError:
            held = "held"
        except ConnectionError as err:
            held = f"reset early ({err})"
        sock.settimeout(30)
        sock.sendall(_ws_frame(0x8, (1000).to_bytes(2, "big")))
        closed = sock.recv(1) == b""  # then the router closes it
    assert (output, code, held, closed) == (b"done\n", 1000, "held", True)
