"""stderr over the WebSocket transport (its subprotocol, docs/migration.md 2a): real router, agents,
the real rsync on both sides, and OSMO's CLI (tests/osmo_emu) for the protocol it knows.

OSMO's protocol has one output stream. Our own client and WS agent offer the subprotocol that keeps
stderr apart, so rsync's protocol on stdout is not broken by the remote rsync's messages, and exec
keeps stdout and stderr apart as over gRPC; a client that does not offer it (OSMO's CLI) gets them
merged, byte for byte as before.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from osmo_router.wire.protocol import pb
from osmo_router.wire.wsproto import STDERR_SUBPROTOCOL
from tests import control_kit as control
from tests.e2e.test_osmo_compat_e2e import run as run_osmo
from tests.e2e.test_osmo_compat_e2e import ws_base
from tests.e2e.test_ws_e2e import Pairing
from tests.harness import AgentProc, Proc, Router, run_client
from tests.osmo_emu import client as osmo
from tests.ws_fixtures import module_grpc_workflow, module_router  # noqa: F401 (fixtures router, grpc_workflow)
from tests.ws_kit import WsBackendProc, new_key, receive_close, run, serving_on_loopback, ws_url

#: A command writing to both streams, with bytes that are not UTF-8 on stderr.
BOTH_STREAMS = "echo out1; echo err1 >&2; echo out2; printf 'err2 \\377\\376\\n' >&2; exit 3"
STDOUT, STDERR = b"out1\nout2\n", b"err1\nerr2 \xff\xfe\n"
#: For OSMO's CLI, which decodes each message as UTF-8 (workflow.py _run_exec_command). The agent sends
#: what is on stdout before what follows on stderr; the other way round their order is not kept.
BOTH_STREAMS_UTF8 = "echo out1; echo err1 >&2"
AGENTS = ["grpc", "ws"]


def _rsync(router: Router, grpc_workflow: str, client: str, agent: str, *paths: str) -> tuple[int, str]:
    """`osmo-net-client rsync PATHS` over one pairing; (exit status, stderr)."""
    pairing = Pairing(router, grpc_workflow, client, agent, operation="rsync")
    try:
        result = run_client("rsync", *pairing.args, *paths, timeout=120)
    finally:
        pairing.finish()
    return result.returncode, result.stderr.decode(errors="replace")


@pytest.mark.parametrize("agent", AGENTS)
def test_rsync_remote_error_over_ws_is_rsyncs_own_as_over_grpc(
    router: Router, grpc_workflow: str, agent: str, tmp_path: Path
) -> None:
    """The remote rsync's error reaches the user with its own exit status, over either transport.

    Without the extension its message arrived inside rsync's protocol stream: `unexpected tag`,
    exit 12 (protocol error) instead of rsync's own status and message.
    """
    missing = tmp_path / "no" / "such" / "dir"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a\n")
    cases = {
        # A download from a path that does not exist: 23, "partial transfer due to error".
        "download": ([f":{missing}/", f"{tmp_path}/out/"], f'change_dir "{missing}" failed: No such file'),
        # An upload under a missing directory: the remote mkdir fails, 11, "error in file IO".
        "upload": ([f"{tmp_path}/src/", f":{missing}/"], f'mkdir "{missing}" failed: No such file'),
    }
    for name, (paths, message) in cases.items():
        grpc_code, grpc_err = _rsync(router, grpc_workflow, "grpc", agent, *paths)
        ws_code, ws_err = _rsync(router, grpc_workflow, "ws", agent, *paths)
        assert grpc_code in (11, 23), (name, grpc_code, grpc_err)
        assert ws_code == grpc_code, (name, ws_code, ws_err, grpc_err)
        assert message in grpc_err, (name, grpc_err)
        assert message in ws_err, (name, ws_err)
        assert "unexpected tag" not in ws_err and "protocol data stream" not in ws_err, (name, ws_err)


@pytest.mark.parametrize("agent", AGENTS)
def test_exec_over_ws_keeps_stdout_and_stderr_apart(router: Router, grpc_workflow: str, agent: str) -> None:
    pairing = Pairing(router, grpc_workflow, "ws", agent)
    try:
        result = run_client("exec", *pairing.args, "--", "sh", "-c", BOTH_STREAMS)
    finally:
        pairing.finish()
    assert (result.returncode, result.stdout, result.stderr) == (3, STDOUT, STDERR)


@pytest.mark.parametrize("agent", AGENTS)
def test_osmo_client_gets_stderr_merged_as_before(
    router: Router, grpc_workflow: str, agent: str, stopper: list[Proc]
) -> None:
    """OSMO's CLI knows nothing of the extension: a pipe-mode command's stderr comes merged into the
    stream, in the order it was written, in binary messages, and the close is OSMO's plain 1000."""
    workflow, key = grpc_workflow, new_key()
    if agent == "ws":
        workflow = f"wf-{uuid.uuid4().hex[:8]}"
    session = control.created(workflow, key, "exec", command=["sh", "-c", BOTH_STREAMS_UTF8], tty=False)
    control.create_session(router.address, session)
    if agent == "ws":
        stopper.append(WsBackendProc(router, workflow, key, operation="exec"))
    _text, ended = run_osmo(lambda: osmo.exec_command(ws_base(router), workflow, key, "", "task1"))
    assert (ended.how, ended.close_code, ended.close_reason) == ("closed ok", 1000, ""), ended
    assert bytes(ended.output) == b"out1\nerr1\n"


def test_raw_ws_pair_passes_stderr_as_text_and_refuses_what_is_not_base64(router: Router) -> None:
    """Both sides offer the subprotocol and the router selects it: a text message passes as stderr, its
    bytes whole; a text message that is no base64 ends the session with INVALID_ARGUMENT (not output)."""
    workflow, key = f"wf-raw-{uuid.uuid4().hex[:8]}", new_key()
    offer = (STDERR_SUBPROTOCOL, "something-else")

    async def body(http: aiohttp.ClientSession) -> None:
        backend = await http.ws_connect(ws_url(router, "exec", workflow, "backend", key), protocols=offer)
        client = await http.ws_connect(ws_url(router, "exec", workflow, "client", key, "timeout=10"), protocols=offer)
        assert (backend.protocol, client.protocol) == (STDERR_SUBPROTOCOL, STDERR_SUBPROTOCOL)
        await client.send_bytes(b'{"Rows": 24, "Cols": 80}')
        assert (await backend.receive_bytes()) == b'{"Rows": 24, "Cols": 80}'
        await backend.send_bytes(b"out")
        await backend.send_str("/w==")  # b"\xff"
        assert (await client.receive_bytes()) == b"out"
        assert (await client.receive_str()) == "/w=="
        await backend.send_str("no base64!")
        code, reason, rest = await receive_close(client)
        assert (code, rest) == (4000, b""), (code, reason, rest)
        assert reason.startswith("INVALID_ARGUMENT: a stderr message must be base64"), reason
        await backend.close()

    run(body)


def test_without_the_subprotocol_text_from_a_backend_is_output_as_before(router: Router) -> None:
    """A side that does not offer it (OSMO's, or an older one) keeps the old protocol: the router selects
    no subprotocol, a backend's text message is output, and stderr is never sent as text."""
    workflow, key = f"wf-raw-{uuid.uuid4().hex[:8]}", new_key()

    async def body(http: aiohttp.ClientSession) -> None:
        backend = await http.ws_connect(ws_url(router, "exec", workflow, "backend", key))
        client = await http.ws_connect(ws_url(router, "exec", workflow, "client", key, "timeout=10"))
        assert (backend.protocol, client.protocol) == (None, None)
        await client.send_bytes(b'{"Rows": 24, "Cols": 80}')
        assert (await backend.receive_bytes()) == b'{"Rows": 24, "Cols": 80}'
        await backend.send_str("/w==")
        assert (await client.receive_bytes()) == b"/w=="
        await backend.close()
        assert (await receive_close(client))[0] == 1000

    run(body)


def test_ws_agent_behind_a_router_that_does_not_select_the_subprotocol_merges_stderr() -> None:
    """Our WS agent offers the subprotocol; a router that does not select it (an osmo-router from before
    it, stood in for by a bare aiohttp endpoint that sends the `init=1` open) gets stderr merged into
    binary output, never base64 text it would relay as output."""
    workflow, key = f"wf-old-{uuid.uuid4().hex[:8]}", new_key()
    open_msg = pb.SessionOpen(exec=pb.ExecInit(command=["sh", "-c", BOTH_STREAMS_UTF8], tty=False))

    async def main() -> tuple[str | None, str | None, list[aiohttp.WSMsgType], bytes, str]:
        served: asyncio.Future[tuple[str | None, str | None, list[aiohttp.WSMsgType], bytes, str]] = (
            asyncio.get_running_loop().create_future()
        )

        async def backend(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()  # no protocols: selects none
            await ws.prepare(request)
            await ws.send_bytes(open_msg.SerializeToString())
            kinds, output = [], b""
            while (msg := await ws.receive()).type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                kinds.append(msg.type)
                output += msg.data if msg.type == aiohttp.WSMsgType.BINARY else b""
            reason = str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else repr(msg)
            offered = request.headers.get("Sec-WebSocket-Protocol")
            served.set_result((offered, ws.ws_protocol, kinds, output, reason))
            return ws

        app = web.Application()
        app.router.add_get("/api/router/exec/{workflow}/backend/{key}", backend)
        async with serving_on_loopback(app) as port:
            agent = AgentProc(
                f"127.0.0.1:{port}", workflow, "--transport", "ws", "--session-key", key, "--operation", "exec",
                "--ws-address", f"127.0.0.1:{port}", wait=False,
            )  # fmt: skip
            try:
                async with asyncio.timeout(30):
                    return await served
            finally:
                agent.stop()

    offered, selected, kinds, output, reason = asyncio.run(main())
    assert (offered, selected) == (STDERR_SUBPROTOCOL, None)
    assert set(kinds) == {aiohttp.WSMsgType.BINARY}, kinds
    assert (output, reason) == (b"out1\nerr1\n", "exit:0")


@pytest.fixture
def stopper() -> list[Proc]:  # type: ignore[misc]
    """Processes to stop at the end of the test."""
    procs: list[Proc] = []
    yield procs  # type: ignore[misc]
    for proc in procs:
        proc.stop()
