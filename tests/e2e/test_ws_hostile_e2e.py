"""Hostile clients on the WebSocket port: what a waiting session keeps of them stays bounded.

A real router (and an agent for another workflow), raw sockets and aiohttp clients on loopback.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Iterator

import aiohttp
import pytest

from tests.e2e.test_memory_idle import rss_kib
from tests.harness import AgentProc, Router, run_client
from tests.ws_kit import run, ws_url

WF_OTHER = "wf-ws-hostile-other"
#: An empty, masked binary message as a client sends it (2 header bytes and a zero mask).
EMPTY_MESSAGE = b"\x82\x80\0\0\0\0"


@pytest.fixture
def router() -> Iterator[Router]:
    proc = Router()
    agent = AgentProc(proc.address, WF_OTHER)
    try:
        yield proc
    finally:
        agent.stop()
        proc.stop()


def raw_ws(port: int, path: str) -> socket.socket:
    """A raw, upgraded WebSocket connection (the 101 read, nothing else)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the router closed the connection before its 101"
        head += chunk
    assert b" 101 " in head.split(b"\r\n")[0], head
    return sock


def test_empty_messages_flooding_a_waiting_side_are_kept_within_its_stash(router: Router) -> None:
    """Before: the stash of a waiting side counted payload bytes only, so empty messages were kept
    without limit: 60 MiB of them (6 bytes each on the wire) grew the router by 890 MiB."""
    path = ws_url(router, "portforward", "wf-nobody", "client", "k1", "timeout=3600").split(str(router.ws_port), 1)[1]
    before = rss_kib(router.pid)
    sock = raw_ws(router.ws_port, path)
    sock.settimeout(2.0)  # a send blocked this long: the router stopped reading (TCP pushes back)
    chunk = EMPTY_MESSAGE * (65536 // len(EMPTY_MESSAGE))
    sent, budget = 0, 24 << 20
    try:
        while sent < budget:
            sock.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, ConnectionError):
        pass
    grown = (rss_kib(router.pid) - before) // 1024
    try:
        # Another workflow's session is served meanwhile.
        done = run_client(
            "exec", "--router-address", router.address, "--workflow-id", WF_OTHER, "--tls=false", "--", "echo", "hi"
        )
        assert done.returncode == 0 and done.stdout == b"hi\n", done.stderr
    finally:
        sock.close()
    assert sent < budget, f"the router read all {sent >> 20} MiB of empty messages (grew {grown} MiB)"
    assert grown < 48, f"the router grew by {grown} MiB for {sent >> 20} MiB of empty messages"


def test_a_padded_terminal_size_message_is_refused(router: Router) -> None:
    """Before: any JSON with Rows and Cols was taken and kept for the session's life, outside every
    budget: 60 waiting exec clients with a 4 MB size message held 240 MiB."""
    padded = json.dumps({"Rows": 24, "Cols": 80, "pad": "x" * 4_000_000}).encode()

    async def body(http: aiohttp.ClientSession) -> list[str]:
        reasons = []
        for i in range(8):
            url = ws_url(router, "exec", "wf-nobody", "client", f"key{i}", "timeout=3600")
            async with http.ws_connect(url, max_msg_size=0) as ws:
                await ws.send_bytes(padded)
                msg = await ws.receive(timeout=10)
                reasons.append(str(msg.extra))
        return reasons

    before = rss_kib(router.pid)
    reasons = run(body)
    assert all("terminal size message is longer than" in r for r in reasons), reasons
    assert (rss_kib(router.pid) - before) // 1024 < 48

    async def normal(http: aiohttp.ClientSession) -> None:
        url = ws_url(router, "exec", WF_OTHER, "client", "ok", "cmd=echo&cmd=hi&tty=0&exit=1")
        async with http.ws_connect(url) as ws:
            await ws.send_bytes(b'{"Rows": 24, "Cols": 80}')
            out = b""
            while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY:
                out += msg.data
            assert out == b"hi\n", (out, msg)

    run(normal)
