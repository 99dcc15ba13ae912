"""`osmo-router session create|get|terminate`: one set of dial flags, each command its own parameters."""

from __future__ import annotations

from typing import Any

import click
from click.testing import CliRunner

from osmo_router.cli.session import session
from osmo_router.dial.options import dial_options


def _params(command: click.Command) -> set[str]:
    return {param.name or "" for param in command.params}


@dial_options
def _dialled(**options: Any) -> None:
    """Only the dial flags."""


DIAL = _params(click.command()(_dialled))


def test_every_session_command_takes_the_dial_flags_and_its_own_parameters() -> None:
    commands = session.commands
    assert set(commands) == {"create", "get", "terminate"}
    for name, command in commands.items():
        assert DIAL <= _params(command), name
    assert _params(commands["get"]) - DIAL == {"key"} == _params(commands["terminate"]) - DIAL
    create = _params(commands["create"]) - DIAL
    assert {"workflow_id", "operation", "session_key", "ttl", "port", "path", "command"} <= create
    assert "key" not in create


def test_a_refused_combination_exits_2_before_dialling() -> None:
    # Port 1 on loopback: were the router dialled, the call would fail with UNAVAILABLE and exit 1.
    args = ["create", "--router-address", "127.0.0.1:1", "--no-tls", "--workflow-id", "wf", "--operation", "exec"]
    result = CliRunner().invoke(session, [*args, "--port", "80"])
    assert result.exit_code == 2 and "takes no parameters of another operation" in result.output
    missing = CliRunner().invoke(session, ["get", "--router-address", "127.0.0.1:1", "--no-tls"])
    assert missing.exit_code == 2 and "Missing argument 'KEY'" in missing.output
