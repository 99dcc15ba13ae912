"""CPU per GB of each process of the forward under `iperf3 -P N` (issue 18), against three minimal relays.

Stacks A (and B, if `--b-env` is given) are each a router, an agent and an `osmo-net-client port-forward` on
loopback to one `iperf3 -s` (forward_ab's `forward_stack`; `--a-env PYTHONPATH=/tmp/x/src` runs another
tree); beside them three `bench/copy_relay.py`'s `MinimalRelay` processes in a row, and one socat hop for the throughput
ratio. Rounds alternate the paths (order reversed every other round); in each, one `iperf3 -c` upload and
one `-R` download per path, and the user + system CPU each of our processes (and each relay) used from
/proc/PID/stat, divided by the bytes iperf3's receiver counted. CPU per byte survives a shared machine's
load far better than throughput does; the load average is printed per round anyway.

    .venv/bin/python -m bench.experiments.bulk_cpu --a-env PYTHONPATH=/tmp/base/src --b-env PYTHONPATH=src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from contextlib import ExitStack

from bench.bench_forward import socat_relay
from bench.bench_real_clients import iperf3_server
from bench.common import cpu_seconds
from bench.copy_relay import relay_chain, uvloop_relay
from bench.experiments.forward_ab import forward_stack

CASES = (("up", False), ("down", True))


def iperf3_bytes(port: int, streams: int, reverse: bool, seconds: float) -> tuple[float, float]:
    """One `iperf3 -c` run: (bytes the receiver counted, MB/s). Retries a busy server a few times."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams), "-t", str(seconds), "-J"]
    argv += ["--connect-timeout", "10000", *(["-R"] if reverse else [])]
    error = ""
    for attempt in range(20):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        result = json.loads(proc.stdout or "{}")
        if proc.returncode == 0 and "error" not in result:
            received = result["end"]["sum_received"]
            return float(received["bytes"]), float(received["bits_per_second"]) / 8e6
        error = str(result.get("error", proc.stderr[-300:]))
        print(f"  (iperf3 attempt {attempt}: {error})", flush=True)  # a loaded machine's iperf3 fails now and then
        if "busy" not in error and attempt >= 2:
            break
        time.sleep(0.1 * (attempt + 1))  # the server still closing the last test answers "busy" meanwhile
    raise RuntimeError(f"iperf3 failed: {error}")


def main() -> None:
    """Measure round by round; print every run and the medians of CPU s/GB per process and the ratios."""
    parser = argparse.ArgumentParser(prog="bench.experiments.bulk_cpu")
    parser.add_argument("--a-env", action="append", default=[], help="K=V for stack A (repeatable)")
    parser.add_argument("--b-env", action="append", default=None, help="K=V for stack B (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--no-relays", action="store_true", help="skip the three minimal relays")
    args = parser.parse_args()
    envs = {"A": dict(kv.split("=", 1) for kv in args.a_env)}
    if args.b_env is not None:
        envs["B"] = dict(kv.split("=", 1) for kv in args.b_env)
    rows: dict[str, list[dict[str, float]]] = {}
    with ExitStack() as stack:
        target = stack.enter_context(iperf3_server())
        paths: dict[str, tuple[int, dict[str, int]]] = {}
        for name, env in envs.items():
            paths[name] = forward_stack(stack, env, target, f"bulk-{name}")
        if not args.no_relays:
            pids: list[int] = []
            port = relay_chain(stack, target, 3, uvloop_relay, pids)
            paths["relay x3"] = (port, {f"relay{i}": pid for i, pid in enumerate(reversed(pids))})
        paths["socat"] = (stack.enter_context(socat_relay(target)), {})
        for rnd in range(args.rounds):
            order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
            print(f"round {rnd} load {os.getloadavg()[0]:.1f}", flush=True)
            for case, reverse in CASES:
                socat_rate = 0.0
                measured: dict[str, dict[str, float]] = {}
                for name in order:
                    port, procs = paths[name]
                    before = {role: cpu_seconds(pid) for role, pid in procs.items()}
                    moved, rate = iperf3_bytes(port, args.streams, reverse, args.seconds)
                    row = {"MB/s": rate}
                    row.update({role: (cpu_seconds(pid) - before[role]) / moved * 1e9 for role, pid in procs.items()})
                    if procs:
                        row["sum"] = sum(row[role] for role in procs)
                    measured[name] = row
                    if name == "socat":
                        socat_rate = rate
                for name, row in measured.items():
                    row["x socat"] = row["MB/s"] / socat_rate
                    rows.setdefault(f"{name} {case}", []).append(row)
                    print(f"  {case:4} {name:9}", {k: round(v, 2) for k, v in row.items()}, flush=True)
    print(f"medians over {args.rounds} rounds (CPU s/GB; load now {os.getloadavg()[0]:.1f}):")
    for key, runs in rows.items():
        print(f"  {key:14}", {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]})


if __name__ == "__main__":
    main()
