"""Static checks of the Grafana dashboard against the metrics the router really exports.

No Grafana or Prometheus runs here: the metric names and labels a panel queries are checked against
the registry of RouterMetrics, so a renamed metric fails here rather than on an empty graph.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from osmo_router.router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "router-grpc.json"
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


def exported_metrics() -> dict[str, set[str]]:
    """Series name -> label names, for every series RouterMetrics exports."""
    metrics = RouterMetrics()
    labels = {
        wrapper._name: set(wrapper._labelnames)
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        base = labels.get(family.name, labels.get(family.name + "_total", set()))
        for suffix in suffixes.get(family.type, [""]):
            series[family.name + suffix] = base | ({"le"} if suffix == "_bucket" else set())
    return series


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


def test_dashboard_uses_only_exported_metrics() -> None:
    series = exported_metrics()
    used = {name for expr in dashboard_exprs() for name in re.findall(r"\brouter_grpc_\w+", expr)}
    assert used - set(series) == set()
    assert REQUIRED_DASHBOARD_METRICS <= used


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
