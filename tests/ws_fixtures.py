"""Module-scoped fixtures shared by the WebSocket end-to-end tests (test_ws_e2e, test_ws_forward_e2e).

One router and one gRPC agent per test module: starting them per test would dominate these tests'
time, and each test uses its own workflows and keys. A module uses them by importing the fixture
functions (`from tests.ws_fixtures import module_grpc_workflow, module_router`): pytest then
registers them in that module, under the names `router` and `grpc_workflow`, where they take
precedence over the function-scoped `router` of conftest.py. The functions have other names than
the fixtures so that a test's `router` argument does not shadow an import.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.harness import AgentProc, Router


@pytest.fixture(scope="module", name="router")
def module_router() -> Iterator[Router]:
    """One router for the module (each test uses its own workflows and keys)."""
    proc = Router()
    yield proc
    proc.stop()


@pytest.fixture(scope="module", name="grpc_workflow")
def module_grpc_workflow(router: Router) -> Iterator[str]:
    """A workflow served by a gRPC agent."""
    workflow = f"wf-grpc-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow)
    yield workflow
    agent.stop()
