"""The Helm chart as helm renders it: lint, Kubernetes schemas, resources, labels and selectors.

Every scenario of tests/chart_helm.py (each branch of the templates) is linted and rendered by the
real helm, and every manifest is validated against the Kubernetes API schemas that
kubernetes-validate ships (offline). What the router is told (args, ports, mounts) is checked in
tests/unit/test_chart_args.py. The dashboard and the Dockerfile have test files of their own.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from osmo_router.cli.durations import parse_duration
from osmo_router.cli.main import main_group
from tests.chart_helm import CHART, NAMESPACE, RELEASE, SCENARIOS, Rendered, default_values, helm, render, render_error

REQUIRED_LABELS = {
    "app",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}
SELECTOR_LABELS = {"app", "app.kubernetes.io/name", "app.kubernetes.io/instance"}
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships.
KUBE_VERSIONS = sorted({all_versions()[0], kubernetes_validate.latest_version()})
# Custom resources: no schema in kubernetes-validate, checked field by field below instead.
CUSTOM_KINDS = {"ServiceMonitor"}


@pytest.fixture(params=sorted(SCENARIOS), scope="module")
def scenario(request: pytest.FixtureRequest) -> Rendered:
    return render(SCENARIOS[request.param])


def chart_yaml() -> dict[str, Any]:
    data = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert isinstance(data, dict)
    return data


# --- Chart.yaml and values.yaml ------------------------------------------------------------


def test_chart_yaml_names_the_chart() -> None:
    chart = chart_yaml()
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", str(chart["version"]))
    assert chart["appVersion"]


def test_values_defaults_match_the_router_defaults() -> None:
    """The chart must not quietly deploy different settings from the ones DESIGN.md documents."""
    serve = main_group.commands["serve"]
    defaults = {p.name: p.default for p in serve.params if isinstance(p, click.Option)}
    values = default_values()
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
    assert parse_duration(values["redis"]["directoryTtl"]) == parse_duration(str(defaults["directory_ttl"]))
    for key, option in [
        ("sessionTtl", "session_ttl"),
        ("rendezvous", "rendezvous_timeout"),
        ("flowControl", "flow_control_timeout"),
        ("drain", "drain_timeout"),
    ]:
        assert parse_duration(grpc["timeouts"][key]) == parse_duration(str(defaults[option])), key


def _values_paths() -> set[tuple[str, tuple[str, ...]]]:
    """(template, path) for every `.Values.a.b.c` in the template sources.

    helm renders a missing value as nothing, not as an error (not even `helm lint --strict`), so a
    misspelt path would silently render empty: the sources are the one place to catch it.
    """
    found = set()
    for path in (CHART / "templates").iterdir():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", path.read_text()):
            found.add((path.name, tuple(match.group(1).strip(".").split("."))))
    return found


def test_every_values_path_in_templates_exists() -> None:
    paths = _values_paths()
    assert len(paths) > 20  # the regex really found the references
    missing = []
    for name, path in sorted(paths):
        node: Any = default_values()
        for key in path:
            if not isinstance(node, dict) or key not in node:
                missing.append(f"{name}: .Values.{'.'.join(path)}")
                break
            node = node[key]
    assert not missing, missing


def test_every_top_level_value_is_used() -> None:
    """A value no template reads is a setting that silently does nothing."""
    used = {path[0] for _, path in _values_paths()}
    assert set(default_values()) - used == set()


def test_scenarios_cover_every_value() -> None:
    """Each top-level value is changed by some scenario, so that each branch is rendered."""
    changed = {key.split(".")[0] for overrides in SCENARIOS.values() for key in overrides}
    assert set(default_values()) - changed == set()


# --- helm lint and the Kubernetes schemas ---------------------------------------------------


def test_helm_lint_passes(scenario: Rendered) -> None:
    result = helm("lint", "--strict", str(CHART), values=scenario.changed_values())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert not re.search(r"\[(WARNING|ERROR)\]", result.stdout), result.stdout


def test_manifests_match_the_kubernetes_schemas(scenario: Rendered) -> None:
    """Strict: a misspelt or misplaced field fails too, not only a wrong type."""
    for doc in scenario.docs:
        for version in KUBE_VERSIONS:
            if doc["kind"] in CUSTOM_KINDS:
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(doc, version, strict=True)
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']} at {list(e.path)}, Kubernetes {version}: {e.message}")


def test_the_schema_check_catches_a_bad_manifest() -> None:
    """The validator does reject what the API server would (so the test above can fail)."""
    deployment = copy.deepcopy(render().one("Deployment"))  # renders are cached: change a copy
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(render().one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["argz"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="argz"):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


# --- which resources ------------------------------------------------------------------------


def test_rendered_resources_follow_the_values(scenario: Rendered) -> None:
    values = scenario.values
    expected = {"Deployment", "Service"}
    if values["podDisruptionBudget"]["enabled"] and values["replicaCount"] > 1:
        expected.add("PodDisruptionBudget")  # one replica with minAvailable 1 would block drains
    if values["metrics"]["serviceMonitor"]["enabled"]:
        expected.add("ServiceMonitor")
    assert scenario.kinds() == sorted(expected)
    assert scenario.one("Deployment")["spec"]["replicas"] == values["replicaCount"]
    pdb = scenario.get("PodDisruptionBudget")
    if pdb:
        assert pdb["spec"]["minAvailable"] == values["podDisruptionBudget"]["minAvailable"]


def test_resources_are_named_after_the_release() -> None:
    assert {doc["metadata"]["name"] for doc in render().docs} == {"router-grpc"}  # the README's Service name
    assert {doc["metadata"]["name"] for doc in render(release="edge").docs} == {"edge-router-grpc"}
    assert {doc["metadata"]["name"] for doc in render(SCENARIOS["everything-else"]).docs} == {"osmo-gateway"}
    for doc in render(release="edge").docs:
        assert "namespace" not in doc["metadata"]  # helm install -n decides


# --- labels and selectors -------------------------------------------------------------------


def test_every_resource_carries_the_standard_labels(scenario: Rendered) -> None:
    values = scenario.values
    name = values["nameOverride"] or CHART.name
    for labels in [doc["metadata"]["labels"] for doc in scenario.docs] + [scenario.pod["metadata"]["labels"]]:
        assert REQUIRED_LABELS <= set(labels)
        assert labels["app"] == labels["app.kubernetes.io/name"] == name
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == (values["image"]["tag"] or chart_yaml()["appVersion"])
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == f"{CHART.name}-{chart_yaml()['version']}"


def test_selectors_match_the_pod_labels(scenario: Rendered) -> None:
    pod_labels = scenario.pod["metadata"]["labels"]
    selectors = {
        "Deployment": scenario.one("Deployment")["spec"]["selector"]["matchLabels"],
        "Service": scenario.one("Service")["spec"]["selector"],
    }
    for kind in ("PodDisruptionBudget", "ServiceMonitor"):
        doc = scenario.get(kind)
        if doc:
            selectors[kind] = doc["spec"]["selector"]["matchLabels"]
    for kind, selector in selectors.items():
        # The version label changes on upgrade; in an immutable Deployment selector it breaks upgrades.
        assert set(selector) == SELECTOR_LABELS, kind
        assert selector.items() <= pod_labels.items(), kind
    # kubectl -l app=router-grpc, as in the seed README and NOTES.txt
    assert render().pod["metadata"]["labels"]["app"] == "router-grpc"


def test_service_monitor_scrapes_the_metrics_service_port() -> None:
    rendered = render(SCENARIOS["service-monitor"])
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"  # what Prometheus selects by
    service_labels = rendered.one("Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    service_ports = {port["name"]: port for port in rendered.one("Service")["spec"]["ports"]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert service_ports["metrics"]["port"] == rendered.values["metrics"]["port"]


# --- the pod ---------------------------------------------------------------------------------


def test_pod_settings_come_from_the_values(scenario: Rendered) -> None:
    values = scenario.values
    pod = scenario.pod["spec"]
    container = scenario.container
    tag = values["image"]["tag"] or chart_yaml()["appVersion"]
    assert container["image"] == f"{values['image']['repository']}:{tag}"
    assert container["imagePullPolicy"] == values["image"]["pullPolicy"]
    assert container["resources"] == values["resources"]
    assert container["securityContext"] == values["securityContext"]
    assert pod["securityContext"] == values["podSecurityContext"]
    assert pod["automountServiceAccountToken"] is False  # the router never calls the Kubernetes API
    assert pod["terminationGracePeriodSeconds"] == values["terminationGracePeriodSeconds"]
    for key in ("imagePullSecrets", "nodeSelector", "tolerations", "affinity"):
        assert pod.get(key) == (values[key] or None), key
    assert scenario.pod["metadata"].get("annotations") == (values["podAnnotations"] or None)
    service = scenario.one("Service")
    assert service["spec"]["type"] == values["service"]["type"]
    assert service["metadata"].get("annotations") == (values["service"]["annotations"] or None)


def test_grace_period_outlasts_the_drain(scenario: Rendered) -> None:
    """Otherwise the kubelet kills the router while sessions are still draining."""
    drain = parse_duration(scenario.values["grpc"]["timeouts"]["drain"])
    assert scenario.pod["spec"]["terminationGracePeriodSeconds"] > drain


def test_rollouts_never_drop_capacity() -> None:
    strategy = render().one("Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


# --- NOTES.txt -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["defaults", "ws-off", "ws-port", "scale-out", "single-replica"])
def test_install_notes_give_the_addresses_the_service_has(name: str) -> None:
    """What `helm install` prints: the Service's addresses, and a warning for unpaired replicas."""
    rendered = render(SCENARIOS[name])
    # Client-side dry run: no cluster is contacted (nor any kubeconfig read).
    install = ["install", RELEASE, str(CHART), "--dry-run=client", "--kubeconfig", "/nonexistent", "-n", NAMESPACE]
    result = helm(*install, values=rendered.changed_values())
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("\nNOTES:\n", 1)[1]
    host = f"{rendered.one('Service')['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    ports = {port["name"]: port["port"] for port in rendered.one("Service")["spec"]["ports"]}
    assert f"OSMO_ROUTER_ADDRESS={host}:{ports['grpc']}\n" in notes
    ws = re.findall(r"OSMO_WS_ADDRESS=(\S+)", notes)
    assert ws == ([f"{host}:{ports['ws']}"] if "ws" in ports else [])
    assert f"-l app={rendered.pod['metadata']['labels']['app']}\n" in notes
    assert f"{ports['metrics']}:{ports['metrics']}\n" in notes
    unpaired = rendered.values["replicaCount"] > 1 and not rendered.values["redis"]["enabled"]
    assert ("WARNING: " in notes) is unpaired


# --- what helm refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, r"set auth\.publicKeySecret or auth\.jwksUrl"),
        ({"auth.publicKeySecret": "k", "auth.mode": "none"}, r"auth\.mode must be jwt"),
        (
            {"auth.publicKeySecret": "k", "redis.enabled": True, "redis.peer.secretName": "p"},
            r"redis\.url or redis\.existingSecret is required",
        ),
        (
            {"auth.publicKeySecret": "k", "redis.enabled": True, "redis.url": "redis://r:6379/0"},
            r"redis\.peer\.secretName is required",
        ),
    ],
    ids=["no-jwt-key", "auth-none", "redis-without-url", "redis-without-peer-secret"],
)
def test_helm_refuses_an_unsafe_or_incomplete_release(overrides: dict[str, Any], message: str) -> None:
    assert re.search(message, render_error(overrides))
