"""A request's line and headers on the WebSocket and metrics ports are bounded in bytes (32 KiB).

aiohttp alone takes 128 header fields of 8 KiB each and keeps them as Python objects: about 2 MiB
of the router per connection that never finishes its headers (until the header timeout), or, once
they are complete, for the whole life of a waiting WebSocket session. The attack: connections that
each send a request line and up to 1 MiB of header fields. Real router and agent processes.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.test_memory_idle import rss_kib
from tests.harness import AgentProc, Router, exec_served, metric_value
from tests.ws_kit import client_args

#: The router's limit (router/ops/http_limits.py MAX_HEADER_BYTES), stated here so the test runs without it.
MAX_HEADER_BYTES = 32 * 1024
#: Connections of the attack; each offers 126 fields of 8,000 bytes (about 1 MiB).
ATTACKERS = 120
FIELD = b"a" * 8000
#: The router's growth the attack may cause: without the limit it was about 2 MiB per connection
#: (+392 MiB for 200 connections; +240 MiB expected here), with it 32 KiB of headers each at most.
MAX_GROWTH_KIB = 48 * 1024


@pytest.fixture(name="router")
def fixture_router() -> Iterator[Router]:
    # A long header timeout, so that only the byte limit can end the attack's connections.
    router = Router("--http-header-timeout", "60s")
    yield router
    router.stop()


def attack(port: int) -> tuple[socket.socket, bytes]:
    """One connection that sends up to 1 MiB of header fields; it and the first bytes of any answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET /api/router/version HTTP/1.1\r\nHost: x\r\n")
    try:
        for i in range(126):
            sock.sendall(b"X-Pad-%d: %s\r\n" % (i, FIELD))
    except OSError:  # cut by the router: what it answered is in the socket's buffer
        pass
    sock.settimeout(0.5)
    try:
        answer = sock.recv(64)
    except OSError:
        answer = b""
    return sock, answer


def test_header_bytes_are_bounded_and_another_user_is_served(router: Router) -> None:
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow)
    try:
        fresh = rss_kib(router.popen.pid)
        held = [attack(router.ws_port) for _ in range(ATTACKERS)]
        held += [attack(router.metrics_port) for _ in range(8)]
        peak = rss_kib(router.popen.pid)
        print(f"router RSS {fresh} KiB fresh, {peak} KiB with {len(held)} attackers (+{(peak - fresh) / 1024:.1f} MiB)")
        # Another user's exec over the WebSocket port, while the attack's sockets are still open.
        exec_served(*client_args(router, workflow, "ws"))
        assert peak - fresh < MAX_GROWTH_KIB, f"+{(peak - fresh) / 1024:.1f} MiB for {len(held)} connections"
        answers = {answer[:12] for _, answer in held}
        assert answers <= {b"HTTP/1.1 431", b""}, answers
        assert b"HTTP/1.1 431" in answers
        refused = metric_value(
            router.metrics_text(), "router_http_connections_refused_total", {"port": "ws", "reason": "header_size"}
        )
        assert refused >= ATTACKERS * 0.9
        for sock, _ in held:
            sock.close()
    finally:
        agent.stop()


def test_a_request_with_large_legitimate_headers_is_served(router: Router) -> None:
    """Three 7 KiB headers (a big JWT and a proxy's cookies) fit; one request past the limit does not."""
    fitting = b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 7000) for i in range(3))
    too_many = b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 7000) for i in range(MAX_HEADER_BYTES // 7000 + 1))
    for headers, status in ((fitting, b"200"), (too_many, b"431")):
        with socket.create_connection(("127.0.0.1", router.ws_port), timeout=10) as sock:
            request = b"GET /api/router/version HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
            try:
                sock.sendall(request)
            except OSError:
                pass
            answer = b""
            deadline = time.monotonic() + 10
            while len(answer) < 12 and time.monotonic() < deadline:
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
        assert answer[9:12] == status, answer
    # Keep-alive: a second request on the same connection is bounded like the first.
    with socket.create_connection(("127.0.0.1", router.metrics_port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(12) == b"HTTP/1.1 200"
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + too_many)
        except OSError:
            pass
        data = b""
        deadline = time.monotonic() + 10
        while b"431" not in data and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"HTTP/1.1 431" in data, data[-200:]


def test_a_request_that_names_an_upgrade_but_is_not_upgraded_stays_counted(router: Router) -> None:
    """Only a WebSocket actually upgraded stops the count: a plain request carrying an `Upgrade`
    header (answered as HTTP, the connection kept alive) turned it off for the requests after it, so a
    second request on the connection could send aiohttp's 1 MiB of header fields again."""
    too_many = b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 7000) for i in range(MAX_HEADER_BYTES // 7000 + 1))
    for port, path in ((router.metrics_port, b"/healthz"), (router.ws_port, b"/api/router/version")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n" % path)
            first = sock.recv(12)
            assert first[:9] == b"HTTP/1.1 " and first[9:12] != b"101", first
            try:
                sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, too_many))
            except OSError:
                pass
            data = first
            deadline = time.monotonic() + 10
            # Until the second answer (431, or the 200 of a request let through) or the close.
            while data.count(b"HTTP/1.1 ") < 2 and time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data.count(b"HTTP/1.1 ") == 2, (port, data)
            assert data[data.rindex(b"HTTP/1.1 ") :][:12] == b"HTTP/1.1 431", (port, data)
