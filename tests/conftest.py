"""Fixtures: a router and an agent as real processes on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.harness import AgentProc, Router


@pytest.fixture
def router() -> Iterator[Router]:
    """A plaintext, unauthenticated router on a free loopback port."""
    proc = Router()
    yield proc
    proc.stop()


@pytest.fixture
def workflow() -> str:
    """A fresh workflow id."""
    return f"wf-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def agent(router: Router, workflow: str) -> Iterator[AgentProc]:
    """An agent registered with `router` for `workflow`."""
    proc = AgentProc(router.address, workflow)
    yield proc
    proc.stop()


@pytest.fixture
def client_args(router: Router, workflow: str) -> list[str]:
    """The common flags of osmo-net-client for `router` and `workflow`."""
    return ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
