"""Soak: mixed bulk load for a while, then how much memory an idle router and agent keep.

    .venv/bin/python -m bench.soak [--minutes 10] [--mib 64]

Issue 14's figure "idle RSS after a 10-minute soak (goal <= 2x fresh)". Real router and agent
processes on loopback; rounds of load run back to back until the time is up, each round at once:
an `exec cat` upload, an `exec` download (`head -c` of /dev/zero), a port-forward download and a
port-forward upload of `--mib` MiB each, plus a few short echo sessions. Then the processes are
left idle and VmRSS (/proc/PID/status) is read every second for `--idle` seconds; the table
shows fresh (after one small session of each kind), peak (sampled every 50 ms), and idle.
Not part of the test suite: it takes `--minutes` plus a minute.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import threading
import time
from typing import Any

from bench.common import rss_kib
from bench.forward_targets import BulkServer
from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router, cli_env, client_cmd, run_client

WORKFLOW = "bench-soak"


class Peak:
    """Highest VmRSS of some processes, sampled every 50 ms in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_kib(pid))

    def stop(self) -> dict[str, int]:
        """Stop sampling; the peaks in KiB."""
        self._stop.set()
        self._thread.join(5)
        return self.peak


def _download(port: int, total: int) -> int:
    got = 0
    view = memoryview(bytearray(1 << 20))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"D")
        while n := sock.recv_into(view):
            got += n
    return got


def _upload(port: int, total: int) -> bytes:
    block = bytes(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"U")
        for _ in range(total >> 20):
            sock.sendall(block)
        return sock.recv(16)


def one_round(args: list[str], bulk_port: int, size: int) -> None:
    """The four bulk transfers and a few echoes, at once; raises if one did not move its bytes."""
    forward, (local,) = start_forward(args, f":{bulk_port}")
    try:
        results: dict[str, Any] = {}
        threads = [
            threading.Thread(target=lambda: results.__setitem__("down", _download(local, size))),
            threading.Thread(target=lambda: results.__setitem__("up", _upload(local, size))),
        ]
        for t in threads:
            t.start()
        exec_up = subprocess.Popen(
            client_cmd("exec", *args, "--", "sh", "-c", "wc -c"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        exec_down = subprocess.Popen(
            client_cmd("exec", *args, "--", "head", "-c", str(size), "/dev/zero"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        out_up, _ = exec_up.communicate(bytes(size), timeout=300)
        got_down = 0
        assert exec_down.stdout is not None
        while chunk := exec_down.stdout.read(1 << 20):
            got_down += len(chunk)
        exec_down.wait(60)
        for _ in range(3):
            echo = run_client("exec", *args, "--", "echo", "soak")
            assert echo.returncode == 0, echo.stderr
        for t in threads:
            t.join(300)
        assert out_up.strip() == str(size).encode() and got_down == size, (out_up, got_down)
        assert results.get("down") == size and results.get("up") == b"ok", results
    finally:
        forward.stop()


def main() -> None:
    """Run the soak and print one JSON line with the figures (KiB)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer, four transfers per round")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds to watch the idle processes")
    opts = parser.parse_args()
    size = opts.mib << 20
    router = Router()
    agent = AgentProc(router.address, WORKFLOW)
    args = ["--router-address", router.address, "--workflow-id", WORKFLOW, "--tls=false"]
    pids = {"router": router.pid, "agent": agent.pid}
    try:
        with BulkServer(size) as bulk:
            # Fresh: after one small session of each kind (their modules loaded), both idle.
            assert run_client("exec", *args, "--", "echo", "fresh").returncode == 0
            forward, _ = start_forward(args, f":{bulk.port}")
            forward.stop()
            time.sleep(5)
            fresh = {name: rss_kib(pid) for name, pid in pids.items()}
            peak = Peak(pids)
            started = time.monotonic()
            rounds = 0
            while time.monotonic() - started < opts.minutes * 60:
                one_round(args, bulk.port, size)
                rounds += 1
            elapsed = time.monotonic() - started
            peaks = peak.stop()
        idle_series = []
        for _ in range(int(opts.idle)):
            time.sleep(1)
            idle_series.append({name: rss_kib(pid) for name, pid in pids.items()})
        idle = idle_series[-1]
        moved = rounds * 4 * size
        print(
            json.dumps(
                {
                    "minutes": round(elapsed / 60, 2),
                    "rounds": rounds,
                    "gib_moved": round(moved / 2**30, 2),
                    "fresh_kib": fresh,
                    "peak_kib": peaks,
                    "idle_kib": idle,
                    "idle_after_5s_kib": idle_series[min(4, len(idle_series) - 1)],
                    "idle_over_fresh": {k: round(idle[k] / fresh[k], 2) for k in pids},
                }
            )
        )
    finally:
        agent.stop()
        router.stop()


if __name__ == "__main__":
    main()
