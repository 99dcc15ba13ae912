"""The `attach` and `sessions` commands of osmo-net-client (kept apart from client/cli.py).

Both take the session flags of every command (router address, workflow, token, TLS...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from osmo_router.cli.options import exit_with, prefers_uvloop
from osmo_router.client.config import ClientConfig

Decorator = Callable[[Any], Any]


def register(
    group: click.Group, session_options: Decorator, client_config: Callable[[dict[str, Any]], ClientConfig]
) -> None:
    """Add `attach` and `sessions` to the osmo-net-client command group."""

    @group.command(name="attach")
    @session_options
    @click.option(
        "--tty/--no-tty",
        "-t",
        default=None,
        help="Raw terminal, resize and the escape key [default: when stdin is a terminal].",
    )
    @click.argument("key", metavar="SESSION_KEY")
    def attach_command(key: str, tty: bool | None, **options: Any) -> None:
        """Attach to a running exec session (see `sessions`); exits with the remote exit code.

        Only the session's owner may attach. Attaching to a session that is attached elsewhere takes
        it over: the other client exits (255, "the session was attached from another client").
        In a TTY session, Ctrl-] then d detaches again (exit 0); Ctrl-] twice sends one Ctrl-].
        Closing the terminal (or SIGTERM) detaches too, as closing a tmux window does.
        """
        from osmo_router.client.attach import run_attach

        if not key.strip():
            hint = "is empty: give the key `exec --detach` or `sessions` printed"
            raise click.BadParameter(hint, param_hint="SESSION_KEY")
        config = client_config(options)
        exit_with(run_attach(config, key, tty), prefer_uvloop=prefers_uvloop(config.dial.grpc_channel))

    @group.command(name="sessions")
    @session_options
    @click.option("--json", "json_output", is_flag=True, help="One JSON object per session and line.")
    def sessions_command(json_output: bool, **options: Any) -> None:
        """List your live resumable sessions on the workflow: key, task, command, attached or detached, since."""
        from osmo_router.client.attach import run_sessions

        config = client_config(options)
        exit_with(run_sessions(config, json_output), prefer_uvloop=prefers_uvloop(config.dial.grpc_channel))


__all__ = ["register"]
