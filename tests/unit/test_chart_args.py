"""What the chart tells the router, as helm renders it: args, ports, probes, mounts, environment.

The flags the chart passes must be real `osmo-router serve` options that parse to the values'
settings, and every port must be wired from its value to the flag, the container and the Service.
Each check runs on every scenario of tests/chart_helm.py.
"""

from __future__ import annotations

from typing import Any

import click
import pytest

from osmo_router.cli.durations import parse_duration
from osmo_router.cli.main import main_group
from osmo_router.cli.options import bool_option_names, normalize_bool_flags
from tests.chart_helm import POD_IP, SCENARIOS, Rendered, render

# What the brief and DESIGN.md require; each must be wired, not merely allowed.
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
    "directory-ttl",
    "peer-tls-server-name",
    "peer-tls-ca",
    "log-format",
}
TLS_DIR = "/etc/router/tls"
JWT_DIR = "/etc/router/jwt"


@pytest.fixture(params=sorted(SCENARIOS), scope="module")
def scenario(request: pytest.FixtureRequest) -> Rendered:
    return render(SCENARIOS[request.param])


@pytest.fixture(scope="module")
def serve() -> click.Command:
    return main_group.commands["serve"]


def serve_flags(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(opt[2:] for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--"))
    return names


def flag_names(args: list[str]) -> list[str]:
    return [arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--")]


def serve_params(rendered: Rendered, serve: click.Command) -> dict[str, Any]:
    """What `osmo-router serve` makes of the rendered args (env vars expanded as the kubelet does)."""
    args = rendered.expanded_args()
    assert args[0] == "serve"
    return serve.make_context("serve", normalize_bool_flags(args[1:], bool_option_names(serve))).params


def expected_params(values: dict[str, Any]) -> dict[str, Any]:
    """The router's settings the values ask for."""
    grpc, timeouts, auth, redis = values["grpc"], values["grpc"]["timeouts"], values["auth"], values["redis"]
    tls, scale_out = grpc["tls"]["enabled"], redis["enabled"]
    ca_key = redis["peer"]["tlsCaKey"] if scale_out and tls else ""  # the CA is read from the TLS secret
    redis_url = redis["url"]
    if redis["existingSecret"]:
        redis_url = f"secret:{redis['existingSecret']}/{redis['existingSecretKey']}"
    return {
        "host": "0.0.0.0",
        "port": grpc["port"],
        "metrics_port": values["metrics"]["port"],
        # Off means off: the router is told -1 (its default would still listen on 8000).
        "ws_port": values["ws"]["port"] if values["ws"]["enabled"] else -1,
        "tls_enabled": tls,
        "session_ttl": parse_duration(timeouts["sessionTtl"]),
        "rendezvous_timeout": parse_duration(timeouts["rendezvous"]),
        "flow_control_timeout": parse_duration(timeouts["flowControl"]),
        "drain_timeout": parse_duration(timeouts["drain"]),
        "flow_control_buffer": grpc["flowControlBuffer"],
        "auth": auth["mode"],
        "jwt_audience": auth["audience"],
        "jwt_public_key": f"{JWT_DIR}/{auth['publicKeySecretKey']}" if auth["publicKeySecret"] else None,
        "jwks_url": auth["jwksUrl"] or None,
        # (the TTL flag is passed with the URL only; without one the router's default stands)
        "jwks_cache_ttl": parse_duration(auth["jwksCacheTtl"]) if auth["jwksUrl"] else 300.0,
        "redis_url": redis_url if scale_out else None,
        "advertise_address": f"{POD_IP}:{grpc['port']}" if scale_out else None,
        "directory_ttl": parse_duration(redis["directoryTtl"]),
        "peer_tls_server_name": (scale_out and redis["peer"]["tlsServerName"]) or None,
        "peer_tls_ca": f"{TLS_DIR}/{ca_key}" if ca_key else None,
        "log_format": "json",
    }


# --- the command line -------------------------------------------------------------------------


def test_serve_flags_are_read_from_the_cli(serve: click.Command) -> None:
    flags = serve_flags(serve)
    assert {"port", "tls-enabled", "no-tls-enabled", "session-ttl"} <= flags
    assert "not-a-flag" not in flags


def test_chart_args_parse_as_the_values_say(scenario: Rendered, serve: click.Command) -> None:
    params = serve_params(scenario, serve)
    expected = expected_params(scenario.values)
    assert {key: params[key] for key in expected} == expected


def test_chart_passes_only_real_serve_flags(scenario: Rendered, serve: click.Command) -> None:
    unknown = set(flag_names(scenario.container["args"])) - serve_flags(serve)
    assert not unknown, f"not options of `osmo-router serve`: {sorted(unknown)}"
    # Each flag once: with two, the last would silently win.
    args = scenario.container["args"]
    chart_own = flag_names(args[: len(args) - len(scenario.values["extraArgs"])])
    assert len(chart_own) == len(set(chart_own)), chart_own


def test_chart_passes_every_required_flag() -> None:
    passed = {flag for overrides in SCENARIOS.values() for flag in flag_names(render(overrides).container["args"])}
    assert REQUIRED_SERVE_FLAGS - passed == set()


def test_extra_args_come_last_and_reach_the_router(serve: click.Command) -> None:
    rendered = render(SCENARIOS["tuned"])
    assert rendered.container["args"][-2:] == ["--max-sessions=20000", "--log-level=debug"]
    params = serve_params(rendered, serve)
    assert (params["max_sessions"], params["log_level"]) == (20000, "debug")


def test_tls_flags_point_into_the_mounted_secret(scenario: Rendered) -> None:
    args, tls = scenario.container["args"], scenario.values["grpc"]["tls"]
    mounts = {mount["name"]: mount for mount in scenario.container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in scenario.pod["spec"]["volumes"]}
    tls_args = [arg for arg in args if arg.startswith(("--tls-cert=", "--tls-key=", "--peer-tls-ca="))]
    if not tls["enabled"]:
        assert tls_args == [] and "tls" not in mounts and "tls" not in volumes
        return
    assert mounts["tls"] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
    assert volumes["tls"] == {"name": "tls", "secret": {"secretName": tls["secretName"]}}
    assert {"--tls-cert=/etc/router/tls/tls.crt", "--tls-key=/etc/router/tls/tls.key"} <= set(tls_args)
    assert all(arg.split("=", 1)[1].startswith(mounts["tls"]["mountPath"] + "/") for arg in tls_args)


def test_jwt_key_is_mounted_where_the_flag_points(scenario: Rendered, serve: click.Command) -> None:
    auth = scenario.values["auth"]
    mounts = {mount["name"]: mount for mount in scenario.container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in scenario.pod["spec"]["volumes"]}
    key_path = serve_params(scenario, serve)["jwt_public_key"]
    if not auth["publicKeySecret"]:
        assert key_path is None and "jwt-key" not in mounts and "jwt-key" not in volumes
        return
    assert mounts["jwt-key"] == {"name": "jwt-key", "mountPath": JWT_DIR, "readOnly": True}
    assert volumes["jwt-key"] == {"name": "jwt-key", "secret": {"secretName": auth["publicKeySecret"]}}
    assert key_path == f"{mounts['jwt-key']['mountPath']}/{auth['publicKeySecretKey']}"


def test_every_mount_has_its_volume(scenario: Rendered) -> None:
    mounts = {mount["name"]: mount for mount in scenario.container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in scenario.pod["spec"]["volumes"]}
    assert set(mounts) == set(volumes)
    # The root filesystem is read-only: Python needs a writable /tmp.
    assert scenario.container["securityContext"]["readOnlyRootFilesystem"] is True
    assert mounts["tmp"]["mountPath"] == "/tmp" and volumes["tmp"] == {"name": "tmp", "emptyDir": {}}


# --- ports and probes -----------------------------------------------------------------------


def test_ports_are_wired_from_value_to_flag_to_container_to_service(scenario: Rendered, serve: click.Command) -> None:
    """grpc.port -> --port -> containerPort `grpc` -> Service port `grpc`, all the same number; same for the others."""
    values, params = scenario.values, serve_params(scenario, serve)
    wanted = {"grpc": values["grpc"]["port"], "metrics": values["metrics"]["port"]}
    if values["ws"]["enabled"]:
        wanted["ws"] = values["ws"]["port"]
    flags = {"grpc": params["port"], "metrics": params["metrics_port"], "ws": params["ws_port"]}
    assert flags.items() >= wanted.items()
    container = {port["name"]: port for port in scenario.container["ports"]}
    assert {name: port["containerPort"] for name, port in container.items()} == wanted
    assert {port["protocol"] for port in container.values()} == {"TCP"}
    service = {port["name"]: port for port in scenario.one("Service")["spec"]["ports"]}
    assert {name: (port["port"], port["targetPort"]) for name, port in service.items()} == {
        name: (number, name) for name, number in wanted.items()
    }
    assert service["grpc"]["appProtocol"] == "grpc"
    assert service["metrics"]["appProtocol"] == "http"
    if "ws" in service:  # wss:// with the gRPC port's certificate
        assert service["ws"]["appProtocol"] == ("kubernetes.io/wss" if params["tls_enabled"] else "kubernetes.io/ws")


def test_ws_disabled_closes_the_port() -> None:
    rendered = render(SCENARIOS["ws-off"])
    assert [arg for arg in rendered.container["args"] if arg.startswith("--ws-port")] == ["--ws-port=-1"]
    assert {port["name"] for port in rendered.container["ports"]} == {"grpc", "metrics"}
    assert {port["name"] for port in rendered.one("Service")["spec"]["ports"]} == {"grpc", "metrics"}


def test_probes_hit_health_endpoints_on_the_metrics_port(scenario: Rendered) -> None:
    container = scenario.container
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes == {
        "livenessProbe": {"path": "/healthz", "port": "metrics"},
        "readinessProbe": {"path": "/readyz", "port": "metrics"},
    }
    assert "metrics" in {port["name"] for port in container["ports"]}


# --- scale-out ------------------------------------------------------------------------------


def test_scale_out_environment(scenario: Rendered, serve: click.Command) -> None:
    """Pod IP from the downward API; the Redis URL and the peer secret from values or Secrets, never argv."""
    redis, env = scenario.values["redis"], scenario.env
    if not redis["enabled"]:
        assert env == {}
        return
    assert set(env) == {"POD_IP", "OSMO_REDIS_URL", "OSMO_PEER_SECRET"}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    if redis["existingSecret"]:
        ref = {"name": redis["existingSecret"], "key": redis["existingSecretKey"]}
        assert env["OSMO_REDIS_URL"]["valueFrom"] == {"secretKeyRef": ref}
    else:
        assert env["OSMO_REDIS_URL"]["value"] == redis["url"]
    ref = {"name": redis["peer"]["secretName"], "key": redis["peer"]["secretKey"]}
    assert env["OSMO_PEER_SECRET"]["valueFrom"] == {"secretKeyRef": ref}
    assert not [arg for arg in scenario.container["args"] if arg.startswith("--peer-secret")]
    # ... which works because --peer-secret reads that variable.
    option = next(p for p in serve.params if p.name == "peer_secret")
    assert isinstance(option, click.Option) and option.envvar == "OSMO_PEER_SECRET"
    assert "--advertise-address=$(POD_IP):{}".format(scenario.values["grpc"]["port"]) in scenario.container["args"]
