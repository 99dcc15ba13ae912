"""An audit line's `reason` is cut to 512 characters: a refusal may quote what the client sent.

The attack: unauthenticated WebSocket requests whose URL names an unknown operation of 7,000
characters; the refusal (`unknown operation '...'`) is audited before any token is checked. Without
the cut each request made a 7.3 KB log line (as many bytes logged as the client sent).
"""

from __future__ import annotations

import json
import socket
import uuid

from tests.harness import AgentProc, Router, exec_served
from tests.ws_kit import client_args

#: The router's cut (router/core/audit.py MAX_REASON), stated here so the test runs without it.
MAX_REASON = 512
REQUESTS = 100


def refused_lines(router: Router) -> list[dict[str, object]]:
    """The router's `session refused` audit records."""
    return [record for record in router.events() if record.get("event") == "session refused"]


def send_requests(port: int, operation: str) -> None:
    """REQUESTS upgrade requests on one keep-alive connection, each answer read to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rb") as answers:
        for _ in range(REQUESTS):
            sock.sendall(
                f"GET /api/router/{operation}/wf/client/k HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            status = answers.readline()
            assert status.startswith(b"HTTP/1.1 400"), status
            length = 0
            while (header := answers.readline()) not in (b"\r\n", b""):
                if header.lower().startswith(b"content-length:"):
                    length = int(header.split(b":")[1])
            answers.read(length)


def test_a_client_string_in_a_refusal_is_logged_cut() -> None:
    router = Router()
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow)
    try:
        send_requests(router.ws_port, "x" * 7000)
        # Another user's session is served meanwhile (the router logs it as usual).
        exec_served(*client_args(router, workflow, "ws"))
        router.wait_for(lambda _record: len(refused_lines(router)) >= REQUESTS)
        lines = refused_lines(router)
        reasons = [str(record["reason"]) for record in lines]
        assert all(reason.startswith("unknown operation 'xxx") for reason in reasons), reasons[0][:80]
        longest = max(len(json.dumps(record)) for record in lines)
        print(f"{len(lines)} refused lines, the longest {longest} bytes, reasons {len(reasons[0])} characters")
        assert max(len(reason) for reason in reasons) <= MAX_REASON + 3
        assert longest < 1024
    finally:
        agent.stop()
        router.stop()
