"""Native vs grpc.aio ends and servers (issue 18): every combination through one router of each kind.

    python -m bench.experiments.native_ends [--repeats 3] [--rounds 1000]

Starts a router with `--grpc-server grpcio` and one with `--grpc-server native`, then per repetition
(order alternating) runs bench.loadgen's grpc-echo and grpc-throughput (4 and 32 KiB, 8 sessions)
with its channels on grpc.aio and on the native h2 channel (OSMO_BENCH_CHANNEL=native), plus the
WS port's ws-echo/ws-throughput. Prints medians: echo p50/p99, router CPU and the load generator's
own CPU (its client and agent ends) per round trip; MB/s, router and ends CPU per MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from bench.common import ROOT
from tests.harness import Router


def loadgen(channel: str, *args: str) -> dict[str, Any]:
    """One bench.loadgen run with its channels on `channel` (grpcio or native); its JSON line."""
    env = dict(os.environ, OSMO_BENCH_CHANNEL=channel)
    cmd = [sys.executable, "-m", "bench.loadgen", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=str(ROOT), env=env, check=True)
    record: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return record


def run(repeats: int, rounds: int) -> dict[tuple[str, ...], list[tuple[float, ...]]]:
    """Every combination, `repeats` times; rows keyed (figure, server, ends)."""
    results: dict[tuple[str, ...], list[tuple[float, ...]]] = {}
    routers = {kind: Router("--grpc-server", kind) for kind in ("grpcio", "native")}
    try:
        combos = [(s, c) for s in ("grpcio", "native") for c in ("grpcio", "native")] + [("native", "ws")]
        for rep in range(repeats):
            for server, ends in combos if rep % 2 == 0 else list(reversed(combos)):
                router = routers[server]
                mode = "ws" if ends == "ws" else "grpc"
                address = f"127.0.0.1:{router.ws_port}" if ends == "ws" else router.address
                common = ("--address", address, "--cpu-pid", str(router.pid))
                r = loadgen(ends, f"{mode}-echo", *common, "--rounds", str(rounds))
                samples = sorted(r["samples_us"])
                trips = r["round_trips"]
                results.setdefault(("echo", server, ends), []).append(
                    (samples[len(samples) // 2], samples[int(len(samples) * 0.99)],
                     r["cpu_s"] / trips * 1e6, r.get("ends_cpu_s", 0.0) / trips * 1e6)
                )  # fmt: skip
                for size in (4096, 32768):
                    r = loadgen(ends, f"{mode}-throughput", *common, "--size", str(size), "--sessions", "8")
                    mb = r["bytes"] / 1e6
                    results.setdefault((f"{size // 1024} KiB", server, ends), []).append(
                        (r["mbps"], r["cpu_s"] / mb * 1e3, r.get("ends_cpu_s", 0.0) / mb * 1e3)
                    )
    finally:
        for router in routers.values():
            router.stop()
    return results


def main() -> None:
    """Parse the options, run, print one line per row."""
    parser = argparse.ArgumentParser(prog="bench.experiments.native_ends")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    print("echo: p50 us, p99 us, router CPU us/echo, ends CPU us/echo; throughput: MB/s, router ms/MB, ends ms/MB")
    for key, rows in run(args.repeats, args.rounds).items():
        medians = [round(statistics.median(col), 1) for col in zip(*rows, strict=True)]
        print(" ".join(key), medians)


if __name__ == "__main__":
    main()
