"""Exec figures: the real CLI, router and agent processes, beside a local `cat` through pipes.

- exec echo: 1 byte written to `osmo-net-client exec -- cat`'s stdin and read back from its
  stdout, one at a time, vs the same through a local `cat`;
- 32 MiB through `exec -- cat` (MB/s, session already up) vs a local `cat`;
- rendezvous with the real agent: a client stream's start to its first byte back from `cat`
  (includes the agent spawning `cat`).
"""

from __future__ import annotations

import hashlib
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.common import attempt, latency_figures, loadgen, paired
from tests.harness import AgentProc, Router, cli_env, client_cmd

BLOB_SIZE = 32 * 1024 * 1024
WAIT = 60.0


class Piped:
    """A process whose stdin and stdout the benchmark drives directly (unbuffered)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=cli_env()
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.fd_in = self.proc.stdin.fileno()
        self.fd_out = self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.fd_out, selectors.EVENT_READ)

    def read(self, size: int, timeout: float = WAIT) -> bytes:
        """Up to `size` bytes of stdout; raises if nothing comes within `timeout`."""
        if not self._selector.select(timeout):
            raise TimeoutError(f"no output from {self.proc.args!r} within {timeout:g}s")
        return os.read(self.fd_out, size)

    def echo(self) -> float:
        """Seconds for one byte in and the same byte out."""
        started = time.perf_counter()
        os.write(self.fd_in, b"x")
        if self.read(1) != b"x":
            raise RuntimeError("echo returned something else")
        return time.perf_counter() - started

    def close(self) -> int:
        """End stdin, wait for the exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            code = self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._selector.close()
        if code != 0:
            stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"{self.proc.args!r} exited {code}: {stderr[-2000:]}")
        return code


def echo_samples(argv: Sequence[str], rounds: int) -> list[float]:
    """Round-trip times (us) of 1 byte through a process's stdin and stdout."""
    piped = Piped(argv)
    try:
        for _ in range(20):  # the first byte waits for the session; then warm up
            piped.echo()
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            piped.echo()
            samples.append((time.perf_counter() - started) * 1e6)
    finally:
        piped.close()
    return samples


def transfer_mbps(argv: Sequence[str], blob: bytes) -> float:
    """MB/s of `blob` through a process's stdin to its stdout (after the first byte came through)."""
    piped = Piped(argv)
    digest = hashlib.sha256()
    try:
        piped.echo()
        started = time.perf_counter()
        writer = threading.Thread(target=_write_all, args=(piped.fd_in, blob), daemon=True)
        writer.start()
        received = 0
        while received < len(blob):
            chunk = piped.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        elapsed = time.perf_counter() - started
        writer.join(WAIT)
    finally:
        piped.close()
    if received != len(blob) or digest.digest() != hashlib.sha256(blob).digest():
        raise RuntimeError(f"{argv!r}: {received} of {len(blob)} bytes came back intact")
    return len(blob) / elapsed / 1e6


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[: 1 << 20]) :]


def run(quick: bool) -> dict[str, Any]:
    """Every exec figure."""
    rounds = 500 if quick else 2000
    repeats = 1 if quick else 3
    figures: list[dict[str, Any]] = []
    notes = ["exec echo and 32 MiB use the real osmo-net-client and agent processes"]
    router = Router()
    agent = AgentProc(router.address, "bench-exec")
    try:
        remote = client_cmd("exec", "--router-address", router.address, "--workflow-id", "bench-exec", "--tls=false")
        remote = [*remote, "--", "cat"]
        attempt(
            figures,
            notes,
            "exec echo",
            lambda: latency_figures(
                "exec echo 1 B", echo_samples(remote, rounds), echo_samples(["cat"], rounds), "local cat", 1000.0
            ),
        )
        attempt(figures, notes, "exec 32 MiB", lambda: _transfer(remote, repeats))
        attempt(figures, notes, "exec rendezvous", lambda: _rendezvous(router.address, 50 if quick else 200))
    finally:
        agent.stop()
        router.stop()
    return {"figures": figures, "notes": notes}


def _transfer(remote: list[str], repeats: int) -> list[dict[str, Any]]:
    blob = os.urandom(BLOB_SIZE)
    remote_runs: list[float] = []
    local_runs: list[float] = []
    for _ in range(repeats):
        remote_runs.append(transfer_mbps(remote, blob))
        local_runs.append(transfer_mbps(["cat"], blob))
    return [paired("exec 32 MiB through cat", "MB/s", remote_runs, local_runs, "local cat", None)]


def _rendezvous(address: str, rounds: int) -> list[dict[str, Any]]:
    args = ["--address", address, "--workflow", "bench-exec", "--real-agent", "--rounds", str(rounds)]
    samples = loadgen("rendezvous", *args)[0]["samples_us"]
    figures = latency_figures("exec rendezvous to first byte (agent spawns cat)", samples, None, "", None)
    # The same with an agent that keeps no standby streams (every session is requested).
    agent = AgentProc(address, "bench-exec-requested", "--standby-streams", "0")
    try:
        args = ["--address", address, "--workflow", "bench-exec-requested", "--real-agent", "--rounds", str(rounds)]
        samples = loadgen("rendezvous", *args)[0]["samples_us"]
    finally:
        agent.stop()
    figures += latency_figures("exec rendezvous to first byte, no standby", samples, None, "", None)
    return figures
