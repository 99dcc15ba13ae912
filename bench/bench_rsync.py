"""rsync benchmark: a 1 GiB upload through the router beside a plain local rsync, as a ratio.

    .venv/bin/python -m bench.bench_rsync [--quick] [--rounds N] [--compress]

Both runs copy the same random file (in the page cache) into a fresh destination folder, so both are
whole-file transfers: a local rsync between two folders (one machine, rsync's own pipe between its
processes) and `osmo-net-client rsync FILE :DST` through a real router and agent on loopback (the
local rsync talking to `rsync --server` through client -> router -> agent). The best of N rounds of
each is compared; wall time includes starting the processes. CPU seconds of every process involved
are printed too: on a shared machine they are steadier than wall time. `--quick` uses 256 MiB.
`--compress` also times the router run with `-z`, the figure behind leaving compression off by default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds
from tests.harness import AgentProc, Router, cli_env, client_cmd, metric_value

WORKFLOW = "bench-rsync"
MIB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    """`size` random bytes (incompressible, like most large payloads)."""
    block = 8 * MIB
    with open(path, "wb") as f:
        for offset in range(0, size, block):
            f.write(os.urandom(min(block, size - offset)))


def children_cpu() -> float:
    """CPU seconds used so far by finished child processes (and their own children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run argv to completion; (wall seconds, CPU seconds of it and its children, stdout). Raises on failure."""
    # The previous round's gigabyte is still being written back to disk; flush it first, so neither
    # side is throttled for the other's dirty pages.
    os.sync()
    cpu = children_cpu()
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, env=env, timeout=900)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    return elapsed, children_cpu() - cpu, result.stdout.decode(errors="replace")


def rsync_stats(output: str) -> dict[str, int]:
    """The byte counts of rsync's --stats output."""
    stats = {}
    for key, label in (("literal", "Literal data"), ("sent", "Total bytes sent"), ("received", "Total bytes received")):
        match = re.search(rf"{label}: ([\d,]+)", output)
        if match:
            stats[key] = int(match.group(1).replace(",", ""))
    return stats


def router_bytes(router: Router) -> float:
    """Bytes the router relayed for rsync, both directions."""
    text = router.metrics_text()
    return sum(
        metric_value(text, "router_grpc_bytes_total", {"operation": "rsync", "direction": d})
        for d in ("client_to_agent", "agent_to_client")
    )


def _local_run(src: Path, work: Path, index: int) -> tuple[float, float, str]:
    dest = work / f"local-{index}"
    dest.mkdir()
    try:
        return timed(["rsync", "-a", "--stats", str(src), f"{dest}/"])
    finally:
        shutil.rmtree(dest)


def _router_run(
    src: Path, work: Path, index: int, router: Router, agent: AgentProc, extra: list[str]
) -> tuple[float, float, str, dict[str, float]]:
    """One upload through the router; the CPU figure adds the router's and the agent's (with rsync --server).

    The last item splits the CPU seconds by side: the user's (client and local rsync), the router,
    and the agent (with `rsync --server`).
    """
    dest = work / f"remote-{index}"
    args = ["--router-address", router.address, "--workflow-id", WORKFLOW, "--tls=false"]
    router_cpu, agent_cpu = cpu_seconds(router.pid, children=True), cpu_seconds(agent.pid, children=True)
    try:
        wall, cpu, out = timed(
            client_cmd("rsync", *args, str(src), f":{dest}/", "--", "--stats", *extra), env=cli_env()
        )
        split = {
            "user side": cpu,
            "router": cpu_seconds(router.pid, children=True) - router_cpu,
            "agent side": cpu_seconds(agent.pid, children=True) - agent_cpu,
        }
        return wall, sum(split.values()), out, split
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def run(quick: bool, rounds: int = 3, compress: bool = False) -> dict[str, Any]:
    """Measure and return the figures (sizes in bytes, times in seconds, rates in MiB/s)."""
    size = (256 if quick else 1024) * MIB
    with tempfile.TemporaryDirectory(prefix="bench-rsync-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        make_file(src, size)
        router = Router()
        agent = AgentProc(router.address, WORKFLOW)
        try:
            local_runs, router_runs, stats, splits = [], [], {}, []
            for index in range(rounds):
                # Interleaved, so a burst of load on a shared machine hits both sides alike.
                local_runs.append(_local_run(src, work, index)[:2])
                before = router_bytes(router)
                elapsed, cpu, output, split = _router_run(src, work, index, router, agent, [])
                router_runs.append((elapsed, cpu))
                splits.append(split)
                stats = {**rsync_stats(output), "router_bytes": router_bytes(router) - before}
            compressed = _router_run(src, work, rounds, router, agent, ["-z"])[0] if compress else None
        finally:
            agent.stop()
            router.stop()
    best_local, best_router = min(w for w, _ in local_runs), min(w for w, _ in router_runs)
    local_cpu, router_cpu = min(c for _, c in local_runs), min(c for _, c in router_runs)
    return {
        "size_bytes": size,
        "rounds": rounds,
        "local_seconds": [round(w, 2) for w, _ in local_runs],
        "router_seconds": [round(w, 2) for w, _ in router_runs],
        "local_mib_s": size / MIB / best_local,
        "router_mib_s": size / MIB / best_router,
        "ratio": best_local / best_router,
        "local_cpu_seconds": local_cpu,
        "router_cpu_seconds": router_cpu,
        "router_cpu_split": min(splits, key=lambda split: sum(split.values())),
        "cpu_ratio": local_cpu / router_cpu,
        "router_z_mib_s": size / MIB / compressed if compressed else None,
        "rsync_stats_through_router": stats,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    """Print the figures as text and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side (best is kept)")
    parser.add_argument("--compress", action="store_true", help="also time the router run with -z")
    options = parser.parse_args()
    result = run(options.quick, options.rounds, options.compress)
    size = result["size_bytes"] // MIB
    print(f"rsync upload of {size} MiB, fresh destination (whole file), best of {result['rounds']}:")
    print(f"  local rsync (folder to folder): {result['local_mib_s']:8.1f} MiB/s  {result['local_seconds']}")
    print(f"  through the router:             {result['router_mib_s']:8.1f} MiB/s  {result['router_seconds']}")
    print(f"  ratio router/local:             {result['ratio']:8.2f}x   (target >= 0.5x)")
    print(
        f"  CPU seconds, all processes:     local {result['local_cpu_seconds']:.2f}, "
        f"router path {result['router_cpu_seconds']:.2f} (client, router, agent, both rsyncs): "
        f"{result['cpu_ratio']:.2f}x"
    )
    split = ", ".join(f"{side} {seconds:.2f}" for side, seconds in result["router_cpu_split"].items())
    print(f"  router path CPU by side:        {split}")
    print(f"  load average during the run:    {result['load_average']}")
    if result["router_z_mib_s"]:
        print(f"  through the router with -z:     {result['router_z_mib_s']:8.1f} MiB/s")
    print(f"  rsync --stats / router bytes:   {result['rsync_stats_through_router']}")
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
