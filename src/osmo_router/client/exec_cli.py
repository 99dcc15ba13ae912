"""The `exec` command of osmo-net-client (kept apart from client/cli.py), and its --env values."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import click

from osmo_router.cli.options import exit_with, prefers_uvloop
from osmo_router.client.config import ClientConfig
from osmo_router.client.notice import say
from osmo_router.client.words import require_utf8
from osmo_router.io.memtune import tune_for_bulk

Decorator = Callable[[Any], Any]


def register(
    group: click.Group, session_options: Decorator, client_config: Callable[[dict[str, Any]], ClientConfig]
) -> None:
    """Add `exec` to the osmo-net-client command group."""

    # Options end at COMMAND's first word: what follows is COMMAND's (`exec ls -d /` is not --detach), as
    # with ssh and docker exec; an unknown option before it is an error, not a command to run.
    @group.command(name="exec", context_settings={"allow_interspersed_args": False})
    @session_options
    @click.option(
        "--tty/--no-tty",
        "-t",
        default=False,
        help="Allocate a terminal (raw mode, resize, Ctrl-C); as with ssh -t, not when stdin is not a terminal "
        "(but with --detach).",
    )
    @click.option("--stdin/--no-stdin", "-i", default=True, hidden=True, help="Accepted for kubectl compatibility.")
    @click.option(
        "--detach",
        "-d",
        is_flag=True,
        help="Start the session and detach at once: print its key (attach with `osmo-net-client attach KEY`).",
    )
    @click.option(
        "--env",
        "-e",
        "env",
        multiple=True,
        metavar="NAME=VALUE",
        help="Set an environment variable for COMMAND (repeatable); NAME alone passes this shell's value, "
        "as docker exec -e does.",
    )
    @click.option(
        "--workdir",
        "-w",
        default="",
        metavar="DIR",
        help="Working directory of COMMAND (relative: to the agent's); default: the agent's.",
    )
    @click.argument("command", nargs=-1, type=click.UNPROCESSED)
    def exec_command(
        tty: bool,
        stdin: bool,
        detach: bool,
        env: tuple[str, ...],
        workdir: str,
        command: tuple[str, ...],
        **options: Any,
    ) -> None:
        """Run COMMAND in the container (default: its shell); exits with the remote exit code.

        Options go before COMMAND (or before `--`): everything from COMMAND's first word on is COMMAND's.

        In a TTY session, Ctrl-] then d detaches (the session keeps running; exit 0); Ctrl-] twice
        sends one Ctrl-]. Closing the terminal (or SIGTERM) hangs the session up, as with ssh.
        """
        from osmo_router.client.exec import run_exec

        require_utf8("COMMAND", command)
        require_utf8("--workdir", [workdir])
        environment = parse_env(env)
        config = client_config(options)
        if tty and not detach and not os.isatty(0):
            # As ssh -t (OpenSSH ssh.c: no tty "if (!isatty(fileno(stdin)) && !force_tty_flag)", with "Pseudo-
            # terminal will not be allocated because stdin is not a terminal."): with piped input a remote
            # terminal cannot be ended (its EOF is a ^D byte, lost or taken as input by whatever reads it),
            # so `echo cmd | exec -t -- bash` would never return.
            # A detached session keeps its terminal: it is for attaching to later.
            say("stdin is not a terminal: running without one (as ssh -t)", "exec", tty=False)
            tty = False
        tune_for_bulk()  # piped input and output move in frames of up to 1 MiB (memtune)
        exit_with(
            run_exec(config, list(command), tty, detach=detach, env=environment, workdir=workdir),
            prefer_uvloop=prefers_uvloop(config.dial.grpc_channel),
        )


def parse_env(values: Sequence[str]) -> dict[str, str]:
    """`--env` values as a mapping (click.UsageError for a malformed one); NAME alone takes the local value."""
    environment: dict[str, str] = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep:
            if name not in os.environ:
                raise click.UsageError(f"--env {name!r}: {name} is not set here (give NAME=VALUE)")
            setting = os.environ[name]
        if not name or "\0" in name or "\0" in setting:
            raise click.UsageError(f"--env {value!r} is not NAME=VALUE (a non-empty NAME, no NUL)")
        require_utf8("--env", [name, setting])
        environment[name] = setting
    return environment
