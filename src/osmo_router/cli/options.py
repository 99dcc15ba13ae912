"""Command-line plumbing shared by `osmo-router` and `osmo-net-client`.

Boolean flags are declared as click's `--flag/--no-flag`; `normalize_bool_flags` also accepts the
Go-style `--flag=false` / `--flag=true` forms of the original tools by rewriting them first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import click

from osmo_router.cli.durations import parse_bool, parse_duration
from osmo_router.dial.config import NATIVE_CHANNEL

T = TypeVar("T")


class DurationType(click.ParamType):  # type: ignore[type-arg]
    """A duration such as 30s, 5m or 1h30m, converted to seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """Seconds, or a usage error."""
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


DURATION = DurationType()


def normalize_bool_flags(args: Sequence[str], names: Sequence[str]) -> list[str]:
    """Rewrite `--name=VALUE` for boolean flags into `--name` or `--no-name`, up to a `--`."""
    out: list[str] = []
    wanted = set(names)
    for index, arg in enumerate(args):
        if arg == "--":
            out.extend(args[index:])
            break
        if arg.startswith("--") and "=" in arg:
            name, _, value = arg[2:].partition("=")
            if name in wanted:
                try:
                    out.append(f"--{name}" if parse_bool(value) else f"--no-{name}")
                except ValueError:
                    raise click.UsageError(f"--{name} takes true or false, not {value!r}") from None
                continue
        out.append(arg)
    return out


def bool_option_names(command: click.Command) -> list[str]:
    """Names of every `--x/--no-x` flag of a command and its subcommands."""
    names: list[str] = []
    for param in command.params:
        if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
            names.extend(opt[2:] for opt in param.opts if opt.startswith("--"))
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names.extend(bool_option_names(sub))
    return names


def run_async(coro: Coroutine[Any, Any, T], *, prefer_uvloop: bool = False) -> T:
    """Run a coroutine on a fresh event loop: uvloop (when installed) if preferred, else the standard one.

    OSMO_UVLOOP=1 / OSMO_UVLOOP=0 override the preference either way. `osmo-router serve` prefers
    uvloop (the router relays markedly more on it), and so do the CLI and the agent when they dial
    with the native h2 channel (`prefers_uvloop`): uvloop takes about a quarter off their CPU per
    message (docs/bench/NOTES.md, issue 18). On grpc.aio (`--grpc-channel grpcio`) they keep the
    standard loop: an exec client on uvloop with grpc.aio crashed (SIGSEGV) now and then under load.
    """
    choice = os.environ.get("OSMO_UVLOOP", "")
    if choice == "1" or (prefer_uvloop and choice != "0"):
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)  # type: ignore[no-any-return,unused-ignore]
    import asyncio  # here: commands that never run a loop (`osmo-net-client rsync`) start faster

    return asyncio.run(coro)


#: Exit status of a command stopped by Ctrl-C before it handled the signal itself (as a shell reports SIGINT).
EXIT_INTERRUPTED = 130


def exit_with(coro: Coroutine[Any, Any, int], *, prefer_uvloop: bool = False) -> NoReturn:
    """Run a command's coroutine (`run_async`) and exit with its status.

    Ctrl-C before the command took SIGINT over (while it dials the router, say) ends it with 130 and
    nothing more, where click would print "Aborted!" and exit 1.
    """
    try:
        code = run_async(coro, prefer_uvloop=prefer_uvloop)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)


def prefers_uvloop(grpc_channel: str) -> bool:
    """Whether a CLI or agent dialling with `grpc_channel` runs on uvloop by default (see `run_async`)."""
    return grpc_channel == NATIVE_CHANNEL


def log_options(f: Any) -> Any:
    """--log-format and --log-level, the logging flags of every `osmo-router` command."""
    f = click.option(
        "--log-format",
        type=click.Choice(["auto", "json", "text"]),
        default="auto",
        show_default=True,
        help="JSON lines (production) or text (terminals); auto picks by stderr.",
    )(f)
    return click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        default="info",
        show_default=True,
        help="Log verbosity.",
    )(f)
