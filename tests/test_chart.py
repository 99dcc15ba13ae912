"""Static checks of the deployment artefacts: Helm chart, Grafana dashboard, Dockerfile.

No helm or docker binary is available to the tests, so nothing is rendered or built. The checks
tie the artefacts to the code instead: the flags the chart passes must be real `osmo-router serve`
options, the metrics the dashboard plots must be ones RouterMetrics exports, and so on. Templates
are Go templates, which YAML cannot parse, so they are read with regular expressions.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from osmo_router.cli import main_group
from osmo_router.cliutil import bool_option_names, normalize_bool_flags
from osmo_router.durations import parse_duration
from osmo_router.router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "router-grpc"
TEMPLATES = CHART / "templates"
DASHBOARD = ROOT / "dashboards" / "router-grpc.json"
DOCKERFILE = ROOT / "Dockerfile"

# What the brief and DESIGN.md require; each must be wired, not merely allowed.
REQUIRED_LABELS = {
    "app",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}
REQUIRED_SERVE_FLAGS = {
    "host",
    "port",
    "metrics-port",
    "tls-enabled",
    "tls-cert",
    "tls-key",
    "session-ttl",
    "rendezvous-timeout",
    "flow-control-buffer",
    "flow-control-timeout",
    "drain-timeout",
    "auth",
    "jwt-audience",
    "jwt-public-key",
    "jwks-url",
    "redis-url",
    "advertise-address",
    "log-format",
}
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


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    data = load_yaml(CHART / "values.yaml")
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def serve() -> click.Command:
    return main_group.commands["serve"]


# --- Chart.yaml and values.yaml ------------------------------------------------------------


def test_chart_yaml_parses_and_names_the_chart() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", str(chart["version"]))
    assert chart["appVersion"]


def test_values_defaults_match_the_router_defaults(values: dict[str, Any], serve: click.Command) -> None:
    """The chart must not quietly deploy different settings from the ones DESIGN.md documents."""
    defaults: dict[str | None, Any] = {p.name: p.default for p in serve.params if isinstance(p, click.Option)}
    grpc = values["grpc"]
    assert values["replicaCount"] == 2
    assert grpc["port"] == defaults["port"]
    assert values["metrics"]["port"] == defaults["metrics_port"]
    assert grpc["tls"]["enabled"] is defaults["tls_enabled"]
    assert grpc["flowControlBuffer"] == defaults["flow_control_buffer"]
    assert values["auth"]["mode"] == defaults["auth"]
    assert values["auth"]["audience"] == defaults["jwt_audience"]
    timeouts = grpc["timeouts"]
    for key, option in [
        ("sessionTtl", "session_ttl"),
        ("rendezvous", "rendezvous_timeout"),
        ("flowControl", "flow_control_timeout"),
        ("drain", "drain_timeout"),
    ]:
        assert parse_duration(timeouts[key]) == parse_duration(defaults[option]), key


def test_grace_period_outlasts_the_drain(values: dict[str, Any]) -> None:
    """Otherwise the kubelet kills the router while sessions are still draining."""
    drain = parse_duration(values["grpc"]["timeouts"]["drain"])
    assert values["terminationGracePeriodSeconds"] > drain


def _values_paths() -> set[tuple[str, tuple[str, ...]]]:
    """(template, path) for every `.Values.a.b.c` in any template."""
    found = set()
    for path in TEMPLATES.iterdir():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", path.read_text()):
            found.add((path.name, tuple(match.group(1).strip(".").split("."))))
    return found


def test_every_values_path_in_templates_exists(values: dict[str, Any]) -> None:
    paths = _values_paths()
    assert len(paths) > 20  # the regex really found the references
    missing = []
    for name, path in sorted(paths):
        node: Any = values
        for key in path:
            if not isinstance(node, dict) or key not in node:
                missing.append(f"{name}: .Values.{'.'.join(path)}")
                break
            node = node[key]
    assert not missing, missing


def test_every_top_level_value_is_used(values: dict[str, Any]) -> None:
    """A value no template reads is a setting that silently does nothing."""
    used = {path[0] for _, path in _values_paths()}
    assert set(values) - used == set()


# --- labels and selectors -------------------------------------------------------------------


def _defines() -> dict[str, str]:
    text = template("_helpers.tpl")
    return dict(re.findall(r'\{\{-?\s*define "([^"]+)"\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}\n', text, re.S))


def label_keys(define: str) -> set[str]:
    """Label keys a helper emits, following its `include`s of other helpers."""
    body = _defines()[define]
    keys = set(re.findall(r"^([A-Za-z0-9./-]+):\s", body, re.M))
    for line in body.splitlines():
        # A line that is only an include pulls in that helper's labels.
        included = re.fullmatch(r'\s*\{\{-?\s*include "([^"]+)" \. -?\}\}\s*', line)
        if included:
            keys |= label_keys(included.group(1))
    return keys


def included_under(text: str, key: str) -> list[str]:
    """Helpers included as the block right under `key:` (e.g. matchLabels, selector, labels)."""
    return re.findall(rf'^\s*{re.escape(key)}:\s*\n\s*\{{\{{-?\s*include "([^"]+)"', text, re.M)


def test_labels_helper_carries_the_standard_labels() -> None:
    assert REQUIRED_LABELS <= label_keys("router-grpc.labels")


def test_every_resource_carries_the_standard_labels() -> None:
    for name in ("deployment.yaml", "service.yaml", "pdb.yaml", "servicemonitor.yaml"):
        metadata_labels = included_under(template(name), "labels")
        assert "router-grpc.labels" in metadata_labels, name


def test_selectors_match_the_pod_labels() -> None:
    deployment = template("deployment.yaml")
    # The pod template's labels are the second `labels:` block (the first is the Deployment's).
    pod_blocks = included_under(deployment.split("template:", 1)[1], "labels")
    assert pod_blocks, "pod template has no labels"
    pod_labels = label_keys(pod_blocks[0])
    assert "app" in pod_labels  # kubectl -l app=router-grpc, as in the seed README
    selectors = {
        "deployment": included_under(deployment, "matchLabels"),
        "service": included_under(template("service.yaml"), "selector"),
        "pdb": included_under(template("pdb.yaml"), "matchLabels"),
    }
    for owner, found in selectors.items():
        assert len(found) == 1, owner
        keys = label_keys(found[0])
        assert {"app", "app.kubernetes.io/name", "app.kubernetes.io/instance"} <= keys, owner
        assert keys <= pod_labels, owner
        # The version label changes on upgrade; in an immutable Deployment selector it breaks upgrades.
        assert "app.kubernetes.io/version" not in keys, owner


# --- ports and probes -----------------------------------------------------------------------


def container_ports(deployment: str) -> dict[str, str]:
    """Container port name -> the value expression of its containerPort."""
    return dict(re.findall(r"- name: (\S+)\s*\n\s*containerPort: (.+)", deployment))


def test_container_ports_are_the_configured_ones() -> None:
    deployment = template("deployment.yaml")
    ports = container_ports(deployment)
    assert ports == {"grpc": "{{ .Values.grpc.port }}", "metrics": "{{ .Values.metrics.port }}"}
    # The router must listen where the container port says it does.
    assert '"--port={{ .Values.grpc.port }}"' in deployment
    assert '"--metrics-port={{ .Values.metrics.port }}"' in deployment


def test_service_targets_container_ports() -> None:
    ports = container_ports(template("deployment.yaml"))
    service = template("service.yaml")
    targets = re.findall(r"targetPort: (\S+)", service)
    assert sorted(targets) == sorted(ports)
    # Each service port listens on the same number as the container port it targets.
    for name, port, target in re.findall(r"- name: (\S+)\s*\n\s*port: (.+)\n\s*targetPort: (\S+)", service):
        assert name == target
        assert port == ports[target]


def test_probes_hit_health_endpoints_on_the_metrics_port() -> None:
    deployment = template("deployment.yaml")
    probe = r"(\w+Probe):\s*\n\s*httpGet:\s*\n\s*path: (\S+)\s*\n\s*port: (\S+)"
    probes = {kind: (path, port) for kind, path, port in re.findall(probe, deployment)}
    assert probes == {"livenessProbe": ("/healthz", "metrics"), "readinessProbe": ("/readyz", "metrics")}
    assert {port for _, port in probes.values()} <= set(container_ports(deployment))


def test_service_monitor_scrapes_a_service_port() -> None:
    service_ports = set(re.findall(r"- name: (\S+)\s*\n\s*port:", template("service.yaml")))
    scraped = re.findall(r"- port: (\S+)", template("servicemonitor.yaml"))
    assert scraped and set(scraped) <= service_ports
    assert "metrics.serviceMonitor.enabled" in template("servicemonitor.yaml")


def test_tls_secret_is_mounted_where_the_flags_point() -> None:
    deployment = template("deployment.yaml")
    mount = re.search(r"- name: tls\s*\n\s*mountPath: (\S+)", deployment)
    assert mount
    assert f'"--tls-cert={mount.group(1)}/tls.crt"' in deployment
    assert f'"--tls-key={mount.group(1)}/tls.key"' in deployment
    assert "secretName: {{ .Values.grpc.tls.secretName }}" in deployment


# --- container args -------------------------------------------------------------------------


def serve_flags(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(opt[2:] for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--"))
    return names


def chart_flags() -> set[str]:
    """Every `--flag` the chart passes (quoted args of deployment.yaml)."""
    return set(re.findall(r'^\s*- "--([a-z][a-z0-9-]*)', template("deployment.yaml"), re.M))


def test_serve_flags_are_read_from_the_cli(serve: click.Command) -> None:
    flags = serve_flags(serve)
    assert {"port", "tls-enabled", "no-tls-enabled", "session-ttl"} <= flags
    assert "not-a-flag" not in flags


def test_chart_passes_only_real_serve_flags(serve: click.Command) -> None:
    unknown = chart_flags() - serve_flags(serve)
    assert not unknown, f"not options of `osmo-router serve`: {sorted(unknown)}"


def test_chart_passes_every_required_flag() -> None:
    assert REQUIRED_SERVE_FLAGS - chart_flags() == set()


def rendered_args(values: dict[str, Any]) -> list[str]:
    """The container args with every branch taken and values filled in: a poor man's `helm template`."""
    # The args list runs until the next key of the container; list items, comments and control
    # actions belong to it.
    lines = template("deployment.yaml").split("args:\n", 1)[1].splitlines()
    block = list(itertools.takewhile(lambda line: re.match(r"\s*(- |#|\{\{)", line), lines))
    assert len(block) > 10
    env = {"$(POD_IP)": "10.1.2.3", "$(OSMO_REDIS_URL)": "redis://redis:6379/0"}

    def lookup(match: re.Match[str]) -> str:
        node: Any = values
        for key in match.group(1).split("."):
            node = node[key]
        return str(node).lower() if isinstance(node, bool) else str(node)

    args = []
    for line in block:
        item = re.fullmatch(r'\s*- "?(.*?)"?', line)
        if not item or "{{ . }}" in line or "| quote" in line:
            continue  # control actions, comments, and args that only echo a value back
        arg = re.sub(r"\{\{ \.Values\.([\w.]+) \}\}", lookup, item.group(1))
        for var, value in env.items():
            arg = arg.replace(var, value)
        args.append(arg)
    return args


def test_chart_args_parse_as_the_values_say(values: dict[str, Any], serve: click.Command) -> None:
    args = rendered_args(values)
    assert args[0] == "serve"
    ctx = serve.make_context("serve", normalize_bool_flags(args[1:], bool_option_names(serve)))
    params = ctx.params
    assert params["host"] == "0.0.0.0"
    assert params["port"] == values["grpc"]["port"]
    assert params["metrics_port"] == values["metrics"]["port"]
    assert params["tls_enabled"] is values["grpc"]["tls"]["enabled"]
    assert params["session_ttl"] == parse_duration(values["grpc"]["timeouts"]["sessionTtl"])
    assert params["drain_timeout"] == parse_duration(values["grpc"]["timeouts"]["drain"])
    assert params["flow_control_buffer"] == values["grpc"]["flowControlBuffer"]
    assert params["advertise_address"] == f"10.1.2.3:{values['grpc']['port']}"
    assert params["log_format"] == "json"


def test_chart_runs_the_serve_command() -> None:
    args = re.search(r"args:\s*\n\s*- (\S+)", template("deployment.yaml"))
    assert args and args.group(1) == "serve"
    assert '"--host=0.0.0.0"' in template("deployment.yaml")


def test_scale_out_uses_the_downward_api() -> None:
    deployment = template("deployment.yaml")
    assert re.search(r"--advertise-address=\$\(POD_IP\):\{\{ \.Values\.grpc\.port \}\}", deployment)
    assert re.search(r"name: POD_IP\s*\n\s*valueFrom:\s*\n\s*fieldRef:\s*\n\s*fieldPath: status\.podIP", deployment)


# --- dashboard ------------------------------------------------------------------------------


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


# --- Dockerfile -----------------------------------------------------------------------------


def docker_stages() -> dict[str, tuple[str, str]]:
    """Stage name -> (base image or stage, instructions of the stage)."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", text, flags=re.M | re.I)
    return {name: (base, body) for base, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True)}


def effective_user(stages: dict[str, tuple[str, str]], stage: str) -> str | None:
    """The USER a stage runs as: its own last USER, else its parent stage's."""
    base, body = stages[stage]
    users: list[str] = re.findall(r"^USER\s+(\S+)", body, re.M)
    if users:
        return users[-1]
    return effective_user(stages, base) if base in stages else None


def test_dockerfile_stages() -> None:
    stages = docker_stages()
    assert {"build", "agent", "router"} <= set(stages)
    # The last stage is what a plain `docker build .` produces.
    assert list(stages)[-1] == "router"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text(), re.M)
    assert re.search(r"pip wheel\b", stages["build"][1])


@pytest.mark.parametrize("stage", ["router", "agent"])
def test_dockerfile_runs_as_non_root(stage: str) -> None:
    user = effective_user(docker_stages(), stage)
    assert user is not None
    assert user.split(":")[0] not in {"root", "0"}


def test_dockerfile_agent_has_rsync_and_router_does_not_need_it() -> None:
    stages = docker_stages()
    assert re.search(r"apt-get install[^\n]*\brsync\b", stages["agent"][1])
    assert "rsync" not in stages["router"][1]


def test_dockerfile_entrypoint_and_ports() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["osmo-router"\]', text, re.M)
    exposed = {p for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert {"50051", "8080"} <= exposed


def test_scale_out_wires_the_peer_secret_and_directory_ttl(values: dict[str, Any], serve: click.Command) -> None:
    deployment = template("deployment.yaml")
    # The secret comes from a Secret through the environment variable --peer-secret reads, never argv.
    assert re.search(r"name: OSMO_PEER_SECRET\s*\n\s*valueFrom:\s*\n\s*secretKeyRef:", deployment)
    assert "--peer-secret=" not in deployment
    option = next(p for p in serve.params if p.name == "peer_secret")
    assert isinstance(option, click.Option) and option.envvar == "OSMO_PEER_SECRET"
    defaults = {p.name: p.default for p in serve.params}
    assert parse_duration(values["redis"]["directoryTtl"]) == parse_duration(str(defaults["directory_ttl"]))
    args = normalize_bool_flags(rendered_args(values)[1:], bool_option_names(serve))
    params = serve.make_context("serve", args).params
    assert params["directory_ttl"] == parse_duration(values["redis"]["directoryTtl"])
