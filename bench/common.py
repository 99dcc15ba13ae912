"""What every benchmark module shares: the figure format, statistics, and running the load generator.

A benchmark module `bench/bench_NAME.py` exposes `run(quick: bool) -> dict` returning
`{"figures": [figure(...), ...], "notes": [...]}`; `bench.run` collects them into one table.
Each figure carries its value, the baseline measured in the same run (if any), the ratio and
the target it is held to.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.harness starts the router and agent processes
    sys.path.insert(0, str(ROOT))

#: Sessions (or connections, for socat) that the throughput runs drive at once.
THROUGHPUT_SESSIONS = 8


def figure(
    name: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str = "",
    ratio: float | None = None,
    target: dict[str, float] | None = None,
    runs: Sequence[float] = (),
    baseline_runs: Sequence[float] = (),
    note: str = "",
) -> dict[str, Any]:
    """One row of the results table.

    `target` is one of {"at_least": X}, {"at_most": X} (on the value) or {"ratio_at_least": X},
    {"ratio_at_most": X} (on value / baseline). `ratio` defaults to value / baseline.
    """
    if ratio is None and baseline:
        ratio = value / baseline
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ratio,
        "target": target or {},
        "runs": list(runs),
        "baseline_runs": list(baseline_runs),
        "note": note,
    }


def attempt(
    figures: list[dict[str, Any]], notes: list[str], label: str, part: Callable[[], list[dict[str, Any]]]
) -> None:
    """Run one part of a benchmark; a failure becomes a note, and the other parts still run."""
    try:
        figures.extend(part())
    except Exception as err:
        traceback.print_exc()
        notes.append(f"{label} FAILED: {err!r}"[:600])


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, -(-len(ordered) * q // 100))
    return float(ordered[int(rank) - 1])


def median(values: Sequence[float]) -> float:
    """The median."""
    return float(statistics.median(values))


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the processes a benchmark starts: the repo importable, no proxies."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def loadgen(mode: str, *args: str, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Run the load generator in a process of its own; its JSON result lines."""
    argv = [sys.executable, "-m", "bench.loadgen", mode, *args]
    proc = subprocess.run(argv, cwd=ROOT, env=bench_env(), capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.startswith("{")]


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds a live process has used so far (with its waited-for children if asked)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11 : 15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def latency_figures(
    name: str, samples: Sequence[float], baseline: Sequence[float] | None, baseline_name: str, p99_max: float | None
) -> list[dict[str, Any]]:
    """p50 and p99 figures (microseconds) of one latency measurement, beside a baseline's."""
    out = []
    for q in (50, 99):
        base = percentile(baseline, q) if baseline else None
        target = {"at_most": p99_max} if (q == 99 and p99_max is not None) else None
        out.append(
            figure(
                f"{name} p{q}",
                percentile(samples, q),
                "us",
                baseline=base,
                baseline_name=baseline_name,
                target=target,
                note=f"{len(samples)} rounds",
            )
        )
    return out


def sliced_latency_figures(
    name: str,
    slices: Sequence[Sequence[float]],
    baseline_slices: Sequence[Sequence[float]],
    baseline_name: str,
    p99_max: float | None = None,
) -> list[dict[str, Any]]:
    """p50 and p99 figures (microseconds) as medians over interleaved slices, beside a baseline's.

    Why not one percentile of all samples pooled: a p99 of 2,000 round trips is its 20 slowest, and
    one stall of the machine in one slice (another process scheduled on the 2 cores) sets it, for
    either path; it read 0.44x-1.51x the baseline in three runs of one day. The median of the slices'
    own p99s is the tail a user meets in most slices; the pooled figures stay in the note.
    """
    out = []
    for q in (50, 99):
        runs = [percentile(one, q) for one in slices]
        baseline_runs = [percentile(one, q) for one in baseline_slices]
        pooled = percentile([s for one in slices for s in one], q)
        pooled_base = percentile([s for one in baseline_slices for s in one], q)
        note = (
            f"median of {len(slices)} interleaved slices of {len(slices[0])} rounds;"
            f" pooled p{q} {pooled:.0f} vs {pooled_base:.0f} ({pooled / pooled_base:.2f}x)"
        )
        out.append(
            figure(
                f"{name} p{q}",
                median(runs),
                "us",
                baseline=median(baseline_runs),
                baseline_name=baseline_name,
                runs=runs,
                baseline_runs=baseline_runs,
                target={"at_most": p99_max} if (q == 99 and p99_max is not None) else None,
                note=note,
            )
        )
    return out


def paired(
    name: str,
    unit: str,
    runs: Sequence[float],
    baseline_runs: Sequence[float],
    baseline_name: str,
    target: dict[str, float] | None,
    note: str = "",
) -> dict[str, Any]:
    """A figure from runs interleaved with baseline runs: medians, and the median of per-pair ratios."""
    ratios = [r / b for r, b in zip(runs, baseline_runs, strict=True) if b]
    return figure(
        name,
        median(runs),
        unit,
        baseline=median(baseline_runs),
        baseline_name=baseline_name,
        ratio=median(ratios) if ratios else None,
        target=target,
        runs=runs,
        baseline_runs=baseline_runs,
        note=note,
    )
