"""A broken forward ends with a TCP reset on both ends; a clean one with EOF and every byte (issue 15).

Real router, agent and client processes. A forwarded connection whose session breaks (the router,
the agent or the client killed mid-transfer) must not look finished: the local application that
reads to end-of-stream gets ECONNRESET, not EOF and a short file, and a server in the container
that reads gets ECONNRESET too. A transfer that ends cleanly still ends with EOF and the exact bytes.

Since issue 17 a break is first resumed: it ends the connection only once the resume grace passed
with nobody to resume with (the router or the agent gone for good, the client killed). These tests
give the client and the agent a short grace (GRACE) and expect the resets after it, with the cause
named; test_resume_e2e.py covers the breaks that are repaired.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.forward_servers import TIMEOUT, connect, start_forward, tcp_server
from tests.harness import AgentProc, Router

#: Bytes a transfer must have moved before the break: it is then surely mid-transfer.
PROGRESS = 1 << 20
BLOCK = b"x" * (1 << 16)


@dataclass
class Outcome:
    """How one side's reading ended: "eof" or "reset" (or another error's name), and the bytes read."""

    received: int = 0
    ended: str = ""
    progressed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def read_until_end(sock: socket.socket, outcome: Outcome) -> None:
    """Read until EOF or an error, recording which; `progressed` is set once PROGRESS bytes arrived."""
    try:
        while data := sock.recv(1 << 20):
            outcome.received += len(data)
            if outcome.received >= PROGRESS:
                outcome.progressed.set()
        outcome.ended = "eof"
    except ConnectionResetError:
        outcome.ended = "reset"
    except OSError as err:
        outcome.ended = type(err).__name__
    finally:
        outcome.done.set()


class Firehose:
    """A server in the container that sends until the connection goes away."""

    def __call__(self, conn: socket.socket) -> None:
        while True:
            conn.sendall(BLOCK)


class Sink:
    """A server in the container that reads an upload until EOF or a reset, and records which."""

    def __init__(self) -> None:
        self.outcome = Outcome()

    def __call__(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        read_until_end(conn, self.outcome)


def download(port: int) -> tuple[socket.socket, Outcome, threading.Thread]:
    """A local application reading a forwarded connection to its end, in a thread."""
    sock = connect(port)
    outcome = Outcome()
    thread = threading.Thread(target=read_until_end, args=(sock, outcome), daemon=True)
    thread.start()
    return sock, outcome, thread


def upload(port: int) -> tuple[socket.socket, threading.Thread]:
    """A local application sending into a forwarded connection until it breaks, in a thread."""
    sock = connect(port)

    def send() -> None:
        try:
            while True:
                sock.sendall(BLOCK)
        except OSError:
            pass

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return sock, thread


@dataclass
class Setup:
    router: Router
    agent: AgentProc
    args: list[str]


#: The client's and the agent's resume grace here: a break not repaired within it ends the connection.
GRACE = "2"
#: What the client says when the grace passed.
NOT_RESUMED = f"could not be resumed within {GRACE}s"


@pytest.fixture
def setup(workflow: str) -> Iterator[Setup]:
    """A router and an agent of their own: the tests kill them."""
    router = Router()
    agent = AgentProc(router.address, workflow, "--resume-grace", GRACE)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", "--resume-grace", GRACE]
    try:
        yield Setup(router, agent, args)
    finally:
        agent.stop()
        router.stop()


def test_router_killed_resets_the_local_reader_and_the_container_server(setup: Setup) -> None:
    sink = Sink()
    with tcp_server(Firehose()) as hose, tcp_server(sink) as drain_port:
        proc, (down, up) = start_forward(setup.args, f":{hose}", f":{drain_port}", count=2)
        reader, got, reading = download(down)
        writer, writing = upload(up)
        try:
            assert got.progressed.wait(TIMEOUT) and sink.outcome.progressed.wait(TIMEOUT)
            setup.router.popen.kill()
            assert got.done.wait(TIMEOUT) and sink.outcome.done.wait(TIMEOUT)
            assert got.ended == "reset", f"the local reader saw {got.ended} after {got.received} bytes"
            assert sink.outcome.ended == "reset", f"the container's server saw {sink.outcome.ended}"
            assert proc.wait_exit(TIMEOUT) == 255
            assert any("is gone" in line and NOT_RESUMED in line for line in proc.lines), proc.lines
        finally:
            reader.close()
            writer.close()
            reading.join(TIMEOUT)
            writing.join(TIMEOUT)
            proc.stop()


def test_agent_killed_resets_the_local_reader(setup: Setup) -> None:
    with tcp_server(Firehose()) as hose:
        proc, (down,) = start_forward(setup.args, f":{hose}")
        reader, got, reading = download(down)
        try:
            assert got.progressed.wait(TIMEOUT)
            setup.agent.popen.kill()
            assert got.done.wait(TIMEOUT)
            assert got.ended == "reset", f"the local reader saw {got.ended} after {got.received} bytes"
            assert proc.wait_exit(TIMEOUT) == 255
            assert any(NOT_RESUMED in line and "UNAVAILABLE" in line for line in proc.lines), proc.lines
        finally:
            reader.close()
            reading.join(TIMEOUT)
            proc.stop()


def test_client_killed_resets_the_container_server(setup: Setup) -> None:
    """A killed client must not read as its half-close: the container's server gets a reset."""
    sink = Sink()
    with tcp_server(sink) as drain_port:
        proc, (up,) = start_forward(setup.args, f":{drain_port}")
        writer, writing = upload(up)
        try:
            assert sink.outcome.progressed.wait(TIMEOUT)
            proc.popen.send_signal(signal.SIGKILL)
            assert sink.outcome.done.wait(TIMEOUT)
            assert sink.outcome.ended == "reset", f"the container's server saw {sink.outcome.ended}"
            # After the agent's grace, not before: a client that comes back within it would resume.
            setup.agent.wait_for(lambda r: "did not come back within the resume grace" in r.get("msg", ""))
        finally:
            writer.close()
            writing.join(TIMEOUT)
            proc.stop()


def test_clean_transfers_end_with_eof_and_every_byte(setup: Setup) -> None:
    blob = os.urandom(24 * 1024 * 1024)
    received: list[bytes] = []

    def serve_blob(conn: socket.socket) -> None:
        conn.sendall(blob)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    def digest_upload(conn: socket.socket) -> None:
        sha = hashlib.sha256()
        while data := conn.recv(1 << 20):
            sha.update(data)
        received.append(sha.digest())
        conn.sendall(sha.digest())

    with tcp_server(serve_blob) as source, tcp_server(digest_upload) as target:
        proc, (down, up) = start_forward(setup.args, f":{source}", f":{target}", count=2)
        try:
            with connect(down) as sock:
                chunks = []
                while data := sock.recv(1 << 20):  # EOF, not a reset, after the last byte
                    chunks.append(data)
                assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(blob).digest()
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(1) == b""
            with connect(up) as sock:
                sock.sendall(blob)
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while data := sock.recv(64):
                    answer += data
                assert answer == hashlib.sha256(blob).digest() == received[0]
            assert proc.popen.poll() is None
        finally:
            proc.stop()
