"""Figures (with baselines and the targets of issue 9) from modules that return their own dicts.

bench_forward and bench_rsync return plain nested dicts; these adapters pick the headline figures
out of them. Keys that are missing are skipped, so a module changing its dict loses rows, never the
run; everything else still appears flattened in results.json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.common import figure

Figures = list[dict[str, Any]]


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def forward(result: dict[str, Any]) -> Figures:
    """Port-forward: one connection each way vs socat, 1,000 connections, connection set-up."""
    out: Figures = []
    for way in ("download", "upload"):
        value = _get(result, "throughput", f"{way}_forward_mib_s")
        base = _get(result, "throughput", f"{way}_socat_mib_s")
        if value is not None and base:
            target = {"ratio_at_least": 0.4}
            out.append(figure(f"forward 1 TCP connection, {way}", value, "MiB/s", baseline=base,
                              baseline_name="socat", target=target))  # fmt: skip
    served, count = _get(result, "concurrency", "served"), _get(result, "concurrency", "connections")
    if served is not None and count:
        out.append(figure("forward connections served at once", served, "sessions", target={"at_least": count}))
    per_conn = _get(result, "concurrency", "router_kib_per_connection")
    if per_conn is not None and per_conn > 0:
        # Informational: the 50 KiB target is held by the 10,000 idle sessions of bench_relay. This is
        # the slope over the second half of the connections, on a fresh router (each connection: a
        # session and its two streams); over all of them it is the same within 1 KiB.
        out.append(figure("router memory per forwarded connection", per_conn, "KiB"))
    elif per_conn is not None:  # the router's RSS fell while the connections were open: no figure
        out.append(figure("router memory per forwarded connection (RSS fell: not measured)", per_conn, "KiB"))
    for q in ("p50", "p99"):
        value, base = _get(result, "latency", f"forward_{q}_ms"), _get(result, "latency", f"direct_{q}_ms")
        if value is not None:
            out.append(figure(f"forward new connection set-up {q}", value * 1000, "us", baseline=(base or 0) * 1000,
                              baseline_name="direct"))  # fmt: skip
    return out


def rsync(result: dict[str, Any]) -> Figures:
    """rsync upload through the router vs plain local rsync."""
    value, base = result.get("router_mib_s"), result.get("local_mib_s")
    if value is None or not base:
        return []
    size = result.get("size_bytes", 0) / 2**20
    target = {"ratio_at_least": 0.5}
    return [figure(f"rsync {size:.0f} MiB upload", value, "MiB/s", baseline=base, baseline_name="local rsync",
                   target=target)]  # fmt: skip


def ws(result: dict[str, Any]) -> Figures:
    """The WebSocket transport beside the gRPC transport, same router and agent."""
    out: Figures = []
    for q in ("p50", "p99"):
        value, base = _get(result, "ws", "exec_echo", f"{q}_ms"), _get(result, "grpc", "exec_echo", f"{q}_ms")
        if value is not None and base:
            out.append(figure(f"ws transport exec echo {q}", value * 1000, "us", baseline=base * 1000,
                              baseline_name="gRPC transport"))  # fmt: skip
    pairs = [("exec_mib_s", "ws transport exec throughput")]
    pairs += [(f"forward_{way}_mib_s", f"ws transport forward {way}") for way in ("download", "upload")]
    for key, name in pairs:
        value, base = _get(result, "ws", key), _get(result, "grpc", key)
        if value is not None and base:
            out.append(figure(name, value, "MiB/s", baseline=base, baseline_name="gRPC transport"))
    return out


ADAPTERS: dict[str, Callable[[dict[str, Any]], Figures]] = {
    "bench_forward": forward,
    "bench_rsync": rsync,
    "bench_ws": ws,
}
