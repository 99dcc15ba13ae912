"""Port-forward benchmark: throughput beside socat, 4,000 concurrent connections, set-up latency.

    .venv/bin/python -m bench.bench_forward [--quick]

Every figure is measured in the same run as its baseline and printed as a ratio:
- single-connection TCP throughput, download (target -> local) and upload, through the forward vs a
  `socat` relay on loopback (and a direct connection), with the CPU seconds per GiB each process spent;
- 4,000 concurrent connections through one forward (their windows fill the user's budget), each echoing:
  all must be served; the router's resident memory per connection (VmRSS from /proc/PID/status, after minus before);
- connection set-up latency (connect until the first echoed byte) through the forward vs direct.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import cpu_seconds, rss_kib
from bench.forward_targets import BulkServer, EchoServer, free_port, wait_listening
from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router

WORKFLOW = "bench-forward"
ROUTER_FLAGS = ("--max-sessions-per-user", "5000", "--max-pending-rendezvous", "5000")


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (children inherit it); returns the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def download(port: int, total: int) -> float:
    """Connect, read exactly `total` bytes from the bulk target; the seconds it took."""
    view = memoryview(bytearray(1 << 20))
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"D")
        got = 0
        while got < total:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError(f"stream ended after {got} of {total} bytes")
            got += n
    return time.perf_counter() - started


def upload(port: int, total: int) -> float:
    """Connect, send `total` bytes to the bulk target and wait until it has them all; the seconds it took."""
    block = memoryview(bytes(1 << 20))
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"U")
        left = total
        while left > 0:
            sock.sendall(block[: min(left, len(block))])
            left -= len(block)
        if sock.recv(2) != b"ok":
            raise RuntimeError("the target did not confirm the upload")
    return time.perf_counter() - started


@contextmanager
def socat_relay(target_port: int) -> Iterator[int]:
    """A socat TCP relay on loopback to target_port; yields its port."""
    if shutil.which("socat") is None:
        raise RuntimeError("socat is not installed")
    port = free_port()
    proc = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"TCP:127.0.0.1:{target_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


Transfer = Callable[[int, int], float]


def best_rate(transfer: Transfer, port: int, total: int, runs: int) -> float:
    """Best of `runs` transfers, in MiB/s."""
    return max(total / (1 << 20) / transfer(port, total) for _ in range(runs))


def measure_throughput(client_args: list[str], pids: dict[str, int], total: int, runs: int) -> dict[str, float]:
    """MiB/s of one connection each way: direct, via socat, via the forward (+ CPU s/GiB of each process)."""
    out: dict[str, float] = {}
    with BulkServer(total) as target:
        for name, transfer in (("download", download), ("upload", upload)):
            out[f"{name}_direct_mib_s"] = best_rate(transfer, target.port, total, runs)
            with socat_relay(target.port) as relay:
                out[f"{name}_socat_mib_s"] = best_rate(transfer, relay, total, runs)
        proc, (local,) = start_forward(client_args, f":{target.port}")
        try:
            procs = {**pids, "client": proc.pid}
            for name, transfer in (("download", download), ("upload", upload)):
                before = {who: cpu_seconds(pid) for who, pid in procs.items()}
                out[f"{name}_forward_mib_s"] = best_rate(transfer, local, total, runs)
                for who, pid in procs.items():
                    gib = runs * total / (1 << 30)
                    out[f"{name}_{who}_cpu_s_per_gib"] = (cpu_seconds(pid) - before[who]) / gib
                out[f"{name}_forward_vs_socat"] = out[f"{name}_forward_mib_s"] / out[f"{name}_socat_mib_s"]
        finally:
            proc.stop()
    return out


class _Arrivals:
    """Counts connections that finished echoing (or failed); an event fires when all have."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all_done = asyncio.Event()

    def arrive(self) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.all_done.set()


async def _echo_once(port: int, payload: bytes, arrivals: _Arrivals, hold: asyncio.Event) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        arrivals.arrive()
        return False
    try:
        try:
            writer.write(payload)
            await writer.drain()
            ok = await reader.readexactly(len(payload)) == payload
        except (OSError, asyncio.IncompleteReadError):
            ok = False
        arrivals.arrive()
        await hold.wait()  # keep every connection open until all of them have echoed
        return ok
    finally:
        writer.close()


async def _open_echoing(port: int, first: int, count: int, hold: asyncio.Event) -> list[asyncio.Task[bool]]:
    """`count` more connections, returned once each has echoed (they stay open until `hold`)."""
    arrivals = _Arrivals(count)
    tasks = [
        asyncio.create_task(_echo_once(port, f"conn {i:05d} ".encode() * 100, arrivals, hold))
        for i in range(first, first + count)
    ]
    async with asyncio.timeout(180):
        await arrivals.all_done.wait()
    return tasks


async def _concurrent(port: int, count: int, router_pid: int) -> dict[str, float]:
    """Open `count` connections in two halves; memory per connection is the second half's (the slope),
    so one-time growth of a fresh router (heap arenas, thread stacks) is not spread over them."""
    hold = asyncio.Event()
    half = count // 2
    before = rss_kib(router_pid)
    started = time.perf_counter()
    tasks: list[asyncio.Task[bool]] = []
    try:
        tasks += await _open_echoing(port, 0, half, hold)
        middle = rss_kib(router_pid)
        tasks += await _open_echoing(port, half, count - half, hold)
        elapsed = time.perf_counter() - started
        during = rss_kib(router_pid)
    finally:
        hold.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "connections": count,
        "served": sum(1 for r in results if r is True),
        "all_echoed_s": elapsed,
        "router_rss_before_kib": before,
        "router_rss_during_kib": during,
        "router_kib_per_connection": (during - middle) / (count - half),
        "router_kib_per_connection_all": (during - before) / count,
    }


def measure_concurrency(client_args: list[str], router: Router, count: int) -> dict[str, float]:
    """`count` simultaneous echoing connections through one forward."""
    with EchoServer() as echo:
        proc, (local,) = start_forward(client_args, f":{echo.port}")
        try:
            return asyncio.run(_concurrent(local, count, router.pid))
        finally:
            proc.stop()


def _latencies(port: int, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("no echo")
        out.append(time.perf_counter() - started)
    return sorted(out)


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def measure_latency(client_args: list[str], count: int) -> dict[str, float]:
    """Connect-to-first-echoed-byte, p50/p99 in ms: direct and through the forward."""
    with EchoServer() as echo:
        direct = _latencies(echo.port, count)
        proc, (local,) = start_forward(client_args, f":{echo.port}")
        try:
            _latencies(local, 5)  # warm-up
            forward = _latencies(local, count)
        finally:
            proc.stop()
    return {
        "samples": count,
        "direct_p50_ms": _percentile(direct, 0.5) * 1e3,
        "direct_p99_ms": _percentile(direct, 0.99) * 1e3,
        "forward_p50_ms": _percentile(forward, 0.5) * 1e3,
        "forward_p99_ms": _percentile(forward, 0.99) * 1e3,
    }


def run(quick: bool) -> dict[str, Any]:
    """Run every measurement; returns the figures (also printed as a table by main)."""
    fd_limit = raise_fd_limit()
    total = (256 if quick else 1024) << 20
    connections = min(4000, max(100, (fd_limit - 200) // 3))
    router = Router(*ROUTER_FLAGS)
    agent = AgentProc(router.address, WORKFLOW)
    client_args = ["--router-address", router.address, "--workflow-id", WORKFLOW, "--tls=false"]
    try:
        # Memory per connection first, on a router that has not relayed bulk data yet: afterwards its
        # heap keeps freed buffers for reuse (memtune), which would make the connections look free.
        concurrency = measure_concurrency(client_args, router, connections)
        return {
            "throughput": measure_throughput(
                client_args, {"router": router.pid, "agent": agent.pid}, total, 2 if quick else 3
            ),
            "concurrency": concurrency,
            "latency": measure_latency(client_args, 50 if quick else 300),
        }
    finally:
        agent.stop()
        router.stop()


def print_table(figures: dict[str, Any]) -> None:
    """The figures as a plain table."""
    t, c, lat = figures["throughput"], figures["concurrency"], figures["latency"]
    rows = []
    for way in ("download", "upload"):
        cpu = ", ".join(f"{who} {t[f'{way}_{who}_cpu_s_per_gib']:.1f}" for who in ("client", "router", "agent"))
        rows += [
            (f"{way} direct", f"{t[f'{way}_direct_mib_s']:.0f} MiB/s", ""),
            (f"{way} socat relay", f"{t[f'{way}_socat_mib_s']:.0f} MiB/s", "baseline"),
            (f"{way} forward", f"{t[f'{way}_forward_mib_s']:.0f} MiB/s", f"{t[f'{way}_forward_vs_socat']:.2f}x socat"),
            (f"{way} CPU s/GiB", cpu, ""),
        ]
    rows += [
        ("concurrent connections", f"{c['served']}/{c['connections']} served", f"in {c['all_echoed_s']:.1f}s"),
        ("router RSS per connection (second half)", f"{c['router_kib_per_connection']:.1f} KiB", ""),
        ("router RSS per connection (all)", f"{c['router_kib_per_connection_all']:.1f} KiB", ""),
        ("set-up latency direct", f"p50 {lat['direct_p50_ms']:.2f} ms", f"p99 {lat['direct_p99_ms']:.2f} ms"),
        ("set-up latency forward", f"p50 {lat['forward_p50_ms']:.2f} ms", f"p99 {lat['forward_p99_ms']:.2f} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>36}  {note}")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller transfers and fewer samples")
    args = parser.parse_args()
    print_table(run(args.quick))


if __name__ == "__main__":
    main()
