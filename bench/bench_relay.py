"""Relay-only figures: the router between a load generator's client and agent streams, beside socat.

- throughput at 4 / 32 / 256 KiB messages, THROUGHPUT_SESSIONS sessions at once, vs a socat relay
  carrying the same bytes in the same write sizes over as many connections;
- 1-byte echo p50/p99 (client -> agent -> client) vs the same through socat, beside a plain
  grpc.aio relay and a single grpc.aio round trip with no relay at all (the floor);
- rendezvous: client start to the first byte back, with the generator as a registered agent keeping
  two standby Connect streams (as the real agent does), and with none (every session requested);
- router memory per idle session with 10,000 sessions held open, each checked to still answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    ROOT,
    THROUGHPUT_SESSIONS,
    attempt,
    bench_env,
    figure,
    latency_figures,
    loadgen,
    paired,
    rss_kib,
    sliced_latency_figures,
)
from tests.harness import Router

SIZES = ((4 * 1024, 0.2), (32 * 1024, 0.6), (256 * 1024, 0.8))
IDLE_SESSIONS = 10_000
#: Issue 18's bounds: no worse than when it was filed (rendezvous p99 4.4 ms, 47 KiB per idle session).
RENDEZVOUS_P99_MAX_US = 4400.0
IDLE_SESSION_MAX_KIB = 47.0


def run(quick: bool) -> dict[str, Any]:
    """Every relay-only figure."""
    repeats = 2 if quick else 5
    figures: list[dict[str, Any]] = []
    notes = [f"throughput: {THROUGHPUT_SESSIONS} sessions (socat: connections) at once"]
    router = Router()
    plain = PlainRelayProc()
    try:
        seconds = 1.0 if quick else 2.0
        attempt(figures, notes, "throughput", lambda: _throughput(router.address, plain.address, repeats, seconds))
        attempt(figures, notes, "echo", lambda: _echo(router.address, plain.address, 500 if quick else 2000))
        attempt(figures, notes, "rendezvous", lambda: _rendezvous(router.address, 100 if quick else 500))
    finally:
        plain.stop()
        router.stop()
    attempt(figures, notes, "idle sessions", lambda: _idle(2_000 if quick else IDLE_SESSIONS))
    return {"figures": figures, "notes": notes}


class PlainRelayProc:
    """bench/plain_relay.py in a process of its own: what grpc.aio alone allows (see its docstring)."""

    def __init__(self) -> None:
        argv = [sys.executable, "-m", "bench.plain_relay"]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=bench_env(), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"plain relay did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        """Kill it (it holds no state worth a graceful stop)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _throughput(address: str, plain: str, repeats: int, seconds: float) -> list[dict[str, Any]]:
    figures = []
    common = ["--sessions", str(THROUGHPUT_SESSIONS), "--seconds", str(seconds)]
    targets = {"router": ["--address", address], "plain": ["--address", plain], "socat": []}
    for size, ratio in SIZES:
        runs: dict[str, list[float]] = {name: [] for name in targets}
        for i in range(repeats):
            # Rotate which goes first so a drift in machine load hits all alike.
            order = list(targets)[i % 3 :] + list(targets)[: i % 3]
            for name in order:
                mode = "tcp-throughput" if name == "socat" else "grpc-throughput"
                result = loadgen(mode, "--size", str(size), *common, *targets[name])[0]
                runs[name].append(result["mbps"])
        label = f"relay throughput {size // 1024} KiB"
        note = f"median of {repeats}"
        target = {"ratio_at_least": ratio}
        figures.append(paired(label, "MB/s", runs["router"], runs["socat"], "socat", target, note=note))
        figures.append(
            paired(f"{label} vs plain grpc.aio", "MB/s", runs["router"], runs["plain"], "plain grpc.aio relay", None)
        )
    return figures


def _echo(address: str, plain: str, rounds: int, slices: int = 4) -> list[dict[str, Any]]:
    # Interleaved in slices, the order rotating, so a burst of load on a shared machine hits all alike.
    runs = {
        "router": ("grpc-echo", "--address", address),
        "socat": ("tcp-echo",),
        "plain": ("grpc-echo", "--address", plain),
        "one hop": ("grpc-bare-echo", "--address", plain),
    }
    # Each figure is the median of the slices' own percentiles, as in bench_grpc_vs_ws (see
    # common.sliced_latency_figures: a pooled p99 is set by one stall of the shared machine).
    samples: dict[str, list[list[float]]] = {name: [] for name in runs}
    for i in range(slices):
        order = list(runs)[i % len(runs) :] + list(runs)[: i % len(runs)]
        for name in order:
            samples[name].append(loadgen(*runs[name], "--rounds", str(rounds // slices))[0]["samples_us"])
    grpc, tcp, bare, one_hop = samples["router"], samples["socat"], samples["plain"], samples["one hop"]
    return [
        *sliced_latency_figures("relay echo 1 B", grpc, tcp, "socat", 550.0),
        *sliced_latency_figures("plain grpc.aio relay echo 1 B", bare, tcp, "socat"),
        # The floor: a relayed echo makes two such round trips (client-router, router-agent).
        *sliced_latency_figures("one grpc.aio round trip, no relay, 1 B", one_hop, tcp, "socat"),
    ]


def _rendezvous(address: str, rounds: int) -> list[dict[str, Any]]:
    figures = []
    open_conn = loadgen("rendezvous", "--address", address, "--rounds", str(rounds), "--workflow", "rv1")
    figures += latency_figures("rendezvous to first byte", open_conn[0]["samples_us"], None, "", RENDEZVOUS_P99_MAX_US)
    # The same without standby streams: every session waits for the SessionRequest round trip.
    requested = loadgen(
        "rendezvous", "--address", address, "--rounds", str(rounds), "--workflow", "rv0", "--standby", "0"
    )
    figures += latency_figures("rendezvous to first byte, no standby", requested[0]["samples_us"], None, "", None)
    fresh = loadgen(
        "rendezvous", "--address", address, "--rounds", str(rounds // 2), "--workflow", "rv2", "--fresh-connection"
    )
    figures += latency_figures("rendezvous incl. new connection", fresh[0]["samples_us"], None, "", None)
    return figures


def _idle(sessions: int) -> list[dict[str, Any]]:
    limits = ("--max-sessions", "--max-sessions-per-user", "--max-pending-rendezvous")
    flags = [arg for name in limits for arg in (name, str(sessions + 1000))]
    router = Router(*flags)
    try:
        return _hold_idle(router, sessions)
    finally:
        router.stop()


def _hold_idle(router: Router, sessions: int) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "bench.loadgen", "idle", "--address", router.address, "--sessions", str(sessions)]
    gen = subprocess.Popen(argv, cwd=ROOT, env=bench_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert gen.stdin is not None and gen.stdout is not None
    steps: dict[str, dict[str, Any]] = {}
    rss: dict[str, int] = {}
    try:
        for step in ("warm", "open", "check", "close"):
            line = gen.stdout.readline()
            if not line:
                raise RuntimeError(f"the load generator ended before step {step}")
            steps[step] = json.loads(line)
            time.sleep(0.5)  # let the router finish the step's bookkeeping before reading its memory
            rss[step] = rss_kib(router.pid)
            if step != "close":  # after the last step the generator exits by itself
                gen.stdin.write("next\n")
                gen.stdin.flush()
        gen.wait(60)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    opened = steps["open"]["opened"]
    per_session = (rss["open"] - rss["warm"]) / max(opened, 1)
    note = f"{opened} sessions held, router RSS {rss['warm'] // 1024} -> {rss['open'] // 1024} MiB"
    return [
        figure(
            "router memory per idle session", per_session, "KiB", target={"at_most": IDLE_SESSION_MAX_KIB}, note=note
        ),
        figure(
            "idle sessions still answering",
            steps["check"]["answered"],
            "sessions",
            target={"at_least": float(sessions)},
            note=f"opened in {steps['open']['seconds']:.1f}s; {steps['open'].get('errors') or 'no errors'}",
        ),
    ]
