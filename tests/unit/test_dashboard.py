"""Static checks of the Grafana dashboard against the metrics the router really exports.

No Grafana or Prometheus runs here: the metric names and labels a panel queries are checked against
the registry of a router built with every optional part (scale-out included), so a renamed metric
or a metric no panel shows fails here rather than on an empty graph.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from osmo_router.router.config import RouterConfig
from osmo_router.router.server import RouterServer

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "router-grpc.json"
# The metrics of DESIGN.md: each must be on a panel.
REQUIRED_DASHBOARD_METRICS = {
    "router_grpc_sessions_active",
    "router_grpc_rendezvous_duration_seconds_bucket",
    "router_grpc_bytes_total",
    "router_grpc_errors_total",
    "router_grpc_flow_control_timeouts_total",
    "router_grpc_sessions_expired_total",
    "router_grpc_agents_registered",
    "router_grpc_rendezvous_pending",
}
# Labels Prometheus attaches to every scraped series, so a dashboard may group by them.
TARGET_LABELS = {"namespace", "pod", "instance", "job"}


@functools.cache
def exported_families() -> dict[str, dict[str, set[str]]]:
    """Metric family -> {series name -> label names}, for everything a scale-out router exports.

    A router with a Redis URL also registers the directory (Redis) and peer (scale-out) metrics in
    its registry. Building one opens no connection (nothing is started), so no Redis is needed.
    """
    config = RouterConfig(
        auth="none", tls_enabled=False, metrics_port=-1, ws_port=-1, redis_url="redis://127.0.0.1:9/0"
    )
    registry = RouterServer(config).metrics.registry
    # Every collector of the registry, wherever it was created (prometheus_client keeps no public list).
    labels = {
        wrapper._name: set(wrapper._labelnames)
        for wrapper in registry._collector_to_names
        if isinstance(wrapper, MetricWrapperBase)
    }
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    families: dict[str, dict[str, set[str]]] = {}
    for family in registry.collect():
        base = labels[family.name]
        series = families.setdefault(family.name + ("_total" if family.type == "counter" else ""), {})
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = base | ({"le"} if suffix == "_bucket" else set())
    return families


def exported_metrics() -> dict[str, set[str]]:
    """Series name -> label names, for every series the router exports."""
    return {name: labels for series in exported_families().values() for name, labels in series.items()}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    return exprs


def test_exported_metrics_are_read_from_the_registry() -> None:
    series = exported_metrics()
    assert "router_grpc_bytes_total" in series
    assert "router_grpc_rendezvous_duration_seconds_bucket" in series
    assert series["router_grpc_errors_total"] == {"operation", "code"}
    # The scale-out metrics live in the same registry, created by the directory and the relay.
    assert series["router_grpc_peer_relay_errors_total"] == {"operation", "code"}
    assert "router_grpc_directory_up" in series


def test_dashboard_uses_only_exported_metrics() -> None:
    series = exported_metrics()
    used = {name for expr in dashboard_exprs() for name in re.findall(r"\brouter_grpc_\w+", expr)}
    assert used - set(series) == set()
    assert REQUIRED_DASHBOARD_METRICS <= used


def test_dashboard_plots_every_exported_family() -> None:
    """A metric the router exports but no panel shows is one nobody will look at."""
    used = {name for expr in dashboard_exprs() for name in re.findall(r"\brouter_grpc_\w+", expr)}
    families = exported_families()
    assert len(families) >= 17  # RouterMetrics, the directory's and the peer relay's
    unplotted = sorted(family for family, series in families.items() if not set(series) & used)
    assert not unplotted, f"exported but on no dashboard panel: {unplotted}"


def test_dashboard_groups_by_labels_the_metrics_have() -> None:
    series = exported_metrics()
    for expr in dashboard_exprs():
        names = re.findall(r"\brouter_grpc_\w+", expr)
        available = set().union(*(series[n] for n in names)) | TARGET_LABELS
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            grouped = {label.strip() for label in group.split(",")}
            assert grouped <= available, (expr, grouped - available)


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
