"""Before/after of the native path (issue 18): a router and native-channel ends on a baseline tree
against the same on this tree, interleaved, with this tree's WS port (aiohttp ends) as the reference.

    git archive <commit> | tar -x -C /tmp/base
    python -m bench.experiments.native_ab --base-tree /tmp/base [--repeats 3] [--rounds 2000]

Per repetition (order alternating) each target runs bench.loadgen's echo and 4 / 32 KiB throughput
(8 sessions) from its own tree. Prints medians and per-repetition ratios to the WS port.
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


def _loadgen(tree: str, *args: str) -> dict[str, Any]:
    env = dict(os.environ, OSMO_BENCH_CHANNEL="native", PYTHONPATH=f"{tree}/src")
    cmd = [sys.executable, "-m", "bench.loadgen", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tree, env=env, check=True)
    record: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return record


def run(base_tree: str, repeats: int, rounds: int) -> dict[tuple[str, str], list[tuple[float, ...]]]:
    """Rows keyed (target, figure): target base / new / ws; figure echo, 4096 or 32768."""
    trees = {"base": base_tree, "new": str(ROOT), "ws": str(ROOT)}
    routers = {
        "base": Router("--grpc-server", "native", env={"PYTHONPATH": f"{base_tree}/src"}),
        "new": Router("--grpc-server", "native"),
    }
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    try:
        for rep in range(repeats):
            for target in ("base", "new", "ws") if rep % 2 == 0 else ("ws", "new", "base"):
                router = routers["new" if target == "ws" else target]
                mode = "ws" if target == "ws" else "grpc"
                address = f"127.0.0.1:{router.ws_port}" if target == "ws" else router.address
                common = ("--address", address, "--cpu-pid", str(router.pid))
                r = _loadgen(trees[target], f"{mode}-echo", *common, "--rounds", str(rounds))
                samples, trips = sorted(r["samples_us"]), r["round_trips"]
                results.setdefault((target, "echo"), []).append(
                    (samples[len(samples) // 2], samples[int(len(samples) * 0.99)],
                     r["cpu_s"] / trips * 1e6, r.get("ends_cpu_s", 0.0) / trips * 1e6)
                )  # fmt: skip
                for size in ("4096", "32768"):
                    r = _loadgen(trees[target], f"{mode}-throughput", *common, "--size", size, "--sessions", "8")
                    mb = r["bytes"] / 1e6
                    results.setdefault((target, size), []).append((r["mbps"], r["cpu_s"] / mb * 1e3))
    finally:
        for router in routers.values():
            router.stop()
    return results


def report(results: dict[tuple[str, str], list[tuple[float, ...]]]) -> str:
    """A Markdown table of medians, then the per-repetition ratios to the WS port."""

    def med(rows: list[tuple[float, ...]], i: int) -> float:
        return statistics.median(row[i] for row in rows)

    lines = [
        "| target | echo p50 us | p99 | router CPU/echo us | ends CPU/echo us | 4 KiB MB/s | router ms/MB"
        " | 32 KiB MB/s | router ms/MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in ("base", "new", "ws"):
        e, a, b = results[(t, "echo")], results[(t, "4096")], results[(t, "32768")]
        lines.append(
            f"| {t} | {med(e, 0):.0f} | {med(e, 1):.0f} | {med(e, 2):.0f} | {med(e, 3):.0f} | {med(a, 0):.1f}"
            f" | {med(a, 1):.2f} | {med(b, 0):.1f} | {med(b, 1):.2f} |"
        )
    ws = results[("ws", "echo")]
    for t in ("base", "new"):
        e = results[(t, "echo")]
        ratios = [statistics.median(x[i] / y[i] for x, y in zip(e, ws, strict=True)) for i in range(3)]
        lines.append(f"{t} / WS: echo p50 {ratios[0]:.2f}x, p99 {ratios[1]:.2f}x, router CPU per echo {ratios[2]:.2f}x")
    return "\n".join(lines)


def main() -> None:
    """Parse the arguments, run, print the table and the raw rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-tree", required=True, help="a checkout (git archive) of the baseline commit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    results = run(args.base_tree, args.repeats, args.rounds)
    print(report(results))
    print(json.dumps({f"{t}:{f}": rows for (t, f), rows in results.items()}))


if __name__ == "__main__":
    main()
