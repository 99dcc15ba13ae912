"""A real redis-server for scale-out tests and benchmarks: a free loopback port, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis

WAIT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(RuntimeError):
    """redis-server exited as it started: most likely its port was taken meanwhile."""


class RedisServer:
    """`redis-server` on 127.0.0.1 (the same port across restarts), nothing written to disk."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/install installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(3):
            try:
                self.start()
                return
            except PortTaken:
                if port is not None or attempt == 2:
                    raise
                # The free port was taken between free_port() and redis binding it (another test's
                # process): a fresh one, as a fixture asking for any port means.
                self.port = free_port()
                self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        probe = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None)
        while True:
            try:
                if self.proc.poll() is None and probe.ping():
                    return
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if self.proc.poll() is not None:  # (a PING then reached whoever holds the port, if anyone)
                raise PortTaken(f"redis-server on port {self.port} exited at once (the port is taken?)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """Kill the server at once (its data is gone: nothing is persisted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)

    def restart(self) -> None:
        """Kill and start again, empty, on the same port."""
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        """A synchronous client for inspecting the keyspace."""
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)

    def keys(self) -> list[str]:
        """Every key, sorted (SCAN, not KEYS)."""
        with self.client() as client:
            return sorted(str(key) for key in client.scan_iter(count=1000))

    def stop(self) -> None:
        """Stop the server."""
        self.kill()
