"""Before/after: the relay figures of two router source trees, measured interleaved in one run.

    python -m bench.compare --base /path/to/other/src [--rounds 3] [--env-a K=V] [--env-b K=V]

Router A runs the code at --base (default: this tree), router B this tree; both serve the same load
generator one after the other, repetition by repetition, so a drift in machine load hits both
alike. --env-a / --env-b set environment variables of one router (e.g. OSMO_UVLOOP=0), so the same
tool compares event loops or options. Prints one row per figure: A, B and B/A.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.bench_relay import _hold_idle
from bench.common import ROOT, loadgen, median, percentile
from tests.harness import Router

SIZES = (4096, 32768, 262144)


def _measure(address: str, rep: int, seconds: str) -> dict[str, float]:
    out: dict[str, float] = {}
    echo = loadgen("grpc-echo", "--address", address, "--rounds", "500")[0]["samples_us"]
    out["echo p50 (us)"], out["echo p99 (us)"] = percentile(echo, 50), percentile(echo, 99)
    for size in SIZES:
        result = loadgen("grpc-throughput", "--address", address, "--size", str(size), "--sessions", "8",
                         "--seconds", seconds)[0]  # fmt: skip
        out[f"throughput {size // 1024} KiB (MB/s)"] = result["mbps"]
        out[f"bytes per message {size // 1024} KiB"] = result["bytes"] / max(result["messages"], 1)
    rv = loadgen("rendezvous", "--address", address, "--rounds", "100", "--workflow", f"cmp{rep}")[0]["samples_us"]
    out["rendezvous p50 (us)"], out["rendezvous p99 (us)"] = percentile(rv, 50), percentile(rv, 99)
    return out


def _env(pairs: list[str], src: str) -> dict[str, str]:
    env = {"PYTHONPATH": src}
    env.update(pair.split("=", 1) for pair in pairs)  # type: ignore[misc]
    return env


def main() -> None:
    """Measure both routers interleaved and print the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("--base", default=str(ROOT / "src"), help="src/ directory of router A")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", default="1.5")
    parser.add_argument("--idle", type=int, default=2000, help="idle sessions for the memory figure (0: skip)")
    parser.add_argument("--env-a", action="append", default=[])
    parser.add_argument("--env-b", action="append", default=[])
    args = parser.parse_args()
    envs = {"A": _env(args.env_a, args.base), "B": _env(args.env_b, str(ROOT / "src"))}
    results: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    routers = {name: Router(env=env) for name, env in envs.items()}
    try:
        for rep in range(args.rounds):
            for name in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                for key, value in _measure(routers[name].address, rep, args.seconds).items():
                    results[name].setdefault(key, []).append(value)
    finally:
        for router in routers.values():
            router.stop()
    if args.idle:
        limits = ("--max-sessions", "--max-sessions-per-user", "--max-pending-rendezvous")
        flags = [arg for flag in limits for arg in (flag, str(args.idle + 1000))]
        for name, env in envs.items():
            router = Router(*flags, env=env)
            try:
                results[name]["memory per idle session (KiB)"] = [_hold_idle(router, args.idle)[0]["value"]]
            finally:
                router.stop()
    _print(results)


def _print(results: dict[str, Any]) -> None:
    print(f"{'figure':36} {'A':>10} {'B':>10} {'B/A':>6}")
    for key in results["A"]:
        a, b = median(results["A"][key]), median(results["B"][key])
        print(f"{key:36} {a:10.1f} {b:10.1f} {b / a if a else 0:6.2f}")


if __name__ == "__main__":
    main()
