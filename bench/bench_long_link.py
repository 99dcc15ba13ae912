"""Bulk throughput over a long link: the native HTTP/2 windows against grpc's, in one interleaved run.

A fixed HTTP/2 stream window caps one stream at window / round trip; grpc sizes its windows to the
bandwidth-delay product, and so does the native stack since h2/bdp.py (issue 18: "without losing
bulk throughput (BDP-sized windows on long links)"). Each path below crosses the same kind of user-
space delay link (tests/delay_link.py; 20 ms each way, 40 ms round trip; no netem on this kernel):

- direct: the bulk target through a delay link, no router (the link's own ceiling, the baseline);
- native: `port-forward` whose client reaches the router through a delay link, router on
  `--grpc-server native`, client and agent on the native channel (the defaults);
- grpcio: the same with `--grpc-server grpcio` and the grpcio channel (grpc's BDP probing).

One TCP connection per transfer, download (target -> local) and upload; rounds alternate the order
of the paths. Figures: medians of MiB/s; the native / grpcio ratio is held to >= 0.9.

    .venv/bin/python -m bench.bench_long_link [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bench.bench_forward import ROUTER_FLAGS, download, upload
from bench.common import attempt, bench_env, median, paired
from bench.forward_targets import BulkServer
from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router

ONE_WAY_MS = 20
NATIVE_OVER_GRPCIO_MIN = 0.9
WORKFLOW = "bench-long-link"
Transfer = Callable[[int, int], float]


@contextmanager
def delay_link(target_port: int) -> Iterator[int]:
    """A delay link (its own process) to 127.0.0.1:target_port; yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.delay_link", f"--target=127.0.0.1:{target_port}", f"--delay-ms={ONE_WAY_MS}"],
        stdout=subprocess.PIPE,
        text=True,
        env=bench_env(),
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline().split()[1])
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def forward_over_link(stack: str, target_port: int, stack_exit: ExitStack) -> Iterator[int]:
    """Router + agent of `stack` (native or grpcio), a port-forward whose client crosses a delay link."""
    router = Router(*ROUTER_FLAGS, "--grpc-server", stack)
    stack_exit.callback(router.stop)
    agent = AgentProc(router.address, WORKFLOW, "--grpc-channel", stack)
    stack_exit.callback(agent.stop)
    link = stack_exit.enter_context(delay_link(router.port))
    args = ["--router-address", f"127.0.0.1:{link}", "--workflow-id", WORKFLOW, "--tls=false", "--grpc-channel", stack]
    proc, (local,) = start_forward(args, f":{target_port}")
    stack_exit.callback(proc.stop)
    yield local


def measure(rounds: int, total: int) -> list[dict[str, Any]]:
    """Interleaved rounds over the three paths; the figures."""
    rates: dict[tuple[str, str], list[float]] = {}
    with ExitStack() as stack_exit:
        target = stack_exit.enter_context(BulkServer(total))
        ports = {"direct": stack_exit.enter_context(delay_link(target.port))}
        for stack in ("native", "grpcio"):
            ports[stack] = stack_exit.enter_context(forward_over_link(stack, target.port, stack_exit))
        ways: tuple[tuple[str, Transfer], ...] = (("download", download), ("upload", upload))
        for _, transfer in ways:  # a first transfer on each path sizes its windows, as on a live link
            for port in ports.values():
                transfer(port, total)
        paths = list(ports)
        for i in range(rounds):
            for path in paths[i % len(paths) :] + paths[: i % len(paths)]:
                for name, transfer in ways:
                    rates.setdefault((path, name), []).append(total / (1 << 20) / transfer(ports[path], total))
    figures = []
    for name, _ in ways:
        native, grpcio, direct = rates[("native", name)], rates[("grpcio", name)], rates[("direct", name)]
        figures.append(
            paired(
                f"long link {2 * ONE_WAY_MS} ms, {name}: native",
                "MiB/s",
                native,
                grpcio,
                "grpcio stack",
                {"ratio_at_least": NATIVE_OVER_GRPCIO_MIN},
                note=f"direct through the link: {median(direct):.0f} MiB/s",
            )
        )
        label = f"long link {2 * ONE_WAY_MS} ms, {name}: grpcio"
        figures.append(paired(label, "MiB/s", grpcio, direct, "direct", None))
    return figures


def run(quick: bool) -> dict[str, Any]:
    """Every long-link figure (about 1.5 minutes, 40 s with --quick)."""
    rounds, total = (2, 64 << 20) if quick else (4, 128 << 20)
    figures: list[dict[str, Any]] = []
    notes = [f"one-way delay {ONE_WAY_MS} ms in a user-space relay (tests/delay_link.py), plaintext, loopback"]
    attempt(figures, notes, "long link", lambda: measure(rounds, total))
    return {"figures": figures, "notes": notes}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
