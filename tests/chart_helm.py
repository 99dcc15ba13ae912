"""The chart tests' access to the real helm: render charts/router-grpc for given values, lint it.

scripts/install puts helm in .venv/bin (from the npm package that ships it); one on PATH does as
well. Without helm the chart tests fail, saying so: a chart test that cannot run is not a pass.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "router-grpc"
RELEASE = "router-grpc"  # named like the chart, as the README installs it
NAMESPACE = "osmo"
# The chart refuses to render without a key to verify tokens with; the tests name one.
DEPLOYABLE = {"auth.publicKeySecret": "router-jwt"}
# What the kubelet puts in the environment variables the chart defines, for the tests' expansion.
POD_IP = "10.1.2.3"


@functools.cache
def helm_binary() -> str:
    installed = ROOT / ".venv" / "bin" / "helm"
    found = str(installed) if installed.is_file() else shutil.which("helm")
    if found is None:
        pytest.fail(f"helm is needed by the chart tests: run scripts/install (it puts helm in {installed})")
    return found


def helm(*args: str, values: Mapping[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm; `values` (nested, as in values.yaml) go in as a values file on stdin."""
    command = [helm_binary(), *args]
    if values is not None:
        command += ["--values", "-"]
    return subprocess.run(
        command, input=yaml.safe_dump(dict(values or {})), capture_output=True, text=True, timeout=60, check=False
    )


def nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}"""
    out: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def merged(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """values.yaml with `overrides` (dotted keys) over it, merged as helm merges a values file."""

    def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for key, value in top.items():
            both_maps = isinstance(value, Mapping) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both_maps else copy.deepcopy(value)
        return out

    return merge(default_values(), nested(overrides))


@functools.cache
def default_values() -> dict[str, Any]:
    data = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(data, dict)
    return data


@dataclass(frozen=True)
class Rendered:
    values: dict[str, Any]  # what the chart was rendered with (values.yaml plus the overrides)
    docs: list[dict[str, Any]]

    def changed_values(self) -> dict[str, Any]:
        """The top-level values that differ from values.yaml: a values file for other helm commands."""
        return {key: value for key, value in self.values.items() if value != default_values()[key]}

    def kinds(self) -> list[str]:
        return sorted(doc["kind"] for doc in self.docs)

    def get(self, kind: str) -> dict[str, Any] | None:
        found = [doc for doc in self.docs if doc["kind"] == kind]
        assert len(found) <= 1, f"{len(found)} manifests of kind {kind}"
        return found[0] if found else None

    def one(self, kind: str) -> dict[str, Any]:
        doc = self.get(kind)
        assert doc is not None, f"no {kind} rendered; kinds: {self.kinds()}"
        return doc

    @property
    def pod(self) -> dict[str, Any]:
        template: dict[str, Any] = self.one("Deployment")["spec"]["template"]
        return template

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["spec"]["containers"]
        assert [c["name"] for c in containers] == ["router"]
        container: dict[str, Any] = containers[0]
        return container

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {var["name"]: var for var in self.container.get("env", [])}

    def expanded_args(self) -> list[str]:
        """The container's args as the router gets them: $(VAR) expanded from the container's env.

        A secret's value stands in as `secret:NAME/KEY`. The kubelet leaves a $(VAR) it has no
        variable for as it is, so one that the env does not declare is an error here.
        """

        def value(match: re.Match[str]) -> str:
            var = self.env.get(match.group(1))
            assert var is not None, f"$({match.group(1)}) in the args but not in the container's env"
            if "value" in var:
                return str(var["value"])
            source = var["valueFrom"]
            if "fieldRef" in source:
                assert source["fieldRef"]["fieldPath"] == "status.podIP"
                return POD_IP
            ref = source["secretKeyRef"]
            return f"secret:{ref['name']}/{ref['key']}"

        return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, str(arg)) for arg in self.container["args"]]


@functools.cache
def _render(overrides_json: str, release: str) -> Rendered:
    overrides = json.loads(overrides_json)
    result = helm("template", release, str(CHART), "--namespace", NAMESPACE, values=nested(overrides))
    assert result.returncode == 0, f"helm template failed for {overrides}:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    assert docs and all(isinstance(doc, dict) for doc in docs), result.stdout
    return Rendered(merged(overrides), docs)


def render(overrides: Mapping[str, Any] | None = None, release: str = RELEASE, base: bool = True) -> Rendered:
    """`helm template` of the chart with values.yaml, DEPLOYABLE (if `base`) and `overrides` (dotted keys)."""
    combined = {**(DEPLOYABLE if base else {}), **(overrides or {})}
    return _render(json.dumps(combined, sort_keys=True), release)


def render_error(overrides: Mapping[str, Any]) -> str:
    """What helm says when it refuses to render these values (it must refuse)."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=nested(overrides))
    assert result.returncode != 0, f"helm rendered {overrides}:\n{result.stdout}"
    return result.stderr


# Every branch of the templates, each in at least one scenario, and the ones that interact (TLS with
# the WebSocket port's protocol and the peers' CA) together. Dotted keys over values.yaml + DEPLOYABLE.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "plaintext": {"grpc.tls.enabled": False},
    "ws-off": {"ws.enabled": False},
    "ws-off-plaintext": {"ws.enabled": False, "grpc.tls.enabled": False},
    "ws-port": {"ws.port": 8123, "grpc.port": 50052, "metrics.port": 9090},
    "jwks-only": {"auth.publicKeySecret": "", "auth.jwksUrl": "https://issuer.example/.well-known/jwks.json"},
    "jwt-both": {
        "auth.jwksUrl": "https://issuer.example/jwks",
        "auth.jwksCacheTtl": "90s",
        "auth.publicKeySecretKey": "key.pem",
        "auth.audience": "osmo",
    },
    "scale-out": {
        "replicaCount": 3,
        "redis.enabled": True,
        "redis.url": "redis://redis:6379/0",
        "redis.peer.secretName": "router-grpc-peer",
        "redis.directoryTtl": "90s",
    },
    "scale-out-secrets-peer-tls": {
        "redis.enabled": True,
        "redis.existingSecret": "redis-auth",
        "redis.existingSecretKey": "uri",
        "redis.peer.secretName": "router-grpc-peer",
        "redis.peer.secretKey": "shared",
        "redis.peer.tlsServerName": "router.example.com",
        "redis.peer.tlsCaKey": "ca.crt",
    },
    "scale-out-plaintext": {
        "grpc.tls.enabled": False,
        "redis.enabled": True,
        "redis.url": "redis://redis:6379/0",
        "redis.peer.secretName": "router-grpc-peer",
        "redis.peer.tlsCaKey": "ca.crt",  # no TLS, so no CA: the chart must leave --peer-tls-ca out
    },
    "service-monitor": {
        "metrics.serviceMonitor.enabled": True,
        "metrics.serviceMonitor.interval": "15s",
        "metrics.serviceMonitor.labels": {"release": "prometheus"},
    },
    "single-replica": {"replicaCount": 1},
    "pdb-off": {"podDisruptionBudget.enabled": False},
    "tuned": {
        "grpc.timeouts": {"sessionTtl": "2h", "rendezvous": "90s", "flowControl": "45s", "drain": "40s"},
        "grpc.flowControlBuffer": 64,
        "terminationGracePeriodSeconds": 60,
        "extraArgs": ["--max-sessions=20000", "--log-level=debug"],
        "replicaCount": 4,
        "podDisruptionBudget.minAvailable": 2,
    },
    "everything-else": {
        "fullnameOverride": "osmo-gateway",
        "nameOverride": "gateway",
        "image": {"repository": "registry.example/osmo-router", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry"}],
        "podAnnotations": {"example.com/team": "osmo"},
        "service.type": "LoadBalancer",
        "service.annotations": {"example.com/lb": "internal"},
        "nodeSelector": {"pool": "routers"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "router", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app": "gateway"}},
                        },
                    }
                ]
            }
        },
        "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "podSecurityContext": {"runAsUser": 20002, "runAsGroup": 20002, "fsGroup": 20002},
        "securityContext": {"privileged": False},
    },
}
