"""A/B of the port-forward round trip: two forward stacks, 1-byte ping-pong rounds alternating.

Each stack is a router, an agent and an `osmo-net-client port-forward` on loopback, to one echo
target; stack A and stack B differ by the environment given (`--a-env K=V`, `--b-env K=V`, e.g.
`PYTHONPATH=/tmp/main/src` to run another checkout's code, or `OSMO_UVLOOP=1`) or by the interpreter
their three processes run on (`--b-python /tmp/v313/bin/python`: a venv of another Python with the
project installed). Rounds alternate
A and B (the order flipping each round) so load on a shared machine falls on both alike; a socat
hop to the same target is the baseline. Per round: p50/p99 of `--rounds` round trips, and the CPU
each process of the stack used per round trip (/proc/PID/stat). Medians over the rounds, and the
median of the per-round B/A ratios (issue 18: redis-benchmark through port-forward is this round trip).
With `--redis` the target is a redis-server and each run is `redis-benchmark -c 1 -t get -n ROUNDS`
(its requests/s as "rps", its p50 as "p50"; no p99) instead of the ping-pong.

    .venv/bin/python -m bench.experiments.forward_ab --a-env PYTHONPATH=/tmp/main/src [--redis]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from contextlib import ExitStack
from typing import Any

from bench.bench_forward import ROUTER_FLAGS, socat_relay
from bench.bench_real_clients import redis_get, redis_server
from bench.common import cpu_seconds
from tests import harness
from tests.forward_servers import FORWARDING
from tests.harness import AgentProc, Proc, Router, cli_env, client_cmd

WARMUP = 50


def echo_target() -> tuple[socket.socket, int]:
    """A threaded TCP echo server on loopback (TCP_NODELAY); returns its socket and port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def ping_pong(port: int, rounds: int) -> tuple[float, float]:
    """p50 and p99 (us) of 1-byte round trips on one connection to `port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for i in range(WARMUP + rounds):
            start = time.perf_counter_ns()
            sock.sendall(b"x")
            if sock.recv(16) != b"x":
                raise RuntimeError("the echo answered something else")
            if i >= WARMUP:
                samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def forward_stack(
    stack: ExitStack, env: dict[str, str], target: int, workflow: str, python: str | None = None
) -> tuple[int, dict[str, int]]:
    """Router, agent and port-forward client with `env`, on `python` (default: this one); local port and pids."""
    if python is not None:
        # The harness builds every argv from its PYTHON when called: swap it for this stack's spawns.
        own, harness.PYTHON = harness.PYTHON, python
        try:
            return forward_stack(stack, env, target, workflow)
        finally:
            harness.PYTHON = own
    router = Router(*ROUTER_FLAGS, env=env)
    stack.callback(router.stop)
    agent = AgentProc(router.address, workflow, env=env)
    stack.callback(agent.stop)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    client = Proc(client_cmd("port-forward", *args, f":{target}"), env=cli_env(env))
    stack.callback(client.stop)
    client.wait_for(lambda _: any(FORWARDING.match(line) for line in client.out_lines), stdout=True)
    match = next(m for m in map(FORWARDING.match, client.out_lines) if m)
    return int(match.group(2)), {"router": router.pid, "agent": agent.popen.pid, "client": client.popen.pid}


def measure(
    envs: dict[str, dict[str, str]],
    rounds: int,
    repeats: int,
    redis: bool,
    pythons: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Alternate the stacks' rounds (ping-pong, or redis-benchmark); every round's figures and the socat baseline."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in envs}
    socat: list[dict[str, float]] = []

    def run(port: int) -> dict[str, float]:
        if redis:
            rps, p50 = redis_get(port, rounds)
            return {"p50": p50, "rps": rps}
        p50, p99 = ping_pong(port, rounds)
        return {"p50": p50, "p99": p99}

    with ExitStack() as stack:
        if redis:
            target = stack.enter_context(redis_server())
        else:
            server, target = echo_target()
            stack.callback(server.close)
        pythons = pythons or {}
        stacks = {
            name: forward_stack(stack, env, target, f"ab-{name}", pythons.get(name)) for name, env in envs.items()
        }
        hop = stack.enter_context(socat_relay(target))
        for repeat in range(repeats):
            for name in list(envs) if repeat % 2 == 0 else list(reversed(envs)):
                port, pids = stacks[name]
                before = {role: cpu_seconds(pid) for role, pid in pids.items()}
                figures = run(port)
                trips = rounds if redis else rounds + WARMUP
                per_rt = {f"{r} cpu": (cpu_seconds(p) - before[r]) / trips * 1e6 for r, p in pids.items()}
                runs[name].append({**figures, **per_rt})
                print(name, {k: round(v) for k, v in runs[name][-1].items()}, flush=True)
            socat.append(run(hop))
            print("socat", {k: round(v) for k, v in socat[-1].items()}, flush=True)
    medians = {f"socat_{key}": statistics.median(run[key] for run in socat) for key in socat[0]}
    return {"runs": runs, **medians}


def main() -> None:
    """Parse the stacks' environments, measure, print the medians."""
    parser = argparse.ArgumentParser(prog="bench.experiments.forward_ab")
    parser.add_argument("--a-env", action="append", default=[], help="K=V for stack A (repeatable)")
    parser.add_argument("--b-env", action="append", default=[], help="K=V for stack B (repeatable)")
    parser.add_argument("--a-python", help="interpreter of stack A's processes (default: this one)")
    parser.add_argument("--b-python", help="interpreter of stack B's processes (default: this one)")
    parser.add_argument("--rounds", type=int, default=800, help="round trips per run")
    parser.add_argument("--repeats", type=int, default=6, help="runs of each stack")
    parser.add_argument("--redis", action="store_true", help="redis-benchmark GET -c 1 instead of the ping-pong")
    args = parser.parse_args()
    envs = {"A": dict(kv.split("=", 1) for kv in args.a_env), "B": dict(kv.split("=", 1) for kv in args.b_env)}
    pythons = {"A": args.a_python, "B": args.b_python}
    result = measure(envs, args.rounds, args.repeats, args.redis, pythons)
    for name, runs in result["runs"].items():
        medians = {key: round(statistics.median(run[key] for run in runs)) for key in runs[0]}
        print(f"{name} {envs[name]} {pythons[name] or 'this interpreter'}: medians {medians}")
    ratios = [b["p50"] / a["p50"] for a, b in zip(result["runs"]["A"], result["runs"]["B"], strict=True)]
    if "socat_rps" in result:
        rps = {name: statistics.median(run["rps"] for run in runs) for name, runs in result["runs"].items()}
        print(f"socat {result['socat_rps']:.0f} GET/s; to socat: "
              + ", ".join(f"{name} {value / result['socat_rps']:.3f}x" for name, value in rps.items()))  # fmt: skip
    print(f"socat p50 {result['socat_p50']:.0f} us; B/A p50 per round {[round(r, 2) for r in ratios]}, "
          f"median {statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
