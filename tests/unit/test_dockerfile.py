"""Static checks of the Dockerfile (no docker binary here): stages, user, packages, entrypoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


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
