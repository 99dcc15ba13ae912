"""`osmo-net-client rsync`: the user's own rsync, with the router as its transport.

The local rsync runs with `osmo-net-client rsync-shell` as its remote shell (`-e`), so every rsync
feature works end to end: the delta algorithm, `-a`, `--delete`, filters, `--partial`, `--progress`.
The agent runs `rsync --server` in the container. A remote path is written `:PATH`.

Choices:
- `-a` by default, without `-z`: compression costs more CPU than it saves on fast links (measured by
  bench/bench_rsync.py); add `-- -z` for a slow link.
- Options after `--` go to rsync unchanged (`osmo-net-client rsync SRC :DST -- --partial -c`).
- The dial settings (router address, workflow, token, TLS files) reach the remote shell through
  OSMO_* environment variables, never its argv, so the token does not show in `ps`.
- Exit status: rsync's own. When rsync is missing locally: 127 (the shell's "command not found")
  with an install hint; when it is missing in the container the remote shell exits 127 and rsync
  reports "remote command not found (code 127)"; when the session cannot be made or breaks, 255
  (like ssh). The remote shell records those two in a private status file, because rsync may notice
  the closed pipe before the shell's exit status and report a generic protocol error (12) instead.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace

import click

from osmo_router.client.config import ClientConfig
from osmo_router.client.notice import say
from osmo_router.client.rsync_shell import RSYNC_EXIT_SETTLE, STATUS_FILE_ENV

#: Exit status when the local rsync is missing.
EXIT_RSYNC_MISSING = 127
#: Exit status when --rsync-binary names a file that cannot be run (a shell's 126).
EXIT_RSYNC_NOT_RUNNABLE = 126
#: Host name given to rsync for the container; the remote shell ignores it (the OSMO_* settings say where to go).
REMOTE_HOST = "osmo"
LOCAL_INSTALL_HINT = (
    "install it: apt-get install rsync (Debian/Ubuntu), dnf install rsync (Fedora/RHEL), "
    "brew install rsync (macOS), or give its path with --rsync-binary"
)
#: Variables the remote shell reads its settings from (set or removed for each run).
SHELL_ENV = (
    "OSMO_ROUTER_ADDRESS",
    "OSMO_WORKFLOW_ID",
    "OSMO_TASK",
    "OSMO_SESSION_KEY",
    "OSMO_TOKEN",
    "OSMO_COOKIE",
    "OSMO_TLS",
    "OSMO_TLS_CA",
    "OSMO_TLS_CERT",
    "OSMO_TLS_KEY",
    "OSMO_TLS_SERVER_NAME",
    "OSMO_GRPC_CHANNEL",
    "OSMO_TRANSPORT",
    "OSMO_WS_ADDRESS",
    "OSMO_GRPC_PERCENT",
    "OSMO_LEGACY_BACKEND",
    "OSMO_RESUME_GRACE",
)


#: An old OSMO backend's default rsync module and its directory (OSMO rsync.py DEFAULT_MODULE_INFO).
LEGACY_MODULE = "osmo"
LEGACY_MODULE_PATH = "/osmo/run/workspace"


def plan_paths(paths: Sequence[str], legacy: bool = False) -> list[str]:
    """rsync's path arguments for SRC... DST, exactly one side written `:PATH` (or `:PATH` alone: a listing);
    raises click.UsageError.

    `legacy`: the container is an old OSMO backend serving an rsync daemon: the remote side becomes
    `HOST::MODULE/PATH` (rsync's daemon over a remote shell; see client/legacy.py).
    """
    if len(paths) == 1 and paths[0].startswith(":"):
        return [_remote(paths[0], legacy)]  # a remote source alone: rsync lists it (as `rsync host:dir/`)
    if len(paths) < 2:
        raise click.UsageError("give SRC... DST; the container's side is written :PATH (e.g. :/workspace/data)")
    *sources, dest = paths
    upload = dest.startswith(":")
    if upload and any(s.startswith(":") for s in sources):
        raise click.UsageError("exactly one side may be remote: the destination is :PATH, so the sources must be local")
    if not upload and not all(s.startswith(":") for s in sources):
        if any(s.startswith(":") for s in sources):
            raise click.UsageError("exactly one side may be remote: give only :PATH sources, or a :PATH destination")
        raise click.UsageError("one side must be remote: write the container's path with a leading ':' (:/workspace)")
    return [_remote(p, legacy) if p.startswith(":") else _local(p) for p in paths]


#: rsync's short options that take an argument (rsync's options.c): in a bundle such as `-ave ssh`,
#: the first of them takes the rest of the bundle or the next word.
_SHORT_WITH_ARGUMENT = frozenset("@fBeTM")
#: Options that would replace this client as rsync's remote shell, or the command run through it.
_SHELL_OPTIONS = ("--rsh", "--rsync-path")
#: Long options whose value may be the next word (`--exclude PATTERN`), from `rsync --help` (3.2-3.5): that
#: word is a value, never an option (`--exclude -e` excludes files named -e).
_LONG_WITH_ARGUMENT = frozenset(
    "--address --backup-dir --block-size --bwlimit --checksum-choice --checksum-seed --chmod --chown "
    "--compare-dest --compress-choice --compress-level --compress-threads --confine-root --contimeout --copy-as "
    "--copy-dest --debug --early-input --exclude --exclude-from --files-from --filter --groupmap --iconv --include "
    "--include-from --info --link-dest --log-file --log-file-format --max-alloc --max-delete --max-size --min-size "
    "--modify-window --only-write-batch --out-format --outbuf --partial-dir --password-file --port --protocol "
    "--read-batch --remote-option --skip-compress --sockopts --stop-after --stop-at --suffix --temp-dir --timeout "
    "--usermap --write-batch".split()
)


def check_extra_args(args: Sequence[str]) -> None:
    """Refuse RSYNC_OPTIONS that replace the remote shell (`-e`, `--rsh`) or the remote command
    (`--rsync-path`): rsync would then not go through the router at all (raises click.UsageError)."""
    words = iter(args)
    for word in words:
        if word == "--":
            return
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            if name in _SHELL_OPTIONS:
                raise click.UsageError(f"{name} cannot be given: rsync's remote shell is osmo-net-client's own")
            if name == word and name in _LONG_WITH_ARGUMENT:
                next(words, None)  # its value is the next word
            continue
        if not word.startswith("-") or word == "-":
            continue
        for position, letter in enumerate(word[1:], start=1):
            if letter == "e":
                raise click.UsageError("-e cannot be given: rsync's remote shell is osmo-net-client's own")
            if letter in _SHORT_WITH_ARGUMENT:
                if position == len(word) - 1:
                    next(words, None)  # its argument is the next word
                break


def _remote(path: str, legacy: bool = False) -> str:
    if path.startswith("::"):
        raise click.UsageError(f"a remote path is :PATH, not {path!r}")
    if legacy:
        return f"{REMOTE_HOST}::{legacy_module_path(path[1:])}"
    return f"{REMOTE_HOST}{path}"


def legacy_module_path(remote: str) -> str:
    """`MODULE/PATH` of a remote path on an old backend: inside module osmo's directory, or relative to it."""
    path = os.path.normpath(remote) if remote else "."
    if path.startswith("/"):
        if os.path.commonpath([LEGACY_MODULE_PATH, path]) != LEGACY_MODULE_PATH:
            raise click.UsageError(
                f"an old backend serves rsync modules: {remote!r} is outside module {LEGACY_MODULE!r} "
                f"({LEGACY_MODULE_PATH}); write :{LEGACY_MODULE_PATH}/... or a path relative to it"
            )
        path = os.path.relpath(path, LEGACY_MODULE_PATH)
    rel = "" if path == "." else path
    trailing = "/" if remote.endswith("/") and rel else ""
    return f"{LEGACY_MODULE}/{rel}{trailing}"


def _local(path: str) -> str:
    # rsync reads `a:b` as host a; keep a local name with a colon local.
    head = path.split("/", 1)[0]
    return f"./{path}" if ":" in head else path


def shell_command(config: ClientConfig) -> str:
    """The `-e` value: this interpreter running the hidden rsync-shell command (settings via environment)."""
    argv = [
        sys.executable,
        "-m",
        "osmo_router.client",
        "rsync-shell",
        "--connect-timeout",
        f"{config.connect_timeout:g}s",
    ]
    return shlex.join(argv)


def shell_env(config: ClientConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the local rsync: the caller's, with the remote shell's OSMO_* settings."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in SHELL_ENV}
    dial = config.dial
    values = {
        "OSMO_ROUTER_ADDRESS": dial.address,
        "OSMO_WORKFLOW_ID": config.workflow_id,
        "OSMO_TASK": config.task,
        "OSMO_SESSION_KEY": config.session_key,
        "OSMO_TOKEN": dial.token,
        "OSMO_TOKEN_FILE": _absolute(dial.token_file),
        "OSMO_COOKIE": dial.cookie,
        "OSMO_TLS": "true" if dial.tls else "false",
        "OSMO_TLS_CA": _absolute(dial.tls_ca),
        "OSMO_TLS_CERT": _absolute(dial.tls_cert),
        "OSMO_TLS_KEY": _absolute(dial.tls_key),
        "OSMO_TLS_SERVER_NAME": dial.tls_server_name,
        "OSMO_GRPC_CHANNEL": dial.grpc_channel,
        # Decided once by `run_rsync` (probe and fallback included), so the remote shell does not redo it.
        "OSMO_TRANSPORT": config.transport or "grpc",
        "OSMO_WS_ADDRESS": config.ws_address,
        "OSMO_LEGACY_BACKEND": "true" if config.legacy_backend else None,
        "OSMO_RESUME_GRACE": f"{config.resume_grace:g}s",
    }
    env.update({k: v for k, v in values.items() if v})
    return env


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def rsync_argv(
    config: ClientConfig,
    rsync: str,
    paths: Sequence[str],
    *,
    delete: bool,
    exclude: Sequence[str],
    progress: bool,
    bwlimit: str | None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The local rsync command line."""
    return [
        rsync,
        "-a",
        *(["--delete"] if delete else []),
        *(f"--exclude={pattern}" for pattern in exclude),
        *(["--progress"] if progress else []),
        *([f"--bwlimit={bwlimit}"] if bwlimit else []),
        "-e",
        shell_command(config),
        *extra_args,
        "--",
        *plan_paths(paths, legacy=config.legacy_backend),
    ]


def run_rsync(
    config: ClientConfig,
    paths: list[str],
    *,
    delete: bool,
    exclude: list[str],
    progress: bool,
    bwlimit: str | None,
    rsync_binary: str,
    extra_args: Sequence[str] = (),
) -> int:
    """Run the local rsync against the container and return its exit status."""
    argv = rsync_argv(
        config,
        rsync_binary,
        paths,
        delete=delete,
        exclude=exclude,
        progress=progress,
        bwlimit=bwlimit,
        extra_args=extra_args,
    )
    binary = shutil.which(rsync_binary)
    if binary is None:
        # A path that exists but cannot be run is not "missing": say what is wrong with it (as a shell does).
        if os.sep in rsync_binary and os.path.exists(rsync_binary):
            why = "is a directory" if os.path.isdir(rsync_binary) else "is not executable"
            say(f"{rsync_binary!r} {why}", "rsync", tty=False)
            return EXIT_RSYNC_NOT_RUNNABLE
        say(f"{rsync_binary!r} was not found on this machine; {LOCAL_INSTALL_HINT}", "rsync", tty=False)
        return EXIT_RSYNC_MISSING
    from osmo_router.transport.rollout import resolve_transport

    transport, fell_back = resolve_transport(config)
    config = replace(config, transport=transport)
    if fell_back and (status := _fallback_unreachable(config)) is not None:
        return status
    with tempfile.TemporaryDirectory(prefix="osmo-rsync-") as private:
        status_file = os.path.join(private, "status")
        env = shell_env(config)
        env[STATUS_FILE_ENV] = status_file
        code = _run_local_rsync([binary, *argv[1:]], env)
        if code == 0:
            return 0
        return _transport_status(status_file) or (128 - code if code < 0 else code)


def _fallback_unreachable(config: ClientConfig) -> int | None:
    """Exit status, with the reason said, when neither the gRPC nor the WebSocket port answers."""
    from osmo_router.transport.rollout import neither_port, ws_base, ws_port_problem
    from osmo_router.wire.errors import EXIT_CONNECTION_ERROR

    reason = ws_port_problem(config)
    if reason is None:
        return None
    # Said once here, not by the remote shell under rsync's "connection unexpectedly closed".
    say(f"{neither_port(config.dial.address, ws_base(config), reason)} [UNAVAILABLE]", "rsync", tty=False)
    return EXIT_CONNECTION_ERROR


def _run_local_rsync(argv: list[str], env: dict[str, str]) -> int:
    """Run rsync to its end and return its wait status, once its remote shell's last words are out."""
    # The remote shell inherits the write end through rsync: EOF on the read end once it is gone.
    shell_gone, shell_alive = os.pipe()
    try:
        proc = subprocess.Popen(argv, env=env, pass_fds=(shell_alive,))
    finally:
        os.close(shell_alive)
    # Ctrl-C reaches rsync too (same process group): let rsync stop cleanly and report its status.
    # SIGTERM or SIGHUP sent to this process alone is passed on, so rsync never runs on without us.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda number, _frame: proc.send_signal(number))
    try:
        code = proc.wait()
        # On an error rsync leaves its remote shell running, with the remote side's last words
        # still on their way (rsync_shell.py): they are printed before we return.
        wait_for_eof(shell_gone, RSYNC_EXIT_SETTLE + 1.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(shell_gone)
    return code


def wait_for_eof(fd: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for EOF on the pipe `fd` (every holder of its write end gone)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if readable and not os.read(fd, 512):
            return True
    return False


def _transport_status(path: str) -> int | None:
    """The remote shell's exit status if it recorded a transport failure (127 or 255)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
