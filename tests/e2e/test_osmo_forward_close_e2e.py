"""OSMO's CLI ends a forwarded connection whose target ignores EOF (docs/migration.md 1.6).

OSMO's CLI has no half-close: at its local EOF it closes the connection's WebSocket
(port_forward.py run_tcp_with_sock); OSMO's router closed the backend after relaying every message
(router.py run_connect_client, copy_data), and osmo-ctrl then closed its connection to the target
(ctrl.go portforwardConnectTCP). Through our router (real router, real gRPC agent, the CLI emulated
by tests/osmo_emu) the agent used to shut down only its write side: a target that keeps its side
open after EOF held the agent's connection and the router's session until it closed or the
session's TTL. Now the upload still arrives whole, then the target's connection is closed and the
session freed, while another connection of the same router and agent keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from tests import control_kit as control
from tests.e2e.test_osmo_compat_e2e import OldBackend
from tests.forward_servers import echo, tcp_server
from tests.harness import Proc, Router, metric_value
from tests.osmo_emu import client as osmo
from tests.ws_fixtures import module_grpc_workflow, module_router  # noqa: F401 (fixtures router, grpc_workflow)
from tests.ws_kit import WsBackendProc

WAIT = 30.0
#: How long the session may outlive the CLI's close: the upload's delivery on a loaded machine.
FREED_WITHIN = 20.0
#: Runs alone, like test_osmo_compat_e2e (the CLI emulation runs in the test process).
pytestmark = pytest.mark.serial

ACTIVE = ("router_grpc_sessions_active", {"operation": "portforward"})


class IgnoresEof:
    """A target that reads to EOF and keeps its side open; once told to, it checks whether the
    connection is still there by writing to it (a closed peer answers with a reset)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.got_eof = threading.Event()
        self.probe = threading.Event()
        self.outcome: list[str] = []
        self.probed = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        data = bytearray()
        conn.settimeout(WAIT)
        while chunk := conn.recv(1 << 20):
            data += chunk
        self.received.append(bytes(data))
        self.got_eof.set()
        self.probe.wait(WAIT + FREED_WITHIN)  # never closes on EOF: only the test's end lets it go
        try:
            conn.sendall(b"ping")
            # (a read would say EOF, the FIN came first: the reset shows in the connection's state)
            wait_until(lambda: tcp_state(conn) == TCP_CLOSE, WAIT, "the reset")
            self.outcome.append("closed")
        except (ConnectionResetError, BrokenPipeError):
            self.outcome.append("closed")
        except AssertionError:
            self.outcome.append(f"open (TCP state {tcp_state(conn)})")
        self.probed.set()


#: tcp_states.h TCP_CLOSE: the state a connection's socket is in once a reset ended it.
TCP_CLOSE = 7


def tcp_state(conn: socket.socket) -> int:
    """The connection's TCP state (TCP_INFO's first byte, tcpi_state)."""
    return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll (bounded) until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)


def active(router: Router) -> float:
    return metric_value(router.metrics_text(), *ACTIVE)


def upload_and_close(port: int, payload: bytes) -> None:
    """The local application: send everything, close (the CLI's local EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(payload)


def echo_round(sock: socket.socket, size: int = 64 * 1024) -> bool:
    data = os.urandom(size)
    sock.sendall(data)
    got = bytearray()
    while len(got) < size and (chunk := sock.recv(size - len(got))):
        got += chunk
    return bytes(got) == data


def test_old_client_close_frees_a_target_that_ignores_eof(router: Router, grpc_workflow: str) -> None:
    """8 MiB up then the CLI's close: the target gets every byte and its EOF, then its connection is
    closed (a write to it meets a reset) and the router's session count drops, although the target
    never closes; a connection of another forward, held open meanwhile, still echoes, and a new one works.
    Before, the session stayed (the agent had only shut down its write side) until the target closed."""
    base = f"ws://127.0.0.1:{router.ws_port}"
    payload = os.urandom(8 * 1024 * 1024)
    target = IgnoresEof()
    key, other_key = uuid.uuid4().hex, uuid.uuid4().hex
    with tcp_server(target) as target_port, tcp_server(echo) as echo_port:
        control.create_session(router.address, control.created(grpc_workflow, key, "portforward", port=target_port))
        control.create_session(router.address, control.created(grpc_workflow, other_key, "portforward", port=echo_port))

        async def body() -> None:
            forward, task = osmo.start_tcp_forward(base, grpc_workflow, key, timeout=10)
            other, other_task = osmo.start_tcp_forward(base, grpc_workflow, other_key, timeout=10)
            await forward.ready.wait()
            await other.ready.wait()
            held = socket.create_connection(("127.0.0.1", other.port), timeout=WAIT)
            try:
                assert await asyncio.to_thread(echo_round, held)
                await asyncio.to_thread(wait_until, lambda: active(router) == 1, WAIT, "the held connection's session")
                await asyncio.to_thread(upload_and_close, forward.port, payload)
                assert await asyncio.to_thread(target.got_eof.wait, WAIT), "the target never got the EOF"
                await asyncio.to_thread(
                    wait_until, lambda: active(router) == 1, FREED_WITHIN, "the closed connection's session freed"
                )
                target.probe.set()
                assert await asyncio.to_thread(target.probed.wait, WAIT)
                assert target.outcome == ["closed"]
                # The other forward's connection, open all along, and a new one still work.
                assert await asyncio.to_thread(echo_round, held)
                with socket.create_connection(("127.0.0.1", other.port), timeout=WAIT) as fresh:
                    assert await asyncio.to_thread(echo_round, fresh)
            finally:
                target.probe.set()
                held.close()
                forward.close.set()
                other.close.set()
                await asyncio.gather(task, other_task)

        async def bounded() -> None:
            async with asyncio.timeout(3 * WAIT + FREED_WITHIN):
                await body()

        asyncio.run(bounded())
        assert [len(r) for r in target.received] == [len(payload)] and sha(target.received[0]) == sha(payload)
        wait_until(lambda: active(router) == 0, FREED_WITHIN, "every session freed")


@pytest.mark.parametrize("agent", ["grpc", "ws", "osmo-ctrl"])
def test_old_client_close_after_a_reply_target_ignores_eof(router: Router, grpc_workflow: str, agent: str) -> None:
    """A request, the target's reply read, then the CLI's close (an HTTP/1.1 keep-alive exchange): the
    target, which keeps its side open after EOF, is closed and the session freed; through the gRPC
    agent, `agent --transport ws` (which gets the session's init whole), and OSMO's own backend
    (tests/osmo_emu/backend.py: the router closes it after the data, and it closes the target)."""
    base = f"ws://127.0.0.1:{router.ws_port}"
    workflow = grpc_workflow if agent == "grpc" else f"wf-{uuid.uuid4().hex[:8]}"
    release = threading.Event()

    def keep_alive(conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        request = conn.recv(100)
        conn.sendall(b"reply to " + request)
        with contextlib.suppress(OSError):
            while conn.recv(100):
                pass
        release.wait(WAIT + FREED_WITHIN)  # the EOF does not end it: only the test's end does

    key = uuid.uuid4().hex
    backend: Proc | None = None
    with tcp_server(keep_alive) as target_port:
        if agent == "osmo-ctrl":
            backend = OldBackend(router, "portforward", workflow, key, "--port", str(target_port))
        else:
            control.create_session(router.address, control.created(workflow, key, "portforward", port=target_port))
        if agent == "ws":
            backend = WsBackendProc(router, workflow, key, operation="portforward")

        async def body() -> bytes:
            forward, task = osmo.start_tcp_forward(base, workflow, key, timeout=10)
            await forward.ready.wait()
            try:

                def exchange() -> bytes:
                    with socket.create_connection(("127.0.0.1", forward.port), timeout=WAIT) as sock:
                        sock.sendall(b"GET")
                        return sock.recv(100)

                return await asyncio.to_thread(exchange)
            finally:
                forward.close.set()
                await task

        async def bounded() -> bytes:
            async with asyncio.timeout(2 * WAIT):
                return await body()

        try:
            assert asyncio.run(bounded()) == b"reply to GET"
            wait_until(lambda: active(router) == 0, FREED_WITHIN, "the session freed")
        finally:
            release.set()
            if backend is not None:
                backend.stop()


class Chatty:
    """A target that sends all the time (until its connection fails) while it reads to EOF, and goes on
    sending after the EOF: there is always some of its data on its way to the CLI when the CLI closes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.ended: list[str] = []
        self.done = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        stop = threading.Event()

        def talk() -> None:
            chunk = b"t" * 262144
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    conn.sendall(chunk)
            self.ended.append("send failed" if not stop.is_set() else "stopped")

        talker = threading.Thread(target=talk, daemon=True)
        talker.start()
        data = bytearray()
        with contextlib.suppress(OSError):
            while chunk := conn.recv(4096):  # (small reads: the upload queues up behind them)
                data += chunk
        self.received.append(bytes(data))
        talker.join(WAIT)  # until its connection fails (the agent closed it), at most WAIT
        stop.set()
        self.done.set()


def upload_reading_all(port: int, payload: bytes) -> None:
    """The local application sends everything and ends its side, reading what comes until the CLI closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        reader = threading.Thread(target=lambda: _read_to_end(sock), daemon=True)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(WAIT)


def _read_to_end(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(1 << 20):
            pass


def test_old_client_close_while_the_target_talks(router: Router, grpc_workflow: str) -> None:
    """The target sends all along and after its EOF: the CLI's upload still arrives whole, what the target
    sends after the CLI's close is not relayed (OSMO's CLI reads nothing more), and its connection is closed
    (its sending fails) and the session freed. Before, the target's data meeting the closed WebSocket
    broke the session, and the break could drop the upload's tail still queued for the agent. A race:
    without the router's part of the fix 2 runs of 8 got a short upload (8333285 and 8349669 bytes of
    8388608); with it, 0 of 10."""
    base = f"ws://127.0.0.1:{router.ws_port}"
    payload = os.urandom(8 * 1024 * 1024)
    target = Chatty()
    key = uuid.uuid4().hex
    with tcp_server(target) as target_port:
        control.create_session(router.address, control.created(grpc_workflow, key, "portforward", port=target_port))

        async def body() -> None:
            forward, task = osmo.start_tcp_forward(base, grpc_workflow, key, timeout=10)
            await forward.ready.wait()
            try:
                await asyncio.to_thread(upload_reading_all, forward.port, payload)
                assert await asyncio.to_thread(target.done.wait, 2 * WAIT)
            finally:
                forward.close.set()
                await task

        async def bounded() -> None:
            async with asyncio.timeout(4 * WAIT):
                await body()

        asyncio.run(bounded())
        assert [len(r) for r in target.received] == [len(payload)] and sha(target.received[0]) == sha(payload)
        assert target.ended == ["send failed"]
        wait_until(lambda: active(router) == 0, FREED_WITHIN, "the session freed")
