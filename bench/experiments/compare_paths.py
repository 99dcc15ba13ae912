"""Issue 18: candidate gRPC data paths side by side, interleaved in one run with grpc.aio and the WS port.

    .venv/bin/python -m bench.experiments.compare_paths [--targets ws,router,aio,sync,grpclib,...]
        [--sizes 4096,32768] [--repeats 3] [--seconds 2] [--echo-rounds 1000] [--json FILE]

Every target is a relay in a process of its own, driven by the same load generator (bench.loadgen:
grpc.aio client and agent streams, or aiohttp WebSockets for the WS port; `+batch` targets use
bench.experiments.batching). Each repetition runs every target once per size, the order rotating,
so a burst of load on a shared machine hits all alike; echo runs in slices the same way. For each
target: throughput (MB/s) and the relay's CPU per MB, echo p50/p99 and the relay's CPU per round trip
(from /proc/PID/stat of the relay process, read by the load generator around the timed part).
Ratios are medians of per-repetition ratios against `aio` (bench/plain_relay.py's grpc.aio relay)
and against `ws` (the router's WebSocket port, the router's full relay behind it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, bench_env, median, percentile
from bench.machine import machine_info
from bench.wire import TLS_CA_ENV
from tests.harness import Router

AIO = ("bench.experiments.aio_relay",)
BATCH_BYTES = 128 * 1024


@dataclass(frozen=True)
class Spec:
    """How to start a target's relay and how to load it."""

    server: tuple[str, ...]  # python -m argv, or ("router",)
    env: dict[str, str] = field(default_factory=dict)
    proto: str = "grpc"  # grpc | ws
    batch: int = -1  # -1: bench.loadgen; >= 0: bench.experiments.batching --batch N
    echo: bool = True
    what: str = ""
    throughput: bool = True
    #: The echo's client and agent: "loadgen" (grpc.aio or aiohttp, bench.loadgen) or "h2" (experiments/h2_client)
    echo_client: str = "loadgen"


SPECS: dict[str, Spec] = {
    "ws": Spec(("router",), proto="ws", what="the router's WebSocket port (aiohttp), WS client and backend"),
    "router": Spec(("router",), what="the router's gRPC port (grpc.aio, uvloop), today's data path"),
    "aio": Spec(AIO, what="plain grpc.aio relay on uvloop (bench/plain_relay.py), the grpc.aio floor"),
    "sync": Spec(("bench.experiments.sync_relay",), what="(a) grpcio sync server, thread per stream"),
    "grpclib": Spec(("bench.experiments.grpclib_relay",), what="(b) grpclib (asyncio + h2) on uvloop"),
    "grpclib-asyncio": Spec(("bench.experiments.grpclib_relay", "--no-uvloop"), what="(b) grpclib, stdlib loop"),
    "h2": Spec(("bench.experiments.h2_relay",), what="(e) hand-rolled HTTP/2 + gRPC framing on asyncio, uvloop"),
    "h2-asyncio": Spec(("bench.experiments.h2_relay", "--no-uvloop"), what="(e) the same on the stdlib loop"),
    "h2+batch": Spec(("bench.experiments.h2_relay",), batch=BATCH_BYTES, what="(e)+(c) h2, batching"),
    "h2/h2c": Spec(
        ("bench.experiments.h2_relay",), throughput=False, echo_client="h2", what="(e) h2 relay, h2 client and agent"
    ),
    "router/h2c": Spec(("router",), throughput=False, echo_client="h2", what="(e) the router, h2 client and agent"),
    "aio/h2c": Spec(AIO, throughput=False, echo_client="h2", what="(e) plain grpc.aio relay, h2 client and agent"),
    "aio+queue": Spec(AIO, batch=0, what="(c) aio, client through a producer queue, no merging"),
    "aio+batch": Spec(AIO, batch=BATCH_BYTES, what="(c) aio, client merges queued chunks"),
    "router+queue": Spec(("router",), batch=0, what="(c) router, client producer queue, no merging"),
    "router+batch": Spec(("router",), batch=BATCH_BYTES, what="(c) router, client merges queued"),
    "aio-asyncio": Spec((*AIO, "--no-uvloop"), what="(d) grpc.aio on the stdlib loop"),
    "aio-poll": Spec(AIO, env={"GRPC_POLL_STRATEGY": "poll"}, what="(d) GRPC_POLL_STRATEGY=poll"),
    "aio-epoll1": Spec(AIO, env={"GRPC_POLL_STRATEGY": "epoll1"}, what="(d) GRPC_POLL_STRATEGY=epoll1"),
    "aio-nofork": Spec(AIO, env={"GRPC_ENABLE_FORK_SUPPORT": "0"}, what="(d) GRPC_ENABLE_FORK_SUPPORT=0"),
    "aio-noreuseport": Spec((*AIO, "--option", "grpc.so_reuseport=0"), what="(d) grpc.so_reuseport=0"),
    "aio-cbcq": Spec(
        AIO, env={"GRPC_EXPERIMENTS": "event_engine_callback_cq"}, what="(d) experiment event_engine_callback_cq"
    ),
    "aio-pollalt": Spec(
        AIO, env={"GRPC_EXPERIMENTS": "pollset_alternative"}, what="(d) experiment pollset_alternative"
    ),
    "aio-lowat": Spec(
        AIO, env={"GRPC_EXPERIMENTS": "tcp_rcv_lowat,tcp_frame_size_tuning"}, what="(d) tcp_rcv_lowat+frame tuning"
    ),
    "aio-latency": Spec(
        (*AIO, "--option", "grpc.optimization_target=latency"), what="(d) grpc.optimization_target=latency"
    ),
    "aio-nobdp": Spec(
        (*AIO, "--option", "grpc.http2.bdp_probe=0", "--option", "grpc.http2.lookahead_bytes=4194304"),
        what="(d) no BDP probing, 4 MiB stream window",
    ),
}


class RelayProc:
    """A relay prototype in its own process: prints `listening PORT`, serves until killed."""

    def __init__(self, argv: tuple[str, ...], env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", *argv]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=bench_env(env), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"{argv} did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def run_json(argv: list[str], timeout: float = 300.0) -> dict[str, Any]:
    """Run a load generator; its first JSON line."""
    proc = subprocess.run(argv, cwd=ROOT, env=bench_env(), capture_output=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{argv[2:5]} failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[0])
    return result


class Bench:
    """The targets' processes and their measurements."""

    def __init__(self, names: list[str], tls: dict[str, str] | None = None) -> None:
        self.names = names
        self.tls = tls or {}
        self.router: Router | None = None
        self.procs: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], RelayProc] = {}
        self.where: dict[str, tuple[str, int]] = {}
        for name in names:
            spec = SPECS[name]
            if spec.server == ("router",):
                if self.router is None:
                    if self.tls:
                        cert, key = self.tls["OSMO_BENCH_TLS_CERT"], self.tls["OSMO_BENCH_TLS_KEY"]
                        self.router = Router(f"--tls-cert={cert}", f"--tls-key={key}", "--auth=none", secure=True)
                    else:
                        self.router = Router()
                address = f"127.0.0.1:{self.router.ws_port}" if spec.proto == "ws" else self.router.address
                self.where[name] = (address, self.router.pid)
                continue
            key = (spec.server, tuple(sorted(spec.env.items())))
            if key not in self.procs:
                self.procs[key] = RelayProc(spec.server, spec.env)
            self.where[name] = (self.procs[key].address, self.procs[key].pid)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        if self.router is not None:
            self.router.stop()

    def throughput(self, name: str, size: int, seconds: float, sessions: int) -> dict[str, Any]:
        spec, (address, pid) = SPECS[name], self.where[name]
        common = ["--address", address, "--size", str(size), "--sessions", str(sessions), "--seconds", str(seconds)]
        common += ["--cpu-pid", str(pid)]
        if spec.batch >= 0:
            argv = [sys.executable, "-m", "bench.experiments.batching", "--batch", str(spec.batch), *common]
        else:
            argv = [sys.executable, "-m", "bench.loadgen", f"{spec.proto}-throughput", *common]
        return run_json(argv)

    def echo(self, name: str, rounds: int) -> dict[str, Any]:
        spec, (address, pid) = SPECS[name], self.where[name]
        argv = [sys.executable, "-m", "bench.loadgen", f"{spec.proto}-echo", "--address", address]
        if spec.batch >= 0:  # the client's side of each round trip through the batching writer
            argv = [sys.executable, "-m", "bench.experiments.batching", "echo", "--batch", str(spec.batch)]
            argv += ["--address", address]
        if spec.echo_client == "h2":
            argv = [sys.executable, "-m", "bench.experiments.h2_client", "echo", "--address", address]
        return run_json([*argv, "--rounds", str(rounds), "--cpu-pid", str(pid)])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every target, interleaved; raw runs per target."""
    names = args.targets
    tls: dict[str, str] = {}
    if args.tls:  # every server with a certificate from a fresh CA, every load generator trusting that CA
        from tests.security_kit import Pki

        pki = Pki.create(Path(tempfile.mkdtemp(prefix="bench-tls-")))
        tls = {"OSMO_BENCH_TLS_CERT": str(pki.server_cert), "OSMO_BENCH_TLS_KEY": str(pki.server_key)}
        tls[TLS_CA_ENV] = str(pki.ca)
        os.environ.update(tls)  # bench_env() passes the environment on to every process started
    bench = Bench(names, tls)
    raw: dict[str, Any] = {n: {"throughput": {str(s): [] for s in args.sizes}, "echo": []} for n in names}
    try:
        for rep in range(0 if args.echo_only else args.repeats):
            for size in args.sizes:
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    if not SPECS[name].throughput:
                        continue
                    try:
                        raw[name]["throughput"][str(size)].append(bench.throughput(name, size, args.seconds, 8))
                    except Exception as err:  # one failing candidate must not lose the others' figures
                        print(f"{name} {size}: {err}", file=sys.stderr)
                print(f"repetition {rep + 1}/{args.repeats}, {size} B done", file=sys.stderr, flush=True)
        echoing = [n for n in names if SPECS[n].echo]
        for i in range(args.slices):
            order = echoing[i % len(echoing) :] + echoing[: i % len(echoing)]
            for name in order:
                try:
                    raw[name]["echo"].append(bench.echo(name, args.echo_rounds // args.slices))
                except Exception as err:
                    print(f"{name} echo: {err}", file=sys.stderr)
        print("echo done", file=sys.stderr, flush=True)
    finally:
        bench.close()
    return raw


def _ratios(raw: dict[str, Any], name: str, ref: str, size: str) -> float | None:
    """Median of per-repetition throughput ratios name / ref (same repetition, same size)."""
    mine, theirs = raw[name]["throughput"][size], raw.get(ref, {}).get("throughput", {}).get(size, [])
    pairs = [a["mbps"] / b["mbps"] for a, b in zip(mine, theirs, strict=False) if b["mbps"]]
    return median(pairs) if pairs else None


def summarise(raw: dict[str, Any], sizes: list[int]) -> dict[str, dict[str, Any]]:
    """Per target: medians and ratios to aio and ws."""
    out: dict[str, dict[str, Any]] = {}
    for name, data in raw.items():
        row: dict[str, Any] = {"what": SPECS[name].what}
        for size in map(str, sizes):
            runs = data["throughput"][size]
            if not runs:
                continue
            row[f"mbps_{size}"] = median([r["mbps"] for r in runs])
            row[f"cpu_us_per_mb_{size}"] = median([r["cpu_s"] / (r["bytes"] / 1e6) * 1e6 for r in runs])
            row[f"relay_cpu_share_{size}"] = median([r["cpu_s"] / r["seconds"] for r in runs])
            row[f"payload_per_message_{size}"] = median([r["bytes"] / max(r["messages"], 1) for r in runs])
            for ref in ("aio", "ws"):
                row[f"x{ref}_{size}"] = _ratios(raw, name, ref, size)
        if data["echo"]:
            samples = [s for r in data["echo"] for s in r["samples_us"]]
            row["echo_p50"], row["echo_p99"] = percentile(samples, 50), percentile(samples, 99)
            row["cpu_us_per_echo"] = median([r["cpu_s"] / r["round_trips"] * 1e6 for r in data["echo"]])
        out[name] = row
    for ref in ("aio", "ws"):
        base = out.get(ref, {})
        for row in out.values():
            for key in ("echo_p50", "echo_p99", "cpu_us_per_echo", *(f"cpu_us_per_mb_{s}" for s in sizes)):
                if key in row and base.get(key):
                    row[f"{key}_x{ref}"] = row[key] / base[key]
    return out


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"


def table(summary: dict[str, dict[str, Any]], sizes: list[int]) -> str:
    """A Markdown table of the summary."""
    head = ["candidate"]
    for size in sizes:
        kib = size // 1024
        head += [f"{kib} KiB MB/s", "x aio", "x WS", f"CPU us/MB {kib} KiB", "x WS"]
    head += ["echo p50 us", "x WS", "echo p99 us", "x WS", "CPU us/echo", "x WS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary.items():
        cells = [name]
        for size in sizes:
            cells += [
                _fmt(row.get(f"mbps_{size}"), 1),
                _fmt(row.get(f"xaio_{size}"), 2),
                _fmt(row.get(f"xws_{size}"), 2),
                _fmt(row.get(f"cpu_us_per_mb_{size}")),
                _fmt(row.get(f"cpu_us_per_mb_{size}_xws"), 2),
            ]
        cells += [
            _fmt(row.get("echo_p50")),
            _fmt(row.get("echo_p50_xws"), 2),
            _fmt(row.get("echo_p99")),
            _fmt(row.get("echo_p99_xws"), 2),
            _fmt(row.get("cpu_us_per_echo")),
            _fmt(row.get("cpu_us_per_echo_xws"), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Measure, print the table, write the raw runs and the summary as JSON."""
    parser = argparse.ArgumentParser(prog="bench.experiments.compare_paths", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="ws,router,aio,sync,grpclib", type=lambda s: s.split(","))
    parser.add_argument("--sizes", default="4096,32768", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--echo-rounds", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--echo-only", action="store_true", help="only the echo figures")
    parser.add_argument("--tls", action="store_true", help="TLS on every connection (not grpclib)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "paths.json"))
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args()
    if args.list:
        for name, spec in SPECS.items():
            print(f"{name:18} {spec.what}")
        return
    unknown = [n for n in args.targets if n not in SPECS]
    if unknown:
        parser.error(f"unknown targets: {unknown}")
    info = machine_info()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    raw = measure(args)
    info["load_average_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json + ".raw", "w") as f:  # kept even if the summary fails
        json.dump({"machine": info, "started": started, "args": vars(args), "raw": raw}, f)
    summary = summarise(raw, args.sizes)
    print(f"{started}; load average {info.get('load_average_start')} at start, {info['load_average_end']} at end")
    print(table(summary, args.sizes))
    with open(args.json, "w") as f:
        json.dump({"machine": info, "started": started, "args": vars(args), "summary": summary, "raw": raw}, f)


if __name__ == "__main__":
    main()
