"""Rendering results: normalised figures, a text table, Markdown, and a PNG chart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.adapters import ADAPTERS
from bench.common import figure

_NUMBER = (int, float)


def check(fig: dict[str, Any]) -> bool | None:
    """Whether a figure meets its target (None when it has none)."""
    target = fig.get("target") or {}
    value, ratio = fig.get("value"), fig.get("ratio")
    verdicts = []
    for kind, bound in target.items():
        subject = ratio if kind.startswith("ratio") else value
        if subject is None:
            verdicts.append(False)
        elif kind.endswith("at_least"):
            verdicts.append(subject >= bound)
        elif kind.endswith("at_most"):
            verdicts.append(subject <= bound)
    return all(verdicts) if verdicts else None


def normalise(module: str, result: Any) -> dict[str, Any]:
    """A module record from what its run() returned: {"figures": [...]} or a flat {name: value} dict."""
    figures: list[dict[str, Any]] = []
    notes: list[str] = []
    if isinstance(result, dict) and isinstance(result.get("figures"), list):
        figures = [dict(f) for f in result["figures"]]
        notes = [str(n) for n in result.get("notes", [])]
    elif isinstance(result, dict) and module in ADAPTERS:
        figures = ADAPTERS[module](result)
    elif isinstance(result, dict):
        _flatten("", result, figures, notes)
    for fig in figures:
        fig.setdefault("name", "?")
        fig.setdefault("unit", "")
        fig.setdefault("target", {})
        if fig.get("ratio") is None and fig.get("baseline"):
            fig["ratio"] = fig["value"] / fig["baseline"]
        fig["met"] = check(fig)
    record = {"module": module, "status": "ok", "figures": figures, "notes": notes}
    if isinstance(result, dict) and "figures" not in result:
        record["raw"] = result  # the module's own dict, kept whole in results.json
    return record


#: Units guessed from the name of a plain number in a module's own dict.
_SUFFIX_UNITS = (
    ("_mbps", "MB/s"),
    ("_mb_s", "MB/s"),
    ("_mib_s", "MiB/s"),
    ("_ms", "ms"),
    ("_us", "us"),
    ("_kib", "KiB"),
    ("_seconds", "s"),
    ("_bytes", "B"),
)


def _flatten(prefix: str, data: dict[str, Any], figures: list[dict[str, Any]], notes: list[str]) -> None:
    """Plain numbers (nested dicts flattened as a.b) become figures without targets; the rest notes."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            notes.append(f"{name}: {value}")
        elif isinstance(value, _NUMBER):
            unit = next((u for suffix, u in _SUFFIX_UNITS if key.endswith(suffix)), "")
            figures.append(figure(name, float(value), unit))
        elif isinstance(value, dict) and isinstance(value.get("value"), _NUMBER):
            figures.append({**figure(name, float(value["value"]), str(value.get("unit", ""))), **value, "name": name})
        elif isinstance(value, dict):
            _flatten(f"{name}.", value, figures, notes)
        elif not isinstance(value, list):
            notes.append(f"{name}: {value}")


def _num(value: Any, unit: str = "") -> str:
    if not isinstance(value, _NUMBER):
        return "-"
    if unit in ("us", "sessions") or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _target(fig: dict[str, Any]) -> str:
    parts = []
    for kind, bound in (fig.get("target") or {}).items():
        sign = ">=" if kind.endswith("at_least") else "<="
        if kind.startswith("ratio"):
            parts.append(f"{sign} {bound:g}x {fig.get('baseline_name') or 'baseline'}")
        else:
            parts.append(f"{sign} {_num(bound, fig.get('unit', ''))} {fig.get('unit', '')}".rstrip())
    return ", ".join(parts)


def rows(results: dict[str, Any]) -> list[list[str]]:
    """Table rows: figure, value, baseline, ratio, target, verdict."""
    out = []
    seen: set[str] = set()
    for module in results["modules"]:
        if module["status"] != "ok":
            out.append([f"{module['module']}: {module['status']} ({module.get('reason', '')})", "", "", "", "", ""])
            continue
        for fig in module["figures"]:
            unit = fig.get("unit", "")
            baseline = fig.get("baseline")
            # The same name from two modules (scale-out repeats exec's figures) says whose it is.
            owner = module["module"].removeprefix("bench_")
            name = fig["name"] if fig["name"] not in seen else f"{owner}: {fig['name']}"
            seen.add(fig["name"])
            out.append(
                [
                    name,
                    f"{_num(fig['value'], unit)} {unit}".strip(),
                    f"{_num(baseline, unit)} ({fig.get('baseline_name', '')})" if baseline is not None else "",
                    f"{fig['ratio']:.2f}x" if isinstance(fig.get("ratio"), _NUMBER) else "",
                    _target(fig),
                    {True: "met", False: "MISSED", None: ""}[fig.get("met")],
                ]
            )
    return out


HEADER = ["Figure", "Value", "Baseline (same run)", "Ratio", "Target", ""]


def text_table(results: dict[str, Any]) -> str:
    """The table for a terminal."""
    table = [HEADER, *rows(results)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: the table, the machine, the notes."""
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"`python -m bench.run{' --quick' if results['quick'] else ''}` on {m['date']}, commit {m['commit']}.",
        *(f"Re-run since: {u['module']}, {u['note']}." for u in results.get("updated", [])),
        "",
        "| " + " | ".join(HEADER[:-1]) + " | Verdict |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(results)]
    lines += [
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end.",
        f"Versions: Python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, uvloop {m['uvloop']}, "
        f"{m['socat']}, {m['rsync']}; router event loop: {m['router_loop']}.",
        "",
    ]
    for module in results["modules"]:
        for note in module.get("notes", []):
            lines.append(f"- {module['module']}: {note}")
        if module["status"] == "skipped":
            lines.append(f"- {module['module']}: skipped ({module['reason']})")
    return "\n".join(lines).rstrip() + "\n"


def _figures(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure, a repeated name prefixed with its module (a chart has one bar per name)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for module in results["modules"]:
        if module["status"] != "ok":
            continue
        for fig in module["figures"]:
            if fig["name"] in seen:
                fig = {**fig, "name": f"{module['module'].removeprefix('bench_')}: {fig['name']}"}
            seen.add(fig["name"])
            out.append(fig)
    return out


def chart(results: dict[str, Any], path: Path) -> None:
    """chart.png: ratios to the same-run baselines, latencies, and budgets, each with its target."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = _figures(results)
    ratios = [f for f in figs if isinstance(f.get("ratio"), _NUMBER) and f.get("unit") not in ("us", "ms")]
    latencies = [f for f in figs if f.get("unit") in ("us", "ms")]
    others = [f for f in figs if f not in ratios and f not in latencies and f.get("target")]
    panels = [p for p in (ratios, latencies, others) if p]
    if not panels:
        return
    heights = [max(1.6, 0.42 * len(p) + 0.9) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), gridspec_kw={"height_ratios": heights})
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, panel in zip(axes, panels, strict=True):
        if panel is ratios:
            _ratio_panel(ax, panel)
        elif panel is latencies:
            _latency_panel(ax, panel)
        else:
            _budget_panel(ax, panel)
    m = results["machine"]
    fig.suptitle(f"osmo-router benchmarks ({m['nproc']} cores, {m['cpu']}, commit {m['commit']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colour(fig: dict[str, Any]) -> str:
    return {True: "#2e8b57", False: "#c0392b", None: "#5b7db1"}[fig.get("met")]


def _ratio_panel(ax: Any, figs: list[dict[str, Any]]) -> None:
    names = [f"{f['name']} (vs {f.get('baseline_name') or 'baseline'})" for f in figs]
    values = [f["ratio"] for f in figs]
    ax.barh(names, values, color=[_colour(f) for f in figs])
    for i, f in enumerate(figs):
        bound = (f.get("target") or {}).get("ratio_at_least")
        if bound is not None:
            ax.plot([bound, bound], [i - 0.4, i + 0.4], color="black", linewidth=2)
        right = max(values[i], bound or 0.0)
        ax.text(right, i, f" {values[i]:.2f}x  ({_num(f['value'], f['unit'])} {f['unit']})", va="center")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.invert_yaxis()
    ax.set_xlabel("ratio to the baseline measured in the same run (black tick: target)")
    ax.set_xlim(0, max([*values, 1.0]) * 1.45)


def _latency_panel(ax: Any, figs: list[dict[str, Any]]) -> None:
    scale = [1000.0 if f["unit"] == "ms" else 1.0 for f in figs]
    values = [f["value"] * s for f, s in zip(figs, scale, strict=True)]
    ax.barh([f["name"] for f in figs], values, color=[_colour(f) for f in figs])
    for i, f in enumerate(figs):
        if f.get("baseline") is not None:
            ax.plot([f["baseline"] * scale[i]] * 2, [i - 0.4, i + 0.4], color="grey", linewidth=2)
        bound = (f.get("target") or {}).get("at_most")
        if bound is not None:
            ax.plot([bound * scale[i]] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(values[i], i, f" {values[i]:,.0f} us", va="center")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("microseconds, log scale (black tick: target; grey tick: baseline)")


def _budget_panel(ax: Any, figs: list[dict[str, Any]]) -> None:
    names, values = [], []
    for f in figs:
        bound = next(iter(f["target"].values()))
        names.append(f"{f['name']} ({_num(f['value'], f['unit'])} {f['unit']})")
        values.append(f["value"] / bound if bound else 0.0)
    ax.barh(names, values, color=[_colour(f) for f in figs])
    ax.axvline(1.0, color="black", linewidth=2)
    ax.invert_yaxis()
    ax.set_xlabel("value / target (black line: the target)")
