"""Run every benchmark module present and report: `python -m bench.run [--quick] [--only NAME] [--publish]`.

Each `bench/bench_*.py` exposes `run(quick: bool) -> dict` (see bench/common.py for the figure
format). Modules that are not there yet are skipped with a note; a module that fails is reported
and the others still run. Results go to bench/results/ (results.json, RESULTS.md, chart.png);
`--publish` copies RESULTS.md and chart.png to docs/bench/ for the README; with `--only`, the
modules run replace their rows in the published table and the others' rows stay (each re-run
module's notes say when, at which commit and under which load it was measured).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
import traceback
from typing import Any

from bench import report
from bench.common import ROOT
from bench.machine import machine_info

#: Every benchmark the suite knows of, in the order they run; more bench_*.py files are picked up too.
KNOWN = ("bench_relay", "bench_exec", "bench_forward", "bench_rsync", "bench_scaleout", "bench_ws", "bench_grpc_vs_ws",
         "bench_real_clients", "bench_long_link")  # fmt: skip
RESULTS = ROOT / "bench" / "results"
PUBLISHED = ROOT / "docs" / "bench"


def discover() -> list[str]:
    """Names of the known benchmark modules followed by any other bench_*.py present."""
    present = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))
    return [*KNOWN, *(name for name in present if name not in KNOWN)]


def run_module(name: str, quick: bool) -> dict[str, Any]:
    """Import and run one benchmark module; a missing or failing module gives a record saying so."""
    if not (ROOT / "bench" / f"{name}.py").exists():
        return {"module": name, "status": "skipped", "reason": "not present", "figures": []}
    started = time.monotonic()
    try:
        module = importlib.import_module(f"bench.{name}")
        result = module.run(quick)
    except Exception as err:
        traceback.print_exc()
        return {"module": name, "status": "failed", "reason": repr(err)[:500], "figures": []}
    record = report.normalise(name, result)
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    """Run, print, write; exit status 1 if a module failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (a minute or two)")
    parser.add_argument("--only", action="append", default=[], help="run only this module (relay, exec, ...)")
    parser.add_argument("--publish", action="store_true", help="copy RESULTS.md and chart.png to docs/bench/")
    parser.add_argument("--render", action="store_true", help="only redraw the table and chart from results.json")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads((RESULTS / "results.json").read_text())
        for i, module in enumerate(results["modules"]):
            if "raw" in module:  # re-read modules' own dicts with the current adapters
                results["modules"][i] = {**report.normalise(module["module"], module["raw"]), **{
                    k: v for k, v in module.items() if k in ("seconds",)}}  # fmt: skip
        return _write(results, args.publish)
    wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
    names = [n for n in discover() if not wanted or n in wanted]
    if wanted - set(discover()):
        parser.error(f"no such benchmark: {', '.join(sorted(wanted - set(discover())))}")
    info = machine_info()
    modules = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        modules.append(run_module(name, args.quick))
    info["load_average_end"] = machine_info()["load_average_start"]
    results = {"machine": info, "quick": args.quick, "modules": modules}
    if args.publish and wanted and (PUBLISHED / "results.json").exists():
        results = merge(json.loads((PUBLISHED / "results.json").read_text()), results)
    return _write(results, args.publish)


def merge(published: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """The published results with the modules of a partial run (`--only`) replaced or added.

    The table keeps the published run's header (machine, date, commit); each fresh module gets a
    note with its own date, commit, machine and load, since they may differ from the rest of the table's.
    """
    m = fresh["machine"]
    stamp = (
        f"measured {m['date']}, commit {m['commit']}{' (--quick)' if fresh['quick'] else ''}, "
        f"on {m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, "
        f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end"
    )
    modules = list(published["modules"])
    for module in fresh["modules"]:
        module = {**module, "notes": [stamp, *module.get("notes", [])]}
        names = [old["module"] for old in modules]
        if module["module"] in names:
            modules[names.index(module["module"])] = module
        else:
            modules.append(module)
    fresh_names = {module["module"] for module in fresh["modules"]}
    updated = [entry for entry in published.get("updated", []) if entry["module"] not in fresh_names]
    updated += [{"module": module["module"], "note": stamp} for module in fresh["modules"]]
    return {**published, "modules": modules, "updated": updated}


def _write(results: dict[str, Any], publish: bool) -> int:
    """results.json, RESULTS.md, chart.png (and their copies in docs/bench/); the exit status."""
    modules = results["modules"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = report.markdown(results)
    (RESULTS / "RESULTS.md").write_text(markdown)
    print(report.text_table(results))
    try:
        report.chart(results, RESULTS / "chart.png")
    except Exception as err:  # a chart failure must not lose the figures
        print(f"chart not drawn: {err!r}", file=sys.stderr)
    print(f"\nwritten: {RESULTS}/results.json, RESULTS.md, chart.png", file=sys.stderr)
    if publish:
        PUBLISHED.mkdir(parents=True, exist_ok=True)
        for name in ("RESULTS.md", "chart.png", "results.json"):
            if (RESULTS / name).exists():
                shutil.copy2(RESULTS / name, PUBLISHED / name)
        print(f"published to {PUBLISHED}", file=sys.stderr)
    return 1 if any(m["status"] == "failed" for m in modules) else 0


if __name__ == "__main__":
    sys.exit(main())
