"""Real servers for the port-forward tests: threads on loopback sockets, stopped with their listener."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

from tests.harness import Proc, cli_env, client_cmd

Handler = Callable[[socket.socket], None]

#: Bound on every socket operation and wait of the port-forward tests.
TIMEOUT = 30.0


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A connection to a forwarded port, every operation bounded."""
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def echo_round_trip(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send payload, half-close, return everything that came back."""
    with connect(port, host) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the far end may close first (a refused target): not ours to judge
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return recv_all(sock)
        finally:
            sender.join(TIMEOUT)  # before the socket closes under it (a reset raised in recv_all)


@contextlib.contextmanager
def tcp_server(handler: Handler, host: str = "127.0.0.1") -> Iterator[int]:
    """A threaded TCP server running `handler(conn)` per connection; yields its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(256)

    def serve_one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            handler(conn)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def echo(conn: socket.socket) -> None:
    """Send back everything until EOF, then close."""
    while data := conn.recv(65536):
        conn.sendall(data)


def answer_after_eof(conn: socket.socket) -> None:
    """Read to EOF, then answer with how many bytes arrived (needs the client's half-close)."""
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    conn.sendall(f"got {total} bytes".encode())


class GreetThenCount:
    """Greets, half-closes its sending side first, then counts what the client still sends until EOF."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.done = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        conn.sendall(b"hello, then EOF")
        conn.shutdown(socket.SHUT_WR)
        total = 0
        while data := conn.recv(65536):
            total += len(data)
        self.received.append(total)
        self.done.set()


def firehose(conn: socket.socket) -> None:
    """Send 1 MiB blocks until the peer goes away."""
    block = b"x" * (1 << 20)
    while True:
        conn.sendall(block)


@contextlib.contextmanager
def udp_echo_server(host: str = "127.0.0.1") -> Iterator[int]:
    """A UDP server that returns each datagram to its sender; yields its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(b"echo:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on which nothing listens (bound once, then released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


FORWARDING = re.compile(r"^Forwarding from (\[[^\]]+\]|[^:]+):(\d+) -> (\d+)$")


def forwarded_ports(lines: list[str]) -> list[int]:
    """The local ports of the Forwarding lines, each once, in order (localhost prints two lines per port)."""
    ports: list[int] = []
    for line in lines:
        match = FORWARDING.match(line)
        if match and int(match.group(2)) not in ports:
            ports.append(int(match.group(2)))
    return ports


def forwarding_lines(proc: Proc, count: int) -> list[tuple[str, int]]:
    """The (host, local port) of the first `count` Forwarding lines, waited for."""
    proc.wait_for(lambda _: len([line for line in proc.out_lines if FORWARDING.match(line)]) >= count, stdout=True)
    matches = [m for m in map(FORWARDING.match, proc.out_lines) if m]
    return [(m.group(1), int(m.group(2))) for m in matches[:count]]


def start_forward(
    client_args: list[str], *args: str, count: int = 1, env: dict[str, str] | None = None
) -> tuple[Proc, list[int]]:
    """Start `osmo-net-client port-forward` (with `env` added to its environment) and wait until `count`
    local ports are announced; returns them."""
    proc = Proc(client_cmd("port-forward", *client_args, *args), env=cli_env(env))
    try:
        proc.wait_for(lambda r: len(forwarded_ports(proc.out_lines)) >= count, stdout=True)
    except AssertionError:
        proc.stop()
        raise
    return proc, forwarded_ports(proc.out_lines)[:count]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from `sock`, or fewer if the peer closed first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF."""
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def wait_line(proc: Proc, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
    """The first stderr line of `proc` (plain text, not JSON) matching predicate, waiting at most `timeout`."""
    deadline = time.monotonic() + timeout
    with proc._cond:
        while True:
            for line in proc.lines:
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("awaited line never came; stderr:\n" + "\n".join(proc.lines[-30:]))
            proc._cond.wait(min(left, 0.5))
