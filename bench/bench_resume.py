"""Resumable sessions (issue 17): time to resume after a cut, and the steady-state cost of resume.

    .venv/bin/python -m bench.bench_resume [--quick]

- time to resume: an `exec -- cat` session echoes one byte at a time; the path is cut and the
  time from the cut to the first byte echoed after it is taken, over N cuts (p50/p99):
  - *TCP cut*: a proxy between the client and the router resets both connections (the router and
    the agent stay up: the client reconnects through the proxy, the agent takes the resume);
  - *router kill -9 + restart*: the router is SIGKILLed and started again on the same port at once
    (the figure includes the new router's start-up and the agent's re-registration);
  - *replica loss*: two replicas and Redis, the replica holding the agent is SIGKILLed; the agent
    re-registers with the other one and the client resumes there (both know both addresses).
- steady-state cost: the same transfers with resume (numbering, acks, replay buffers on both ends)
  and with `--resume-grace 0` on both ends, interleaved in one run, as ratios of throughput (goal
  >= 0.95) and of the CPU seconds client, router and agent spend per GiB (goal <= 1.05):
  32 MiB through `exec -- cat` (both directions at once) and a 256 MiB port-forward download
  (1.00 by construction while port-forward does not number its frames: it does once issue 17's
  port-forward part is in).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.bench_exec import transfer_mbps
from bench.bench_forward import download
from bench.common import attempt, cpu_seconds, latency_figures, paired
from bench.cut_proxy import CutProxy
from bench.forward_targets import BulkServer
from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router, cli_env, client_cmd

WAIT = 60.0
ON, OFF = "bench-resume-on", "bench-resume-off"
NO_RESUME = "--resume-grace=0"


class EchoSession:
    """`exec -- cat` driven one byte at a time (stderr to /dev/null: it says when it resumes)."""

    def __init__(self, argv: Sequence[str], stderr: Any = None) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            env=cli_env(),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._out, selectors.EVENT_READ)

    def echo(self, timeout: float = WAIT) -> float:
        """Write one byte; the perf_counter() time its echo came back."""
        os.write(self._in, b"x")
        if not self._selector.select(timeout) or os.read(self._out, 1) != b"x":
            raise RuntimeError(f"no echo within {timeout:g}s")
        return time.perf_counter()

    def close(self) -> None:
        """End the session (stdin EOF), bounded."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._selector.close()


def resume_after_tcp_cuts(rounds: int) -> list[float]:
    """Microseconds from a proxy's reset of the client's connection to the first byte echoed after it."""
    router = Router()
    agent = AgentProc(router.address, ON)
    samples: list[float] = []
    try:
        with CutProxy(router.port) as proxy:
            session = EchoSession(exec_argv(f"127.0.0.1:{proxy.port}", ON))
            try:
                for _ in range(20):
                    session.echo()
                for _ in range(rounds):
                    cut = time.perf_counter()
                    proxy.cut()
                    samples.append((session.echo() - cut) * 1e6)
                    for _ in range(5):  # settled before the next cut
                        session.echo()
            finally:
                session.close()
    finally:
        agent.stop()
        router.stop()
    return samples


def resume_after_router_restarts(rounds: int) -> list[float]:
    """Microseconds from a router's SIGKILL (restarted at once, same port) to the first byte echoed after it."""
    router = Router()
    port = router.port
    agent = AgentProc(router.address, ON)
    samples: list[float] = []
    try:
        session = EchoSession(exec_argv(router.address, ON))
        try:
            session.echo()
            for _ in range(rounds):
                cut = time.perf_counter()
                router.signal(signal.SIGKILL)
                router.wait_exit()
                router.stop()
                router = Router("--port", str(port))
                samples.append((session.echo() - cut) * 1e6)
                agent.wait_for(lambda r, rid=router.router_id: r.get("router_id") == rid)
        finally:
            session.close()
    finally:
        agent.stop()
        router.stop()
    return samples


def resume_after_replica_loss(rounds: int) -> list[float]:
    """Microseconds from the SIGKILL of the replica holding the agent (two replicas, Redis) to the next echo.

    The client and the agent know both replicas; the client's stream goes through the other one
    or through the lost one, as the previous round left it. The lost replica is started again on
    its port after the measurement (the next round kills the agent's new replica).
    """
    from tests.redis_harness import RedisServer

    redis = RedisServer()
    args = ("--redis-url", redis.url, "--directory-ttl=60s")
    routers = [Router(*args), Router(*args)]
    agent = AgentProc(f"{routers[0].address},{routers[1].address}", ON)
    samples: list[float] = []
    try:
        session = EchoSession(exec_argv(f"{routers[1].address},{routers[0].address}", ON))
        try:
            session.echo()
            holder = 0
            for _ in range(rounds):
                lost, survivor = routers[holder], routers[1 - holder]
                cut = time.perf_counter()
                lost.signal(signal.SIGKILL)
                lost.wait_exit()
                samples.append((session.echo() - cut) * 1e6)
                agent.wait_for(lambda r, rid=survivor.router_id: r.get("router_id") == rid)
                lost.stop()
                routers[holder] = Router(*args, "--port", str(lost.port))
                holder = 1 - holder
        finally:
            session.close()
    finally:
        agent.stop()
        for router in routers:
            router.stop()
        redis.stop()
    return samples


def exec_argv(address: str, workflow: str, *extra: str) -> list[str]:
    """`osmo-net-client exec ... -- cat`."""
    dial = ["--router-address", address, "--workflow-id", workflow, "--tls=false", *extra]
    return [*client_cmd("exec", *dial), "--", "cat"]


def steady_state(repeats: int, blob_mib: int, forward_mib: int) -> list[dict[str, Any]]:
    """exec and forward with resume on and off (both ends), interleaved: throughput and CPU per GiB.

    CPU is the sum over the client, the router and the agent (not `cat`): on a shared machine it
    varies far less than wall-clock throughput.
    """
    router = Router()
    agents = {ON: AgentProc(router.address, ON), OFF: AgentProc(router.address, OFF, NO_RESUME)}
    blob = os.urandom(blob_mib << 20)
    total = forward_mib << 20
    runs: dict[str, list[float]] = {}
    forwards: dict[str, Any] = {}
    try:
        with BulkServer(total) as target:
            for workflow, extra in ((ON, ()), (OFF, (NO_RESUME,))):
                dial = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", *extra]
                forwards[workflow] = start_forward(dial, f":{target.port}")
            sides = ((ON, (), "on"), (OFF, (NO_RESUME,), "off"))
            for repeat in range(repeats):
                # The order alternates: the second transfer of a pair runs on a warmer machine.
                for workflow, extra, side in sides if repeat % 2 == 0 else reversed(sides):
                    pids = [router.pid, agents[workflow].pid]
                    argv = exec_argv(router.address, workflow, *extra)
                    rate, cpu = _measured(pids, lambda argv=argv: transfer_mbps(argv, blob))
                    runs.setdefault(f"exec_{side}", []).append(rate)
                    runs.setdefault(f"exec_cpu_{side}", []).append(cpu / (2 * len(blob)) * (1 << 30))
                    proc, (port,) = forwards[workflow]
                    seconds, cpu = _measured([*pids, proc.pid], lambda port=port: download(port, total))
                    runs.setdefault(f"fwd_{side}", []).append(total / (1 << 20) / seconds)
                    runs.setdefault(f"fwd_cpu_{side}", []).append(cpu / total * (1 << 30))
    finally:
        for proc, _ports in forwards.values():
            proc.stop()
        for agent in agents.values():
            agent.stop()
        router.stop()
    note = f"{repeats} interleaved runs each"
    faster, cheaper = {"ratio_at_least": 0.95}, {"ratio_at_most": 1.05}
    exec_name, forward_name = f"exec {blob_mib} MiB through cat", f"forward download {forward_mib} MiB"
    return [
        paired(f"{exec_name}, resume on", "MB/s", runs["exec_on"], runs["exec_off"], "resume off", faster, note),
        paired(
            f"{exec_name}, CPU per GiB moved, resume on",
            "s",
            runs["exec_cpu_on"],
            runs["exec_cpu_off"],
            "resume off",
            cheaper,
            "client + router + agent; both directions count",
        ),
        paired(f"{forward_name}, resume on", "MiB/s", runs["fwd_on"], runs["fwd_off"], "resume off", faster, note),
        paired(
            f"{forward_name}, CPU per GiB, resume on",
            "s",
            runs["fwd_cpu_on"],
            runs["fwd_cpu_off"],
            "resume off",
            cheaper,
            "client + router + agent",
        ),
    ]


def _measured(pids: list[int], work: Callable[[], float]) -> tuple[float, float]:
    """`work()`'s result and the CPU seconds `pids` and this process's waited-for children spent meanwhile."""

    def now() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime + sum(cpu_seconds(pid) for pid in pids)

    before = now()
    result = work()
    return result, now() - before


def run(quick: bool) -> dict[str, Any]:
    """Every resume figure."""
    figures: list[dict[str, Any]] = []
    notes = [
        "time to resume: from the cut to the first byte echoed through `exec -- cat` after it",
        "steady-state: resume on vs --resume-grace 0 on the client and the agent, same router, interleaved",
    ]
    cuts, restarts = (20, 3) if quick else (50, 10)
    attempt(
        figures,
        notes,
        "resume after TCP cuts",
        lambda: latency_figures("resume after a TCP cut", resume_after_tcp_cuts(cuts), None, "", None),
    )
    attempt(
        figures,
        notes,
        "resume after router restarts",
        lambda: latency_figures(
            "resume after router kill -9 + restart", resume_after_router_restarts(restarts), None, "", None
        ),
    )
    attempt(
        figures,
        notes,
        "resume after replica loss",
        lambda: latency_figures(
            "resume after the loss of the agent's replica (scale-out)",
            resume_after_replica_loss(restarts),
            None,
            "",
            None,
        ),
    )
    # Transfers long enough that CPU read in 10 ms ticks (/proc/PID/stat) is ~1% of each, an even
    # count of pairs so each side goes first as often (the rows sat inside their tick noise before).
    sizes = (2, 32, 64) if quick else (6, 128, 1024)
    attempt(figures, notes, "steady-state cost", lambda: steady_state(*sizes))
    return {"figures": figures, "notes": notes}


def main() -> None:
    """Run and print the figures as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(args.quick)
    for fig in result["figures"]:
        print(json.dumps({k: fig[k] for k in ("name", "value", "unit", "baseline", "ratio", "runs", "baseline_runs")}))
    for note in result["notes"]:
        print("#", note)


if __name__ == "__main__":
    main()
