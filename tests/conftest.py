"""Fixtures: a router and an agent as real processes on loopback."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from osmo_router.agent.process import default_signals_for_commands
from tests.harness import AgentProc, Router


def pytest_configure(config: pytest.Config) -> None:
    """The processes the tests start take Ctrl-C, Ctrl-\\ and the hang-up as from an interactive shell.

    Run by `nohup` or as a background job of a script, pytest starts with SIGINT and SIGQUIT (and
    SIGHUP) ignored, every client it starts inherits that through exec, and the tests that send a
    client Ctrl-C fail (a fresh clone run that way failed seven). The agent's own remedy does it:
    pytest still shrugs those signals off, what it starts does not.
    """
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        default_signals_for_commands()


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
