"""The three-process floor with zero-copy relays: iperf3 and redis through splice(2) hops (issue 18).

`hop_floor` found that three relays that only copy bytes reach about 0.45x (-P 8) and 0.6x (-P 1) of
one socat hop for iperf3: each process copies every byte twice (socket -> user space -> socket). This
measures, interleaved round by round with one socat hop (the issue's baseline), what three relays
reach that keep the bytes in the kernel (`splice_relay`: socket -> pipe -> socket), and what framing
costs them:

- `socat x3`: three socat hops in a row;
- `uvloop x3`: three minimal read/write Python relays (bench/copy_relay.py's `MinimalRelay`);
- `splice x3`: three splice relays;
- `framed x3`: three splice relays that frame the middle links as our HTTP/2 path would: the first hop
  (the CLI's place) sends a 20-byte header (`send`) before each chunk of up to --chunk bytes it splices,
  the second (the router's) reads each header (`recv`), sends a new one and splices the payload through,
  the third (the agent's) reads the header and splices the payload to the target;
- `framed128 x3`: the same with frames of at most 128 KiB;
- `mixed x3`: read/write relays at the ends (where resume's replay buffer needs the bytes in user space)
  and a splice relay in the middle (the router's place).

Before measuring, each Python chain is checked end to end (bytes both ways, half-close at EOF).

    .venv/bin/python -m bench.experiments.splice_floor [--rounds 3] [--seconds 3] [--requests 10000] [--no-redis]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import statistics
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack

from bench.bench_forward import socat_relay
from bench.bench_real_clients import Rounds, iperf3_rate, iperf3_server, redis_get, redis_server
from bench.common import cpu_seconds
from bench.copy_relay import relay_chain, uvloop_relay

BASELINE = "socat x1"
#: The bytes the end-to-end check sends each way.
CHECK_BYTES = 24 << 20
Relay = Callable[[int, int, int], list[str]] | None


def splice_relay(framed: bool, chunk: int) -> Callable[[int, int, int], list[str]]:
    """Argv of the splice relays of a three-hop chain; framed: the links between them carry frames."""

    def argv(listen: int, target: int, hop: int) -> list[str]:
        out = [sys.executable, "-m", "bench.experiments.splice_relay", str(listen), str(target), "--chunk", str(chunk)]
        if framed:
            out += ["--framed-listen"] if hop < 2 else []  # hops 0 and 1 are reached over a framed link
            out += ["--framed-target"] if hop > 0 else []  # hops 1 and 2 reach the next over one
        return out

    return argv


def _mixed(listen: int, target: int, hop: int) -> list[str]:
    """Copying ends (MinimalRelay) around a splice relay in the middle: the router's place, the one hop
    without a replay buffer to fill."""
    return splice_relay(False, SMALL_CHUNK)(listen, target, hop) if hop == 1 else uvloop_relay(listen, target, hop)


def _check_server() -> tuple[int, Callable[[], None]]:
    """A target that reads each connection to EOF, answers its sha256 and CHECK_BYTES of a known pattern,
    then closes it; its port and a stop function."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # wait_listening's probes hang up at once
            digest = hashlib.sha256()
            while data := conn.recv(1 << 20):
                digest.update(data)
            conn.sendall(digest.digest() + _pattern())

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1]), listener.close


def _pattern() -> bytes:
    return bytes(range(251)) * (CHECK_BYTES // 251)


def check_chain(port: int) -> None:
    """Send random bytes through the chain, end them, and check what comes back; raises if wrong."""
    payload = os.urandom(CHECK_BYTES)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while data := sock.recv(1 << 20):
            got += data
        sender.join(30)
    if bytes(got) != hashlib.sha256(payload).digest() + _pattern():
        raise RuntimeError(f"chain on port {port} corrupted the stream ({len(got)} bytes back)")


PATHS = (BASELINE, "socat x3", "uvloop x3", "splice x3", "framed x3", "framed128 x3", "mixed x3")
#: The payload per frame of the "framed128" chain: 128 KiB, our bulk path's smaller message size.
SMALL_CHUNK = 128 << 10


def _paths(stack: ExitStack, targets: dict[str, int], chunk: int, pids: dict[int, list[int]]) -> dict[str, int]:
    """Every path, each to its target (`targets`: path -> port): path -> the port clients connect to;
    `pids` gets each Python chain's relay processes by that port."""
    chains: dict[str, Relay] = {
        "socat x3": None,
        "uvloop x3": uvloop_relay,
        "splice x3": splice_relay(False, chunk),
        "framed x3": splice_relay(True, chunk),
        "framed128 x3": splice_relay(True, SMALL_CHUNK),
        "mixed x3": _mixed,
    }
    ports = {BASELINE: stack.enter_context(socat_relay(targets[BASELINE]))}
    for name, relay in chains.items():
        procs: list[int] = []
        ports[name] = relay_chain(stack, targets[name], 3, relay, procs)
        pids[ports[name]] = procs
    return ports


def _with_cpu(
    pids: dict[int, list[int]], run: Callable[[int], float], per: Callable[[float], float]
) -> Callable[[int], tuple[float, float]]:
    """`run(port)` and the CPU seconds its path's relay processes spent, divided by `per(value)`."""

    def measured(port: int) -> tuple[float, float]:
        procs = pids.get(port, [])
        before = sum(cpu_seconds(pid) for pid in procs)
        value = run(port)
        return value, (sum(cpu_seconds(pid) for pid in procs) - before) / per(value)

    return measured


def _report(rounds: Rounds, cases: list[tuple[str, str, str]]) -> None:
    for case, unit, cpu_unit in cases:
        slot, cpu = rounds.values[case], rounds.values[f"{case}_cpu"]
        print(f"\n{case}")
        for path, runs in slot.items():
            ratios = [r / b for r, b in zip(runs, slot[BASELINE], strict=True)]
            cost = f"  relays' CPU {statistics.median(cpu[path]):7.2f} {cpu_unit}" if cpu[path][0] else ""
            shown = ", ".join(f"{r:.0f}" for r in runs)
            print(
                f"  {path:10} {statistics.median(runs):8.0f} {unit}  {statistics.median(ratios):.2f}x  [{shown}]{cost}"
            )


def main() -> None:
    """Check the chains, measure every path round by round (order reversed every other round), report."""
    parser = argparse.ArgumentParser(prog="bench.experiments.splice_floor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each iperf3 run")
    parser.add_argument("--requests", type=int, default=10000, help="GETs per redis-benchmark run")
    parser.add_argument("--chunk", type=int, default=1 << 20, help="largest framed payload (bytes)")
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    pids: dict[int, list[int]] = {}
    with ExitStack() as stack:
        check_port, stop = _check_server()
        stack.callback(stop)
        with ExitStack() as checks:
            for name, port in _paths(checks, dict.fromkeys(PATHS, check_port), args.chunk, {}).items():
                if name not in (BASELINE, "socat x3"):
                    check_chain(port)
                    print(f"{name}: stream intact both ways, EOF passed", flush=True)
        # one iperf3 server per path: a server takes one test at a time and is briefly busy after it
        iperf = {name: stack.enter_context(iperf3_server()) for name in PATHS}
        ports = {"iperf3": _paths(stack, iperf, args.chunk, pids)}
        if not args.no_redis:
            ports["redis"] = _paths(stack, dict.fromkeys(PATHS, stack.enter_context(redis_server())), args.chunk, pids)
        rounds = Rounds(ports)
        cases = []
        for rnd in range(args.rounds):
            if not args.no_redis:
                run = _with_cpu(pids, lambda port: redis_get(port, args.requests)[0], lambda _v: args.requests / 1e6)
                rounds.measure(("redis GET -c 1", "redis GET -c 1_cpu"), "redis", rnd, run)
            for streams in (1, 8):
                for reverse in (False, True):
                    case = f"iperf3 -P {streams} {'down (-R)' if reverse else 'up'}"
                    rate = lambda port, s=streams, r=reverse: iperf3_rate(port, s, r, args.seconds)  # noqa: E731
                    run = _with_cpu(pids, rate, lambda mb: mb * args.seconds / 1000)  # MB/s -> GB moved
                    rounds.measure((case, f"{case}_cpu"), "iperf3", rnd, run)
                    if rnd == 0:
                        cases.append((case, "MB/s", "s/GB"))
            print(f"round {rnd + 1} done; load {os.getloadavg()[0]:.2f}", flush=True)
        if not args.no_redis:
            cases.insert(0, ("redis GET -c 1", "GET/s", "us/GET"))
        _report(rounds, cases)


if __name__ == "__main__":
    main()
