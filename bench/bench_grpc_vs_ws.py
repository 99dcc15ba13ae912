"""The gRPC relay against the router's own WebSocket port (issue 18), interleaved in one run.

Issue 18: "the gRPC path must cost no more per message than the WebSocket router it replaces". The
same router relays both: gRPC sessions (the load generator's client and agent streams, as in
bench_relay) and WebSocket sessions on `--ws-port` (a WS client and a WS backend, bench/ws_load.py,
the old protocol: raw payload bytes per binary message). Figures, each gRPC / WS:

- relay throughput at 4 / 32 / 256 KiB messages, THROUGHPUT_SESSIONS sessions at once (targets
  >= 0.55x / 1.0x / 1.2x the WS port's);
- 1-byte echo p50 and p99, medians over 9 interleaved slices of 500 round trips (target <= 1.1x each);
- router CPU per echo round trip (target <= 1.3x) and router CPU per MB relayed, read from the
  router's /proc/PID/stat around the timed part of each run.

    .venv/bin/python -m bench.bench_grpc_vs_ws [--quick]
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.common import THROUGHPUT_SESSIONS, attempt, figure, loadgen, median, paired, sliced_latency_figures
from tests.harness import Router

#: Message size, and the target on gRPC throughput / WS port throughput.
SIZES = ((4 * 1024, 0.55), (32 * 1024, 1.0), (256 * 1024, 1.2))
ECHO_RATIO_MAX = 1.1
CPU_PER_ECHO_RATIO_MAX = 1.3
#: Interleaved slices of the echo (each path's p50/p99 is the median of its slices'); a multiple of
#: the three targets, so each goes first as often.
ECHO_SLICES = 9


def run(quick: bool) -> dict[str, Any]:
    """Every gRPC-vs-WebSocket-port figure."""
    figures: list[dict[str, Any]] = []
    notes = [f"throughput: {THROUGHPUT_SESSIONS} sessions at once on each transport; ratios are gRPC / WS port"]
    notes.append(
        "gRPC is the router's native server (--grpc-server native); 'grpcio' rows: a second router on grpc.aio"
    )
    router = Router("--grpc-server", "native")
    grpcio = Router("--grpc-server", "grpcio", "--ws-port", "-1")
    try:
        repeats, seconds = (2, 1.0) if quick else (5, 2.0)
        targets = _targets(router, grpcio)
        attempt(figures, notes, "throughput", lambda: throughput(targets, repeats, seconds))
        attempt(figures, notes, "echo", lambda: echo(targets, 900 if quick else 4500))
    finally:
        router.stop()
        grpcio.stop()
    return {"figures": figures, "notes": notes}


def _targets(router: Router, grpcio: Router) -> dict[str, tuple[str, str, int]]:
    """name: (load generator mode prefix, address, router pid)."""
    return {
        "grpc": ("grpc", router.address, router.pid),
        "grpcio": ("grpc", grpcio.address, grpcio.pid),
        "ws": ("ws", f"127.0.0.1:{router.ws_port}", router.pid),
    }


def _order(targets: dict[str, Any], i: int) -> list[str]:
    names = list(targets)
    return names[i % len(names) :] + names[: i % len(names)]


def throughput(targets: dict[str, tuple[str, str, int]], repeats: int, seconds: float) -> list[dict[str, Any]]:
    """MB/s and router CPU per MB at each size, the targets' runs interleaved (the order rotating)."""
    figures = []
    common = ["--sessions", str(THROUGHPUT_SESSIONS), "--seconds", str(seconds)]
    for size, ratio in SIZES:
        mbps: dict[str, list[float]] = {name: [] for name in targets}
        cpu_per_mb: dict[str, list[float]] = {name: [] for name in targets}
        for i in range(repeats):
            for name in _order(targets, i):
                mode, address, pid = targets[name]
                args = ("--size", str(size), "--address", address, "--cpu-pid", str(pid), *common)
                result = loadgen(f"{mode}-throughput", *args)[0]
                mbps[name].append(result["mbps"])
                cpu_per_mb[name].append(result["cpu_s"] / (result["bytes"] / 1e6) * 1e6)
        label = f"gRPC vs WS port: relay throughput {size // 1024} KiB"
        note = f"median of {repeats}, interleaved"
        figures.append(paired(label, "MB/s", mbps["grpc"], mbps["ws"], "WS port", {"ratio_at_least": ratio}, note))
        figures.append(paired(f"{label}, grpcio", "MB/s", mbps["grpcio"], mbps["ws"], "WS port", None, note))
        figures.append(
            paired(
                f"gRPC vs WS port: router CPU per MB, {size // 1024} KiB, grpcio",
                "us/MB",
                cpu_per_mb["grpcio"],
                cpu_per_mb["ws"],
                "WS port",
                None,
                note,
            )
        )
        figures.append(
            paired(
                f"gRPC vs WS port: router CPU per MB, {size // 1024} KiB",
                "us/MB",
                cpu_per_mb["grpc"],
                cpu_per_mb["ws"],
                "WS port",
                None,
                note,
            )
        )
    return figures


def echo(targets: dict[str, tuple[str, str, int]], rounds: int, slices: int = ECHO_SLICES) -> list[dict[str, Any]]:
    """1-byte echo p50/p99 (medians over slices, common.sliced_latency_figures) and router CPU per
    round trip, in slices interleaving the targets."""
    samples: dict[str, list[list[float]]] = {name: [] for name in targets}
    cpu: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(slices):
        for name in _order(targets, i):
            mode, address, pid = targets[name]
            args = ("--address", address, "--rounds", str(rounds // slices), "--cpu-pid", str(pid))
            result = loadgen(f"{mode}-echo", *args)[0]
            samples[name].append(result["samples_us"])
            cpu[name].append(result["cpu_s"] / result["round_trips"] * 1e6)
    out = []
    for fig in sliced_latency_figures("gRPC vs WS port: relay echo 1 B", samples["grpc"], samples["ws"], "WS port"):
        fig["target"] = {"ratio_at_most": ECHO_RATIO_MAX}
        out.append(fig)
    out += sliced_latency_figures(
        "gRPC vs WS port: relay echo 1 B, grpcio", samples["grpcio"], samples["ws"], "WS port"
    )
    out.append(
        figure(
            "gRPC vs WS port: router CPU per echo, grpcio",
            median(cpu["grpcio"]),
            "us",
            baseline=median(cpu["ws"]),
            baseline_name="WS port",
            runs=cpu["grpcio"],
            baseline_runs=cpu["ws"],
            note=f"median of {slices} slices",
        )
    )
    grpc_cpu, ws_cpu = median(cpu["grpc"]), median(cpu["ws"])
    out.append(
        figure(
            "gRPC vs WS port: router CPU per echo",
            grpc_cpu,
            "us",
            baseline=ws_cpu,
            baseline_name="WS port",
            target={"ratio_at_most": CPU_PER_ECHO_RATIO_MAX},
            runs=cpu["grpc"],
            baseline_runs=cpu["ws"],
            note=f"median of {slices} slices",
        )
    )
    return out


def summary(result: dict[str, Any]) -> dict[str, float]:
    """name: ratio of every figure (for printing)."""
    return {f["name"]: round(f["ratio"], 2) for f in result["figures"] if f.get("ratio") is not None}


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    print(json.dumps(outcome, indent=2))
    print(json.dumps(summary(outcome), indent=2), file=sys.stderr)
