"""Fixtures: a router and an agent as real processes on loopback."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator

import pytest

from tests.harness import AgentProc, Router


def _nothing(signum: int, frame: object) -> None:
    """Stands in for an inherited ignore (see pytest_configure)."""


def pytest_configure(config: pytest.Config) -> None:
    """The processes the tests start take Ctrl-C, Ctrl-\\ and the hang-up as from an interactive shell.

    Run by `nohup` or as a background job of a script, pytest starts with SIGINT and SIGQUIT (and
    SIGHUP) ignored, every client it starts inherits that through exec, and the tests that send a
    client Ctrl-C fail (a fresh clone run that way failed seven). A handled signal is reset by exec:
    pytest keeps Ctrl-C as usual and shrugs off the others as it would have.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal works there only (an xdist worker's session runs there too)
    for sig, handler in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGQUIT, _nothing),
        (signal.SIGHUP, _nothing),
    ):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)


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
