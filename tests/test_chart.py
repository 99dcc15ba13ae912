"""Static checks of the Helm chart (the dashboard and the Dockerfile have test files of their own).

No helm binary is available to the tests, so the checks tie the chart to the code instead: the
flags the chart passes must be real `osmo-router serve` options that parse to the values' settings,
every port must be wired from its value to the flag, the container and the Service, and so on.
Templates are Go templates, which YAML cannot parse: they are read with regular expressions, and
rendered for given values by tests/helm_lite.py where a branch matters.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from osmo_router.cli.durations import parse_duration
from osmo_router.cli.main import main_group
from osmo_router.cli.options import bool_option_names, normalize_bool_flags
from tests.helm_lite import render, with_values

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "router-grpc"
TEMPLATES = CHART / "templates"

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
    "ws-port",
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
def deployable(values: dict[str, Any]) -> dict[str, Any]:
    """The defaults plus what the chart requires to render (a JWT key)."""
    return with_values(values, {"auth.publicKeySecret": "router-jwt"})


@pytest.fixture(scope="module")
def full_values(deployable: dict[str, Any]) -> dict[str, Any]:
    """Every optional feature on, so that its args are rendered too."""
    return with_values(
        deployable,
        {"redis.enabled": True, "redis.url": "redis://redis:6379/0", "redis.peer.secretName": "router-grpc-peer"},
    )


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
    assert values["ws"]["enabled"] is True
    assert values["ws"]["port"] == defaults["ws_port"]
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
    assert ports == {
        "grpc": "{{ .Values.grpc.port }}",
        "metrics": "{{ .Values.metrics.port }}",
        "ws": "{{ .Values.ws.port }}",
    }
    # The router must listen where the container port says it does.
    assert '"--port={{ .Values.grpc.port }}"' in deployment
    assert '"--metrics-port={{ .Values.metrics.port }}"' in deployment
    assert '"--ws-port={{ .Values.ws.port }}"' in deployment


def service_ports(service: str) -> dict[str, tuple[str, str]]:
    """Service port name -> (its port, its targetPort)."""
    found = re.findall(r"- name: (\S+)\s*\n\s*port: (.+)\n\s*targetPort: (\S+)", service)
    return {name: (port, target) for name, port, target in found}


def test_service_targets_container_ports() -> None:
    ports = container_ports(template("deployment.yaml"))
    service = template("service.yaml")
    targets = re.findall(r"targetPort: (\S+)", service)
    assert sorted(targets) == sorted(ports)
    # Each service port listens on the same number as the container port it targets.
    for name, (port, target) in service_ports(service).items():
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
    """The container args `helm template` would render for these values (env vars filled in)."""
    # The args list runs until the next key of the container: list items and comments belong to it.
    lines = "\n".join(render(template("deployment.yaml"), values)).split("args:\n", 1)[1].splitlines()
    block = list(itertools.takewhile(lambda line: re.match(r"\s*(- |#)", line), lines))
    assert len(block) > 10
    env = {"$(POD_IP)": "10.1.2.3", "$(OSMO_REDIS_URL)": "redis://redis:6379/0"}
    args = []
    for line in block:
        item = re.fullmatch(r'\s*- "?(.*?)"?', line)
        if not item or "{{ . }}" in line or "| quote" in line:
            continue  # comments, and args that only echo a value back
        arg = item.group(1)
        for var, value in env.items():
            arg = arg.replace(var, value)
        args.append(arg)
    return args


def serve_params(args: list[str], serve: click.Command) -> dict[str, Any]:
    """What `osmo-router serve` makes of rendered args."""
    assert args[0] == "serve"
    return serve.make_context("serve", normalize_bool_flags(args[1:], bool_option_names(serve))).params


def test_chart_args_parse_as_the_values_say(full_values: dict[str, Any], serve: click.Command) -> None:
    values = full_values
    params = serve_params(rendered_args(values), serve)
    assert params["host"] == "0.0.0.0"
    assert params["port"] == values["grpc"]["port"]
    assert params["metrics_port"] == values["metrics"]["port"]
    assert params["ws_port"] == values["ws"]["port"]
    assert params["tls_enabled"] is values["grpc"]["tls"]["enabled"]
    assert params["session_ttl"] == parse_duration(values["grpc"]["timeouts"]["sessionTtl"])
    assert params["drain_timeout"] == parse_duration(values["grpc"]["timeouts"]["drain"])
    assert params["flow_control_buffer"] == values["grpc"]["flowControlBuffer"]
    assert params["redis_url"] == "redis://redis:6379/0"
    assert params["advertise_address"] == f"10.1.2.3:{values['grpc']['port']}"
    assert params["jwt_public_key"] == "/etc/router/jwt/public.pem"
    assert params["log_format"] == "json"


def test_optional_args_follow_their_values(deployable: dict[str, Any], serve: click.Command) -> None:
    """The renderer really decides branches: scale-out and TLS args come and go with their values."""
    params = serve_params(rendered_args(deployable), serve)
    assert params["redis_url"] is None and params["advertise_address"] is None
    plain = rendered_args(with_values(deployable, {"grpc.tls.enabled": False}))
    assert serve_params(plain, serve)["tls_enabled"] is False
    assert not [arg for arg in plain if arg.startswith(("--tls-cert", "--tls-key"))]


# --- WebSocket compatibility port -------------------------------------------------------------


def rendered_ports(values: dict[str, Any]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(container port name -> number, service port name -> (number, targetPort)) as rendered."""
    deployment = "\n".join(render(template("deployment.yaml"), values))
    service = "\n".join(render(template("service.yaml"), values))
    return container_ports(deployment), service_ports(service)


def test_ws_port_is_wired_from_value_to_service(deployable: dict[str, Any], serve: click.Command) -> None:
    """ws.port -> --ws-port -> containerPort `ws` -> Service port `ws`, all the same number."""
    values = with_values(deployable, {"ws.port": 8123})  # not the default: the value must flow through
    assert serve_params(rendered_args(values), serve)["ws_port"] == 8123
    container, service = rendered_ports(values)
    assert container["ws"] == "8123"
    assert service["ws"] == ("8123", "ws")
    assert {"grpc", "metrics"} <= set(container) and {"grpc", "metrics"} <= set(service)


def test_ws_disabled_closes_the_port(deployable: dict[str, Any], serve: click.Command) -> None:
    """Off means off: the router is told -1 (its default would still listen on 8000), nothing exposed."""
    values = with_values(deployable, {"ws.enabled": False})
    args = rendered_args(values)
    assert serve_params(args, serve)["ws_port"] == -1
    assert [arg for arg in args if arg.startswith("--ws-port")] == ["--ws-port=-1"]
    container, service = rendered_ports(values)
    assert "ws" not in container and "ws" not in service
    assert set(container) == set(service) == {"grpc", "metrics"}


def test_chart_render_refuses_what_helm_refuses(values: dict[str, Any]) -> None:
    """The defaults alone name no JWT key: helm fails, and so does the renderer the tests rely on."""
    with pytest.raises(ValueError, match=r"auth\.publicKeySecret or auth\.jwksUrl"):
        render(template("deployment.yaml"), values)


def test_chart_runs_the_serve_command() -> None:
    args = re.search(r"args:\s*\n\s*- (\S+)", template("deployment.yaml"))
    assert args and args.group(1) == "serve"
    assert '"--host=0.0.0.0"' in template("deployment.yaml")


def test_scale_out_uses_the_downward_api() -> None:
    deployment = template("deployment.yaml")
    assert re.search(r"--advertise-address=\$\(POD_IP\):\{\{ \.Values\.grpc\.port \}\}", deployment)
    assert re.search(r"name: POD_IP\s*\n\s*valueFrom:\s*\n\s*fieldRef:\s*\n\s*fieldPath: status\.podIP", deployment)


def test_scale_out_wires_the_peer_secret_and_directory_ttl(
    values: dict[str, Any], full_values: dict[str, Any], serve: click.Command
) -> None:
    deployment = template("deployment.yaml")
    # The secret comes from a Secret through the environment variable --peer-secret reads, never argv.
    assert re.search(r"name: OSMO_PEER_SECRET\s*\n\s*valueFrom:\s*\n\s*secretKeyRef:", deployment)
    assert "--peer-secret=" not in deployment
    option = next(p for p in serve.params if p.name == "peer_secret")
    assert isinstance(option, click.Option) and option.envvar == "OSMO_PEER_SECRET"
    defaults = {p.name: p.default for p in serve.params}
    assert parse_duration(values["redis"]["directoryTtl"]) == parse_duration(str(defaults["directory_ttl"]))
    # Not the default, so the value must flow through to the flag.
    params = serve_params(rendered_args(with_values(full_values, {"redis.directoryTtl": "90s"})), serve)
    assert params["directory_ttl"] == 90
