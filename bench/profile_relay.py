"""Where the router's time goes: py-spy on a router while the load generator drives it.

    .venv/bin/python -m bench.profile_relay [--size 4096|32768|262144|echo ...] [--seconds 6]

For each workload (relay throughput at a message size, or 1-byte echo) this starts a router,
runs the load generator against it, samples the router with `py-spy record --nonblocking`
meanwhile (without pausing it), and sorts the samples of busy threads into a few buckets by the
innermost Python frame (grpc's C code counts as the Python call that entered it). It also
prints the CPU seconds the router and the load generator used, so the reader sees which process
was saturated. This is the profile behind the "missed" rows of docs/bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, THROUGHPUT_SESSIONS, bench_env, cpu_seconds, percentile
from tests.harness import Router

PY_SPY = Path(sys.executable).with_name("py-spy")

#: (bucket, substrings of a sample's innermost Python frame that put it there); the first match wins.
#: grpc's Cython and C++ code shows as the Python frame that called into it.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("grpc write (into the C core: framing, sendmsg)", ("GrpcSide.write", "_write (grpc", "write (grpc")),
    ("grpc read (one completion round trip per message)", ("GrpcSide.read", "_read (grpc", "read (grpc")),
    ("grpc's completion-queue poller thread", ("Thread.run", "threading.py")),
    ("event loop (uvloop: polling, callbacks)", ("Runner.run", "run (uvloop", "run_forever", "selectors.py")),
    ("osmo_router code (relay, queues, metrics)", ("osmo_router/",)),
)


def bucket_of(stack: list[str]) -> str:
    """The bucket of one sample (py-spy leaves idle threads out)."""
    leaf = stack[-1]
    for name, needles in BUCKETS:
        if any(needle in leaf for needle in needles):
            return name
    return "other (interpreter, allocator)"


def profile(workload: str, seconds: float) -> None:
    """Run one workload under py-spy and print the buckets and CPU use."""
    router = Router()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "profile.txt"
            if workload == "echo":
                args = ["grpc-echo", "--rounds", str(int(seconds * 800))]
            else:
                args = ["grpc-throughput", "--size", workload, "--sessions", str(THROUGHPUT_SESSIONS)]
                args += ["--seconds", str(seconds)]
            gen = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", *args, "--address", router.address],
                cwd=ROOT, env=bench_env(), stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            router_cpu, gen_cpu, start = cpu_seconds(router.pid), 0.0, time.perf_counter()
            spy = subprocess.run(
                [str(PY_SPY), "record", "--nonblocking", "-r", "250", "-f", "raw", "-o", str(raw),
                 "-d", str(int(seconds)), "-p", str(router.pid)],
                capture_output=True, timeout=seconds + 60,
            )  # fmt: skip
            try:
                gen_cpu = cpu_seconds(gen.pid)
            except OSError:
                gen_cpu = float("nan")
            router_cpu = cpu_seconds(router.pid) - router_cpu
            wall = time.perf_counter() - start
            output, _ = gen.communicate(timeout=seconds + 120)
            if os.environ.get("PROFILE_KEEP"):
                Path(os.environ["PROFILE_KEEP"]).write_text(raw.read_text())
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {spy.stderr.decode(errors='replace')[-500:]}")
            _report(workload, raw, router_cpu, gen_cpu, wall, output)
    finally:
        router.stop()


def _report(workload: str, raw: Path, router_cpu: float, gen_cpu: float, wall: float, output: str) -> None:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        counts[bucket_of(stack.split(";"))] += int(number)
    busy = sum(counts.values()) or 1
    label = "1-byte echo" if workload == "echo" else f"throughput, {int(workload) // 1024} KiB messages"
    print(f"\n== router under {label}")
    print(f"   CPU over {wall:.1f}s: router {router_cpu / wall:.0%} of a core, load generator {gen_cpu / wall:.0%}")
    result = output.strip().splitlines()[-1] if output.strip() else ""
    if workload == "echo" and result:
        samples = json.loads(result)["samples_us"]
        print(f"   echo p50 {percentile(samples, 50):.0f} us, p99 {percentile(samples, 99):.0f} us")
    elif result:
        print(f"   load generator: {result}")
    for name, count in counts.most_common():
        print(f"   {count / busy:6.1%}  {name}")


def main() -> None:
    """Profile each requested workload in turn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", help="4096, 32768, 262144 or echo (repeatable)")
    parser.add_argument("--seconds", type=float, default=6.0)
    options = parser.parse_args()
    if not PY_SPY.exists():
        sys.exit(f"py-spy is not installed in this environment ({PY_SPY}); pip install py-spy")
    for workload in options.size or ["4096", "32768", "262144", "echo"]:
        profile(workload, options.seconds)


if __name__ == "__main__":
    main()
