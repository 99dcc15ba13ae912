"""Where a redis GET's round trip spends its time, process by process, from the kernel's own events (issue 18).

A GET -c 1 through port-forward is a chain: redis-benchmark, client, router, agent, redis and back, one
process running at a time. Each process's turn on that chain is an *activation*: from the scheduler
switching it in (woken by the previous process's write) to its first write, which wakes the next one.
Work after that write overlaps with the next process on the other core; work before it does not. So
the figure that sets GET/s is each activation's time to its first write, plus the write itself.

This records, with `perf record -a` on the scheduler and raw system-call tracepoints (no hardware
counters needed), a steady `redis-benchmark -c 1 -t get` through the forward (and with `--relays`
through three minimal uvloop relays, bench/copy_relay.py, the floor in Python), then prints per
process the medians of: an activation's run time, its time before the first write, that write's
duration (the kernel's loopback send, which runs the receiver's TCP input and wake-up), the time after
the last write, and its system calls per activation. Needs root (or perf_event_paranoid <= -1) and
Debian's linux-perf; `--env K=V` runs the forward's processes with that environment (e.g. a
PYTHONPATH with a sitecustomize, as bench/experiments/bare_router_hop.py writes).

    .venv/bin/python -m bench.experiments.hop_timeline [--relays] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_real_clients import redis_server
from bench.copy_relay import relay_chain, uvloop_relay
from bench.experiments.forward_ab import forward_stack

#: x86_64 system-call numbers: the writes that hand a message on, and the names printed.
WRITES = {1, 20, 44, 46}  # write, writev, sendto, sendmsg
NAMES = {0: "read", 1: "write", 7: "poll", 19: "readv", 20: "writev", 44: "sendto", 45: "recvfrom", 46: "sendmsg"}
NAMES |= {47: "recvmsg", 232: "epoll_wait", 233: "epoll_ctl", 281: "epoll_pwait"}
EVENTS = ["sched:sched_switch", "raw_syscalls:sys_enter", "raw_syscalls:sys_exit"]
LINE = re.compile(r"^\s*\S.*?\s+(\d+)\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
PIDS = re.compile(r"prev_pid=(\d+).*next_pid=(\d+)")
NR = re.compile(r"NR (\d+)")


@dataclass
class Activation:
    """One turn of a process on the CPU: when it came in and went out, its system calls (nr, enter, exit)."""

    start: float
    end: float = 0.0
    calls: list[list[float]] = field(default_factory=list)


def record(port: int, seconds: float, out: Path) -> int:
    """A steady redis-benchmark GET -c 1 against `port`, traced for `seconds`; its pid."""
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-n", "100000000", "-t", "get", "-q"]
    bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # (past its connection and the stacks' warm-up: a steady state is what is measured)
        events = [arg for event in EVENTS for arg in ("-e", event)]
        perf = ["perf", "record", "-q", "-a", "-o", str(out), *events, "--", "sleep", str(seconds)]
        subprocess.run(perf, check=True, stderr=subprocess.DEVNULL, timeout=seconds + 60)
    finally:
        bench.terminate()
        bench.wait(10)
    return bench.pid


def activations(path: Path, pids: set[int]) -> dict[int, list[Activation]]:
    """Each traced process's activations, from `perf script` of the recording."""
    fields = "comm,tid,cpu,time,event,trace"
    script = subprocess.run(["perf", "script", "-i", str(path), "-F", fields], capture_output=True, text=True)
    done: dict[int, list[Activation]] = defaultdict(list)
    running: dict[int, Activation] = {}
    for line in script.stdout.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        tid, at, event, rest = int(match[1]), float(match[2]) * 1e6, match[3], match[4]
        if event == "sched:sched_switch":
            switch = PIDS.search(rest)
            if switch is None:
                continue
            out, into = int(switch[1]), int(switch[2])
            if out in running:
                running[out].end = at
                done[out].append(running.pop(out))
            if into in pids:
                running[into] = Activation(at)
        elif tid in running:
            calls = running[tid].calls
            if event == "raw_syscalls:sys_enter" and (nr := NR.search(rest)):
                calls.append([int(nr[1]), at, 0.0])
            elif event == "raw_syscalls:sys_exit" and calls:
                calls[-1][2] = at
    return done


def summary(name: str, turns: list[Activation]) -> str:
    """One line: the medians of an activation's parts, and its system calls."""
    turns = [turn for turn in turns if turn.calls]
    before, writing, after, calls = [], [], [], Counter[str]()
    for turn in turns:
        for nr, *_ in turn.calls:
            calls[NAMES.get(int(nr), str(int(nr)))] += 1
        writes = [call for call in turn.calls if call[0] in WRITES and call[2]]
        if writes:
            before.append(writes[0][1] - turn.start)
            writing.append(writes[0][2] - writes[0][1])
            after.append(turn.end - writes[-1][2])

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):5.1f}" if values else "    -"

    run = med([turn.end - turn.start for turn in turns])
    per_turn = ", ".join(f"{call} {count / len(turns):.2f}" for call, count in calls.most_common(7))
    return (
        f"{name:16} {len(turns):7} {run} {med(before)} {med(writing)} {med(after)}   {per_turn}"
        if turns
        else f"{name:16} no activation with a system call"
    )


def trace(label: str, port: int, pids: dict[str, int], seconds: float, workdir: Path) -> None:
    """Record and print one path's table."""
    out = workdir / f"{label}.data"
    pids = {**pids, "redis-benchmark": record(port, seconds, out)}
    turns = activations(out, set(pids.values()))
    print(f"== {label}: medians in us (activations, run, before the first write, that write, after the last)")
    for name, pid in pids.items():
        print(summary(name, turns.get(pid, [])))


def main() -> None:
    """Trace the forward (and the relays with --relays) under a steady redis GET -c 1."""
    parser = argparse.ArgumentParser(prog="bench.experiments.hop_timeline", description=__doc__)
    parser.add_argument("--relays", action="store_true", help="also trace three minimal uvloop relays")
    parser.add_argument("--seconds", type=float, default=1.5, help="how long each path is traced")
    parser.add_argument("--env", action="append", default=[], help="K=V for the forward's processes (repeatable)")
    args = parser.parse_args()
    env = dict(pair.split("=", 1) for pair in args.env)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="hop-timeline-") as tmp:
        target = stack.enter_context(redis_server())
        port, pids = forward_stack(stack, env, target, "timeline")
        trace("port-forward", port, pids, args.seconds, Path(tmp))
        if args.relays:
            relay_pids: list[int] = []
            first = relay_chain(stack, target, 3, uvloop_relay, relay_pids)
            trace(
                "3 minimal uvloop relays",
                first,
                {f"relay {n}": p for n, p in enumerate(relay_pids)},
                args.seconds,
                Path(tmp),
            )


if __name__ == "__main__":
    main()
