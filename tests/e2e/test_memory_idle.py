"""Memory is given back after a burst: an idle agent (and router) returns within 2x its fresh RSS.

memtune keeps up to 64 MiB of freed buffers per process while data flows, in one malloc arena, and
gives them back (malloc_trim) once the process is quiet after its sessions ended. Real processes:
200 MiB go through `exec` (upload) and a TCP port-forward (download) at once, then VmRSS is polled
with a bounded deadline.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router, cli_env, client_cmd, run_client

BURST = 100 << 20  # each way: exec upload and forward download
WAIT = 60.0


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def wait_rss_at_most(pid: int, limit_kib: int, timeout: float = WAIT) -> int:
    """Poll (bounded) until the process's RSS is at most `limit_kib`; the last reading."""
    deadline = time.monotonic() + timeout
    while (rss := rss_kib(pid)) > limit_kib:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return rss


@contextlib.contextmanager
def bulk_source(total: int) -> Iterator[int]:
    """A TCP server on loopback that sends `total` bytes to each connection, then closes it."""
    server = socket.create_server(("127.0.0.1", 0))
    block = memoryview(bytes(1 << 20))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    left = total
                    while left > 0:
                        conn.sendall(block[: min(left, len(block))])
                        left -= len(block)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


class PeakSampler:
    """Highest RSS of some processes, sampled every 50 ms in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_kib(pid))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def burst(client_args: list[str]) -> None:
    """BURST bytes up through exec and BURST bytes down through a port-forward, at the same time."""
    with bulk_source(BURST) as port:
        forward, (local,) = start_forward(client_args, f":{port}")
        try:
            received = [0]

            def download() -> None:
                view = memoryview(bytearray(1 << 20))
                with socket.create_connection(("127.0.0.1", local), timeout=WAIT) as sock:
                    while n := sock.recv_into(view):
                        received[0] += n

            downloader = threading.Thread(target=download, daemon=True)
            downloader.start()
            upload = subprocess.run(
                client_cmd("exec", *client_args, "--", "sh", "-c", "wc -c"),
                input=bytes(BURST),
                capture_output=True,
                timeout=120,
                env=cli_env(),
            )
            downloader.join(120)
        finally:
            forward.stop()
    assert (upload.returncode, upload.stdout.strip()) == (0, str(BURST).encode()), upload.stderr[-500:]
    assert received[0] == BURST


def releases(agent: AgentProc) -> list[dict[str, object]]:
    """The agent's memory_released records so far."""
    return [r for r in agent.events() if r.get("event") == "memory_released"]


def next_release(agent: AgentProc, seen: int, timeout: float = WAIT) -> dict[str, object]:
    """The first memory_released record after the first `seen` ones (bounded poll)."""
    deadline = time.monotonic() + timeout
    while len(records := releases(agent)) <= seen:
        if time.monotonic() > deadline:
            raise AssertionError("the agent never gave memory back; stderr:\n" + "\n".join(agent.lines[-20:]))
        time.sleep(0.1)
    return records[seen]


def fresh_rss(agent: AgentProc, client_args: list[str], pids: dict[str, int]) -> dict[str, int]:
    """RSS after one small session of each kind (their modules are loaded) once the agent went idle."""
    assert run_client("exec", *client_args, "--", "true").returncode == 0
    with bulk_source(1 << 20) as port:
        forward, (local,) = start_forward(client_args, f":{port}")
        try:
            with socket.create_connection(("127.0.0.1", local), timeout=WAIT) as sock:
                while sock.recv(1 << 16):
                    pass
        finally:
            forward.stop()
    next_release(agent, 0)
    return {name: rss_kib(pid) for name, pid in pids.items()}


@pytest.fixture
def router() -> Iterator[Router]:
    proc = Router()
    yield proc
    proc.stop()


def test_an_idle_agent_gives_back_the_memory_of_a_burst(router: Router) -> None:
    agent = AgentProc(router.address, "wf-memory", "--log-level", "debug")
    try:
        client_args = ["--router-address", router.address, "--workflow-id", "wf-memory", "--tls=false"]
        pids = {"agent": agent.pid, "router": router.pid}
        fresh = fresh_rss(agent, client_args, pids)
        seen = len(releases(agent))
        with PeakSampler(pids) as sampler:
            burst(client_args)
        # The agent goes quiet once the burst's sessions ended, and gives the memory back (memtune).
        release = next_release(agent, seen)
        idle = wait_rss_at_most(agent.pid, 2 * fresh["agent"])
        figures = f"fresh {fresh}, peak {sampler.peak}, released {release}, idle agent {idle} KiB"
        assert idle <= 2 * fresh["agent"], f"the idle agent kept its memory: {figures}"
        assert isinstance(release["rss_after_kib"], int) and release["rss_after_kib"] <= 2 * fresh["agent"], figures
        # The router trims too once its sessions ended (the pipeline calls memtune.trim_when_idle).
        idle_router = wait_rss_at_most(router.pid, 2 * fresh["router"])
        assert idle_router <= 2 * fresh["router"], f"the idle router kept its memory: {figures}, {idle_router}"
        # A session after the release works as before.
        again = run_client("exec", *client_args, "--", "cat", input=b"after\n")
        assert (again.returncode, again.stdout) == (0, b"after\n"), again.stderr
    finally:
        agent.stop()
