"""Real clients through `port-forward` beside a socat hop, interleaved in one run (issue 18).

A real `redis-server` and a real `iperf3 -s` listen on loopback. Each is reached two ways, the
two measured one right after the other in every round (the order alternating by round):

- a socat hop (`socat TCP-LISTEN -> target`), the baseline;
- `osmo-net-client port-forward` through the router and agent on the branch under test (router,
  agent and client processes on loopback, as bench_forward starts them).

Figures (medians over the rounds; ratios are medians of the per-round forward / socat ratios):

- `redis-benchmark -c 1 -t get`: requests/s (target >= 0.35x socat) and p50 latency;
- `iperf3 -P 8` and `iperf3 -P 1`, both directions (upload: client -> target; download: `-R`):
  throughput (targets >= 0.7x socat with 8 streams, >= 0.85x with one).

redis and iperf3 are also reached through three socat hops in a row (`chain`), in the same rounds: the
port-forward path crosses three processes (client, router, agent), so a chain of three relays that
do no work at all is the floor any implementation of that path meets on this machine. Its ratio to
one hop, beside the forward's, separates the cost of the hops from the cost of our protocol.
socat moves 8 KiB per read, so its chain is a low floor for bulk; both are also reached through
three minimal uvloop relays in a row (`relays`: bench/copy_relay.py's MinimalRelay, large
reads, flow control, nothing else), the floor of three Python processes that only copy. The forward
against that chain is the cost of our protocol alone (HTTP/2, gRPC framing, resume, budgets).

The rendezvous p99 and router memory per idle session figures of issue 18 are bench_relay's
("rendezvous to first byte p99", "router memory per idle session").

    .venv/bin/python -m bench.bench_real_clients [--quick]

Needs redis-server, redis-benchmark (Debian redis-tools), iperf3 and socat: `scripts/install --bench`.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bench.bench_forward import ROUTER_FLAGS, socat_relay
from bench.common import attempt, cpu_seconds, figure, median, paired
from bench.copy_relay import relay_chain, uvloop_relay
from bench.forward_targets import free_port, wait_listening
from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router

WORKFLOW = "bench-real-clients"
TOOLS = ("redis-server", "redis-benchmark", "iperf3", "socat")
REDIS_RATIO_MIN = 0.35
#: (parallel streams, target on forward / socat throughput)
IPERF_CASES = ((8, 0.7), (1, 0.85))
#: The key redis-benchmark's GET asks for (its default key, without -r).
REDIS_KEY = b"key:__rand_int__"
#: One measurement through one path: the port to use -> its values.
Run = Callable[[int], tuple[float, ...]]
#: Attempts of one iperf3 run while its server says it is busy (backing off 50 ms more each time).
BUSY_RETRIES = 10


@contextmanager
def redis_server() -> Iterator[int]:
    """A redis-server on a free loopback port, no persistence, holding REDIS_KEY; yields its port."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*argv, "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        _redis_set(port, REDIS_KEY, b"x" * 3)  # GET then returns a value, as redis-benchmark's own SET leaves
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _redis_set(port: int, key: bytes, value: bytes) -> None:
    """SET key value over RESP; raises unless redis answers +OK."""
    parts = [b"SET", key, value]
    command = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(command)
        if not sock.recv(64).startswith(b"+OK"):
            raise RuntimeError("redis did not accept SET")


@contextmanager
def iperf3_server() -> Iterator[int]:
    """An `iperf3 -s` on a free loopback port; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(port)  # iperf3 logs the probe connection as a failed test and keeps serving
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def redis_get(port: int, requests: int) -> tuple[float, float]:
    """`redis-benchmark -c 1 -t get` against port: (requests/s, p50 latency in us)."""
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-n", str(requests), "-t", "get"]
    out = subprocess.run([*argv, "--csv"], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = list(csv.DictReader(line for line in out.splitlines() if line.startswith('"')))
    row = next(r for r in rows if r.get("test") == "GET")
    return float(row["rps"]), float(row["p50_latency_ms"]) * 1000


def iperf3_rate(port: int, streams: int, reverse: bool, seconds: float) -> float:
    """One `iperf3 -c` run against port: MB/s the receiving side got.

    An iperf3 server still closing the previous test answers "busy" for a moment: retried, bounded.
    """
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", str(streams), "-t", str(seconds), "-J"]
    argv += ["--connect-timeout", "10000", *(["-R"] if reverse else [])]
    error = ""
    for attempt_no in range(BUSY_RETRIES):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        result = json.loads(proc.stdout or "{}")
        if proc.returncode == 0 and "error" not in result:
            return float(result["end"]["sum_received"]["bits_per_second"]) / 8e6
        error = str(result.get("error", proc.stderr[-500:]))
        if "busy" not in error:
            break
        time.sleep(0.05 * (attempt_no + 1))
    raise RuntimeError(f"iperf3 -p {port} {' '.join(argv[5:])} failed: {error}")


class Rounds:
    """Collects, per case, the forward's and socat's value of every round, measured back to back."""

    def __init__(self, ports: dict[str, dict[str, int]]) -> None:
        #: target ("redis", "iperf3") -> path ("socat", "forward", "chain", "relays") -> port
        self.ports = ports
        self.values: dict[str, dict[str, list[float]]] = {}

    def measure(self, cases: tuple[str, ...], target: str, rnd: int, run: Run) -> None:
        """Run `run(port)` through every path of `target`, in their order in even rounds and reversed
        in odd ones; its values are the figures of `cases`, in that order."""
        paths = list(self.ports[target])
        for path in paths if rnd % 2 == 0 else reversed(paths):
            for case, value in zip(cases, run(self.ports[target][path]), strict=True):
                self.values.setdefault(case, {}).setdefault(path, []).append(value)

    def figure(
        self,
        case: str,
        name: str,
        unit: str,
        target: dict[str, float] | None,
        path: str = "forward",
        baseline: str = "socat",
    ) -> dict[str, Any]:
        """The case's row: `path` (the forward unless told) beside `baseline` (the socat hop unless told)."""
        slot = self.values[case]
        note = f"median of {len(slot[path])} interleaved rounds"
        return paired(name, unit, slot[path], slot[baseline], BASELINE_NAMES[baseline], target, note)

    def forward_only(self, case: str, name: str, unit: str) -> dict[str, Any]:
        """The case's row, the forward's values alone (a figure socat has no counterpart of)."""
        runs = self.values[case]["forward"]
        return figure(name, median(runs), unit, runs=runs, note=f"median of {len(runs)} rounds")


def _router_cpu(router_pid: int, run: Run, units: Callable[[tuple[float, ...]], float]) -> Run:
    """`run` with one more value: the router's CPU microseconds per unit of work (`units(values)`)
    spent during it (about 0 through socat, where the router idles)."""

    def measured(port: int) -> tuple[float, ...]:
        before = cpu_seconds(router_pid)
        values = run(port)
        return (*values, (cpu_seconds(router_pid) - before) * 1e6 / max(units(values), 1e-9))

    return measured


def _all_rounds(rounds: Rounds, router_pid: int, count: int, requests: int, seconds: float) -> None:
    """Every case, round by round (so slow drift of the machine's load hits both paths alike)."""
    redis = _router_cpu(router_pid, lambda port: redis_get(port, requests), lambda _values: requests)
    for rnd in range(count):
        rounds.measure(("redis_rps", "redis_p50", "redis_cpu"), "redis", rnd, redis)
        for streams, _ in IPERF_CASES:
            for reverse in (False, True):
                run = lambda port, s=streams, r=reverse: (iperf3_rate(port, s, r, seconds),)  # noqa: E731
                case = f"iperf3_{streams}_{'down' if reverse else 'up'}"
                moved = _router_cpu(router_pid, run, lambda values: values[0] * seconds)  # MB
                rounds.measure((case, f"{case}_cpu"), "iperf3", rnd, moved)


def _figures(rounds: Rounds, requests: int, seconds: float) -> list[dict[str, Any]]:
    out = [
        rounds.figure(
            "redis_rps",
            f"real clients: redis-benchmark GET -c 1 via port-forward ({requests} requests)",
            "req/s",
            {"ratio_at_least": REDIS_RATIO_MIN},
        ),
        rounds.figure("redis_p50", "real clients: redis-benchmark GET -c 1 via port-forward p50", "us", None),
        rounds.figure(
            "redis_rps",
            "real clients: redis-benchmark GET -c 1 via 3 chained socat hops (the 3-process floor)",
            "req/s",
            None,
            path="chain",
        ),
        rounds.figure(
            "redis_rps",
            "real clients: redis-benchmark GET -c 1 via 3 minimal uvloop relays (the floor in Python)",
            "req/s",
            None,
            path="relays",
        ),
        rounds.figure(
            "redis_rps",
            "real clients: redis-benchmark GET -c 1 via port-forward against 3 minimal uvloop relays",
            "req/s",
            None,
            baseline="relays",
        ),
        rounds.forward_only("redis_cpu", "real clients: router CPU per GET via port-forward", "us"),
    ]
    for streams, ratio in IPERF_CASES:
        for way, flag in (("up", "client -> target"), ("down", "-R, target -> client")):
            name = f"real clients: iperf3 -P {streams} via port-forward, {flag} ({seconds:g} s)"
            out.append(rounds.figure(f"iperf3_{streams}_{way}", name, "MB/s", {"ratio_at_least": ratio}))
            chained = f"real clients: iperf3 -P {streams} via 3 chained socat hops, {flag} (the 3-process floor)"
            out.append(rounds.figure(f"iperf3_{streams}_{way}", chained, "MB/s", None, path="chain"))
            relays = f"real clients: iperf3 -P {streams} via 3 minimal uvloop relays, {flag} (the floor in Python)"
            out.append(rounds.figure(f"iperf3_{streams}_{way}", relays, "MB/s", None, path="relays"))
            against = f"real clients: iperf3 -P {streams} via port-forward against 3 minimal uvloop relays, {flag}"
            out.append(rounds.figure(f"iperf3_{streams}_{way}", against, "MB/s", None, baseline="relays"))
    for way, flag in (("up", "client -> target"), ("down", "target -> client")):
        name = f"real clients: router CPU per MB, iperf3 -P 8 {flag}"
        out.append(rounds.forward_only(f"iperf3_8_{way}_cpu", name, "us/MB"))
    return out


def measure(count: int, requests: int, seconds: float) -> list[dict[str, Any]]:
    """Start the targets, the socat hops and the forward; run the rounds; the figures."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run scripts/install --bench")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        # One iperf3 server per path: a server takes one test at a time and is briefly busy after it.
        iperf = stack.enter_context(iperf3_server())
        iperf_socat = stack.enter_context(iperf3_server())
        iperf_chain = stack.enter_context(iperf3_server())
        iperf_relays = stack.enter_context(iperf3_server())
        router = Router(*ROUTER_FLAGS)
        stack.callback(router.stop)
        agent = AgentProc(router.address, WORKFLOW)
        stack.callback(agent.stop)
        client_args = ["--router-address", router.address, "--workflow-id", WORKFLOW, "--tls=false"]
        proc, (redis_local, iperf_local) = start_forward(client_args, f":{redis}", f":{iperf}", count=2)
        stack.callback(proc.stop)
        ports = {
            "redis": {
                "socat": stack.enter_context(socat_relay(redis)),
                "forward": redis_local,
                "chain": _socat_chain(stack, redis, hops=3),
                "relays": relay_chain(stack, redis, 3, uvloop_relay),
            },
            "iperf3": {
                "socat": stack.enter_context(socat_relay(iperf_socat)),
                "forward": iperf_local,
                "chain": _socat_chain(stack, iperf_chain, hops=3),
                "relays": relay_chain(stack, iperf_relays, 3, uvloop_relay),
            },
        }
        redis_get(ports["redis"]["forward"], 200)  # warm-up: the first connection pays the rendezvous
        rounds = Rounds(ports)
        _all_rounds(rounds, router.pid, count, requests, seconds)
        return _figures(rounds, requests, seconds)


#: How a baseline path is named in the rows.
BASELINE_NAMES = {"socat": "socat hop", "relays": "3 minimal relays"}


def _socat_chain(stack: ExitStack, target: int, hops: int) -> int:
    """`hops` socat relays in a row in front of `target`, closed with `stack`; the first one's port."""
    port = target
    for _ in range(hops):
        port = stack.enter_context(socat_relay(port))
    return port


def _versions() -> str:
    """redis-benchmark's and iperf3's versions, for the notes."""
    found = []
    for argv in (["redis-benchmark", "--version"], ["iperf3", "--version"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
            found.append(out.splitlines()[0].strip() if out else f"{argv[0]} ?")
        except OSError:
            found.append(f"{argv[0]} missing")
    return "; ".join(found)


def run(quick: bool) -> dict[str, Any]:
    """Every real-client figure (about 4.5 minutes, 60 s with --quick)."""
    count, requests, seconds = (2, 1000, 1.0) if quick else (4, 10000, 2.0)
    figures: list[dict[str, Any]] = []
    notes = [f"real clients: {_versions()}; the forward is plaintext, router/agent/client on loopback"]
    attempt(figures, notes, "real clients", lambda: measure(count, requests, seconds))
    return {"figures": figures, "notes": notes}


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    print(json.dumps(outcome, indent=2))
