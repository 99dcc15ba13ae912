"""Scale-out figures: a session relayed through a second replica, beside the same session on one replica.

Two router replicas share a real redis-server; the agent registers with replica A. The baseline
dials A (same replica); the measured path dials B, which relays to A over RouterPeerService.
Both run in the same process, on the same machine, alternately, so machine load hits both alike:

- exec echo: 1 byte written to `osmo-net-client exec -- cat` and read back, p50 and p99;
- exec throughput: 32 MiB through `exec -- cat` once the session is up;
- TCP forward throughput: 64 MiB through `osmo-net-client port-forward` into a local sink
  (only once port-forward is in the tree).

Run: `.venv/bin/python -m bench.bench_scaleout [--quick]`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.harness starts the router and agent processes
    sys.path.insert(0, str(ROOT))

from bench.bench_exec import Piped, transfer_mbps  # noqa: E402
from tests.harness import AgentProc, Proc, Router, client_cmd  # noqa: E402
from tests.redis_harness import RedisServer  # noqa: E402

WORKFLOW = "bench-scaleout"
WAIT = 60.0


def run(quick: bool) -> dict[str, Any]:
    """Every scale-out figure, as {"figures": [...], "notes": [...]}."""
    rounds = 500 if quick else 2000
    repeats = 1 if quick else 3
    figures: list[dict[str, Any]] = []
    notes = ["baseline: the same session on the agent's own replica; measured: through a second replica"]
    redis_server = RedisServer()
    procs: list[Proc] = []
    try:
        a = Router("--redis-url", redis_server.url)
        procs.append(a)
        b = Router("--redis-url", redis_server.url)
        procs.append(b)
        procs.append(AgentProc(a.address, WORKFLOW))
        same, cross = _exec_argv(a), _exec_argv(b)
        _attempt(figures, notes, "exec echo", lambda: _echo(same, cross, rounds))
        _attempt(figures, notes, "exec throughput", lambda: _exec_throughput(same, cross, repeats))
        if _placeholder("osmo_router.client.forward"):
            notes.append("TCP forward throughput: skipped, port-forward is not in this tree yet")
        else:
            _attempt(figures, notes, "forward throughput", lambda: _forward_throughput(a, b, repeats))
    finally:
        for proc in reversed(procs):
            proc.stop()
        redis_server.stop()
    return {"figures": figures, "notes": notes}


def figure(name: str, unit: str, value: float, baseline: float, runs: Sequence[float] = ()) -> dict[str, Any]:
    """One row: the cross-replica value beside the same-replica baseline."""
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_name": "same replica",
        "ratio": value / baseline if baseline else None,
        "target": {},
        "runs": list(runs),
        "note": "",
    }


def _attempt(figures: list[dict[str, Any]], notes: list[str], label: str, part: Callable[[], list[Any]]) -> None:
    try:
        figures.extend(part())
    except Exception as err:
        notes.append(f"{label} FAILED: {err!r}"[:600])


def _placeholder(module: str) -> bool:
    return "placeholder" in (importlib.import_module(module).__doc__ or "").lower()


def _exec_argv(router: Router) -> list[str]:
    return client_cmd("exec", "--router-address", router.address, "--workflow-id", WORKFLOW, "--tls=false", "--", "cat")


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile."""
    ordered = sorted(samples)
    return float(ordered[max(1, -(-len(ordered) * int(q) // 100)) - 1])


def _echo(same: list[str], cross: list[str], rounds: int) -> list[dict[str, Any]]:
    """Both sessions open at once; rounds alternate between them."""
    sessions = [Piped(same), Piped(cross)]
    samples: list[list[float]] = [[], []]
    try:
        for piped in sessions:
            for _ in range(20):  # the first byte waits for the session; then warm up
                piped.echo()
        for _ in range(rounds):
            for index, piped in enumerate(sessions):
                samples[index].append(piped.echo() * 1e6)
    finally:
        for piped in sessions:
            piped.close()
    return [figure(f"exec echo 1 B p{q}", "us", percentile(samples[1], q), percentile(samples[0], q)) for q in (50, 99)]


def _exec_throughput(same: list[str], cross: list[str], repeats: int) -> list[dict[str, Any]]:
    blob = os.urandom(32 * 1024 * 1024)
    same_runs: list[float] = []
    cross_runs: list[float] = []
    for i in range(repeats):
        order = ((same, same_runs), (cross, cross_runs))
        for argv, runs in order if i % 2 == 0 else reversed(order):
            runs.append(transfer_mbps(argv, blob))
    measured, baseline = statistics.median(cross_runs), statistics.median(same_runs)
    return [figure("exec 32 MiB through cat", "MB/s", measured, baseline, cross_runs)]


def _forward_throughput(a: Router, b: Router, repeats: int) -> list[dict[str, Any]]:
    size = 64 * 1024 * 1024
    with socket.create_server(("127.0.0.1", 0)) as sink:
        threading.Thread(target=_sink, args=(sink,), daemon=True).start()
        port = sink.getsockname()[1]
        same_runs: list[float] = []
        cross_runs: list[float] = []
        for i in range(repeats):
            order = ((a, same_runs), (b, cross_runs))
            for router, runs in order if i % 2 == 0 else reversed(order):
                runs.append(_forward_mbps(router, port, size))
    measured, baseline = statistics.median(cross_runs), statistics.median(same_runs)
    return [figure("TCP forward 64 MiB", "MB/s", measured, baseline, cross_runs)]


def _sink(server: socket.socket) -> None:
    """Count each connection's bytes until EOF, answer with the count."""
    while True:
        conn, _ = server.accept()
        with conn:
            total = 0
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(str(total).encode())


def _forward_mbps(router: Router, remote_port: int, size: int) -> float:
    argv = client_cmd(
        "port-forward", "--router-address", router.address, "--workflow-id", WORKFLOW, "--tls=false", f":{remote_port}"
    )
    forward = Proc(argv)
    try:
        line = forward.wait_for(lambda r: "Forwarding from" in r.get("line", ""), stdout=True)["line"]
        match = re.search(r"127\.0\.0\.1:(\d+) ->", line)
        if match is None:
            raise RuntimeError(f"unexpected port-forward output: {line!r}")
        chunk = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=WAIT) as conn:
            started = time.perf_counter()
            for _ in range(size // len(chunk)):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            answer = b"".join(iter(lambda: conn.recv(64), b""))
            elapsed = time.perf_counter() - started
        if int(answer or b"0") != size:
            raise RuntimeError(f"the sink counted {answer!r} bytes, not {size}")
        return size / elapsed / 1e6
    finally:
        forward.stop()


def table(result: dict[str, Any]) -> str:
    """The figures as a text table with ratios."""
    rows = [("figure", "same replica", "cross replica", "ratio")]
    for f in result["figures"]:
        unit = f["unit"]
        rows.append((f["name"], f"{f['baseline']:.1f} {unit}", f"{f['value']:.1f} {unit}", f"{f['ratio']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, *(f"note: {n}" for n in result["notes"])])


def main() -> None:
    """Run and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_scaleout", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 echo rounds and one transfer each")
    print(table(run(parser.parse_args().quick)))


if __name__ == "__main__":
    main()
