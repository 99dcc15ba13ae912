"""`osmo-net-client`: exec, port-forward and rsync through the router.

Every flag can also come from its `OSMO_*` environment variable. The older single-command form
`osmo-net-client --operation=exec|portforward|rsync ...` is rewritten to the subcommand form.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click

from osmo_router import __version__
from osmo_router.cli.logs import setup_logging
from osmo_router.cli.options import (
    DURATION,
    bool_option_names,
    exit_with,
    normalize_bool_flags,
    prefers_uvloop,
)
from osmo_router.client import attach_cli, exec_cli
from osmo_router.client.binds import DEFAULT_ADDRESS
from osmo_router.client.config import ClientConfig
from osmo_router.client.words import require_utf8
from osmo_router.dial.options import dial_config, dial_options
from osmo_router.io.memtune import tune_for_bulk
from osmo_router.io.stdfds import sanitise_std_fds

LEGACY_OPERATIONS = {"exec": "exec", "portforward": "port-forward", "port-forward": "port-forward", "rsync": "rsync"}


def _session_options(f: Any) -> Any:
    for decorator in reversed(
        [
            *([dial_options]),
            click.option(
                "--workflow-id",
                envvar="OSMO_WORKFLOW_ID",
                required=True,
                help="Workflow to reach [env OSMO_WORKFLOW_ID].",
            ),
            click.option("--task", envvar="OSMO_TASK", default="", help="Task within the workflow [env OSMO_TASK]."),
            click.option(
                "--session-key",
                envvar="OSMO_SESSION_KEY",
                default="",
                help="Session key issued by an orchestrator [env OSMO_SESSION_KEY].",
            ),
            click.option(
                "--legacy-backend/--no-legacy-backend",
                envvar="OSMO_LEGACY_BACKEND",
                default=False,
                help="The --session-key belongs to an old OSMO backend (osmo-ctrl), which learned the command, "
                "port or rsync module from the OSMO service: speak the old protocol to it [env OSMO_LEGACY_BACKEND].",
            ),
            click.option(
                "--cookie",
                envvar="OSMO_COOKIE",
                default=None,
                help="Load-balancer cookie, passed on as metadata [env OSMO_COOKIE].",
            ),
            click.option(
                "--transport",
                envvar="OSMO_TRANSPORT",
                type=click.Choice(["grpc", "ws"]),
                default=None,
                help="Transport to the router [env OSMO_TRANSPORT]; unset: gRPC (or --grpc-percent), "
                "falling back to WebSocket when the gRPC port is unreachable.",
            ),
            click.option(
                "--grpc-percent",
                envvar="OSMO_GRPC_PERCENT",
                type=click.IntRange(0, 100),
                default=None,
                help="Canary rollout: percentage of users (sticky per user) on gRPC, the rest on WebSocket.",
            ),
            click.option(
                "--ws-address",
                envvar="OSMO_WS_ADDRESS",
                default=None,
                help="The router's WebSocket endpoint, host:port or ws(s):// URL [default: router host, port 8000].",
            ),
            click.option(
                "--connect-timeout",
                type=DURATION,
                default="20s",
                show_default=True,
                help="How long to wait for the router.",
            ),
            click.option(
                "--resume-grace",
                envvar="OSMO_RESUME_GRACE",
                type=DURATION,
                default="300s",
                show_default=True,
                help="After a break (network cut, router restart) keep resuming the session for up to this long "
                "(at most the agent's own grace); nothing sent is lost. 0: a break ends the session. gRPC "
                "transport only [env OSMO_RESUME_GRACE].",
            ),
            click.option(
                "--log-level",
                type=click.Choice(["debug", "info", "warning", "error"]),
                default="warning",
                show_default=True,
                help="Log verbosity (stderr).",
            ),
        ]
    ):
        f = decorator(f)
    return f


def client_config(options: dict[str, Any]) -> ClientConfig:
    """A ClientConfig from the common flags (popped from `options`)."""
    setup_logging(options.pop("log_level"), "text")
    dial = dial_config(options)
    if options.get("legacy_backend") and not options.get("session_key"):
        raise click.UsageError("--legacy-backend needs --session-key: the key the OSMO service gave the old backend")
    return ClientConfig(
        dial=dial,
        workflow_id=options.pop("workflow_id"),
        task=options.pop("task"),
        session_key=options.pop("session_key"),
        connect_timeout=options.pop("connect_timeout"),
        transport=options.pop("transport"),
        grpc_percent=options.pop("grpc_percent"),
        ws_address=options.pop("ws_address"),
        legacy_backend=options.pop("legacy_backend"),
        resume_grace=options.pop("resume_grace"),
    )


def _uvloop(config: ClientConfig) -> bool:
    """Whether this client runs on uvloop unless OSMO_UVLOOP says otherwise (cli/options.py run_async)."""
    return prefers_uvloop(config.dial.grpc_channel)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="osmo-net-client")
def main_group() -> None:
    """osmo-net-client: exec, port-forward and rsync into a workload container through osmo-router."""


@main_group.command(name="port-forward")
@_session_options
@click.option(
    "--protocol",
    type=click.Choice(["tcp", "udp"]),
    default="tcp",
    show_default=True,
    help="What every SPEC forwards: TCP connections, or UDP datagrams (one stream per port for all local senders).",
)
@click.option(
    "--address",
    "addresses",
    multiple=True,
    default=[DEFAULT_ADDRESS],
    show_default=True,
    help=(
        "Local address to listen on: IPv4 or IPv6, or localhost (127.0.0.1 and ::1; fails only if neither "
        "binds, as kubectl); repeatable, or comma-separated as kubectl takes them."
    ),
)
@click.option("--json", "json_output", is_flag=True, help="Print one JSON object per line instead of text.")
@click.option("--reconnect/--no-reconnect", default=False, help="Wait for the router/agent to come back.")
@click.option("--remote-port", type=int, default=None, hidden=True, help="Older form: the remote port.")
@click.option("--local-port", type=int, default=None, hidden=True, help="Older form: the local port.")
@click.argument("specs", nargs=-1)
def port_forward_command(
    protocol: str,
    addresses: tuple[str, ...],
    json_output: bool,
    reconnect: bool,
    remote_port: int | None,
    local_port: int | None,
    specs: tuple[str, ...],
    **options: Any,
) -> None:
    """Forward local ports to ports in the container. SPEC is LOCAL:REMOTE, REMOTE or :REMOTE."""
    from osmo_router.client.forward import run_port_forward

    all_specs = list(specs)
    if remote_port is not None:
        all_specs.append(f"{local_port if local_port is not None else remote_port}:{remote_port}")
    if not all_specs:
        raise click.UsageError("give at least one SPEC (LOCAL:REMOTE, REMOTE or :REMOTE)")
    config = client_config(options)
    tune_for_bulk()  # connections stream in 1 MiB frames (memtune)
    exit_with(
        run_port_forward(
            config,
            all_specs,
            protocol=protocol,
            addresses=list(addresses),
            json_output=json_output,
            reconnect=reconnect,
        ),
        prefer_uvloop=_uvloop(config),
    )


class _RsyncCommand(click.Command):
    """The rsync command: everything after `--` is kept apart, to be passed to rsync unchanged."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Split off the rsync options after `--` before click parses the rest."""
        if "--" in args:
            cut = args.index("--")
            ctx.meta["rsync_extra_args"] = args[cut + 1 :]
            args = args[:cut]
        words = list(args)  # (click's parser consumes the list it is given)
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as err:
            if err.possibilities:  # a typo of one of ours: click's "Did you mean" says it
                raise
            # rsync's users type `rsync -av SRC DST`: say where rsync's own options go.
            typed = next((word for word in words if _spells(word, err.option_name)), err.option_name)
            hint = f"rsync's own options go after `--`: osmo-net-client rsync SRC... DST -- {typed}"
            raise click.NoSuchOption(err.option_name, f"{err.message} ({hint})", ctx=err.ctx) from None


def _spells(arg: str, option: str) -> bool:
    """Whether the word `arg` holds `option`: itself, `--opt=VALUE`, or a bundle of short options (`-avz`)."""
    if option.startswith("--"):
        return arg.split("=", 1)[0] == option
    return arg.startswith(option) and not arg.startswith("--")


@main_group.command(name="rsync", cls=_RsyncCommand)
@_session_options
@click.option("--delete", is_flag=True, help="Delete files on the receiving side that the sender lacks.")
@click.option("--exclude", multiple=True, help="Exclude files matching PATTERN (repeatable).")
@click.option("--progress", is_flag=True, help="Show progress.")
@click.option("--bwlimit", default=None, help="Bandwidth limit, as rsync's --bwlimit (none by default).")
@click.option("--rsync-binary", default="rsync", show_default=True, help="Local rsync executable.")
@click.argument("paths", nargs=-1)
def rsync_command(
    delete: bool,
    exclude: tuple[str, ...],
    progress: bool,
    bwlimit: str | None,
    rsync_binary: str,
    paths: tuple[str, ...],
    **options: Any,
) -> None:
    """Synchronise files with the container: SRC... DST [-- RSYNC_OPTIONS], the remote side written :PATH
    (:PATH alone lists it, as `rsync host:PATH` does).

    Runs the local rsync (-a) with this client as its remote shell; exits with rsync's status.
    """
    from osmo_router.client.rsync import check_extra_args, plan_paths, run_rsync

    plan_paths(paths, legacy=bool(options.get("legacy_backend")))
    require_utf8("remote path", [path for path in paths if path.startswith(":")])
    check_extra_args(click.get_current_context().meta.get("rsync_extra_args", []))
    config = client_config(options)
    sys.exit(
        run_rsync(
            config,
            list(paths),
            delete=delete,
            exclude=list(exclude),
            progress=progress,
            bwlimit=bwlimit,
            rsync_binary=rsync_binary,
            extra_args=click.get_current_context().meta.get("rsync_extra_args", []),
        )
    )


@main_group.command(
    name="rsync-shell",
    hidden=True,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@_session_options
@click.argument("remote_command", nargs=-1, type=click.UNPROCESSED)
def rsync_shell_command(remote_command: tuple[str, ...], **options: Any) -> None:
    """The remote shell of `rsync`: [-l USER] HOST rsync --server ... (settings from OSMO_* variables)."""
    import signal

    from osmo_router.client.rsync_shell import run_rsync_shell

    # Ctrl-C also reaches the local rsync, which then closes our stdin: that ends the session cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = client_config(options)
    tune_for_bulk()  # rsync's data moves in 1 MiB frames (memtune)
    exit_with(run_rsync_shell(config, list(remote_command)), prefer_uvloop=_uvloop(config))


attach_cli.register(main_group, _session_options, client_config)
exec_cli.register(main_group, _session_options, client_config)


def rewrite_legacy_operation(args: list[str]) -> list[str]:
    """Turn `--operation=X ...` (or `--operation X`) into the subcommand form `X ...`."""
    for index, arg in enumerate(args):
        if arg == "--":
            break
        value = None
        if arg.startswith("--operation="):
            value, drop = arg.split("=", 1)[1], 1
        elif arg == "--operation" and index + 1 < len(args):
            value, drop = args[index + 1], 2
        if value is not None:
            if value not in LEGACY_OPERATIONS:
                raise click.UsageError(f"--operation must be exec, portforward or rsync, not {value!r}")
            rest = args[:index] + args[index + drop :]
            return [LEGACY_OPERATIONS[value], *rest]
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of `osmo-net-client`."""
    sanitise_std_fds()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = rewrite_legacy_operation(args)
        args = normalize_bool_flags(args, bool_option_names(main_group))
    except click.UsageError as err:
        err.show()
        sys.exit(2)
    try:
        main_group.main(args=args, prog_name="osmo-net-client")
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        # Skip interpreter finalisation: the stdin reader thread may still be blocked in read(),
        # and tearing down gRPC's threads under it is slow and can crash; there is nothing left to clean.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
