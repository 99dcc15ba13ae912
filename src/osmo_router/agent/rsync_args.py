"""What the agent agrees to run for an rsync session: `rsync --server ...` only, inside the allowed roots.

The local rsync asks for `rsync --server [--sender] OPTIONS . PATH...`. The agent execs its own
rsync binary with those arguments directly (no shell), so the only program that can run is rsync in
server mode. With `--rsync-root` the paths are confined: every path argument and every path-valued
option must resolve (symlinks followed, `..` applied) inside a root, and the options that would
hide the paths (`--protect-args`) or follow symlinks out of the tree (`--copy-links`...) are refused.

Limits, stated plainly: the check covers what the command line names. The rsync protocol itself is
not sandboxed: a client that crafts protocol messages (its own file list, filter rules) is bounded
by the container's file permissions, as with rsync over ssh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from osmo_router.wire.errors import PermissionDenied

#: Long options whose value names a file or directory the server would read or write.
PATH_OPTIONS = frozenset(
    {
        "--backup-dir",
        "--partial-dir",
        "--temp-dir",
        "--compare-dest",
        "--copy-dest",
        "--link-dest",
        "--log-file",
        "--write-batch",
        "--only-write-batch",
        "--read-batch",
        "--exclude-from",
        "--include-from",
        "--files-from",
    }
)
#: Options that turn the server into something else than an rsync peer of this session.
ALWAYS_REFUSED = frozenset({"--daemon", "--config", "--dparam", "--early-input"})
#: Options refused when paths are confined: they hide the paths or follow symlinks out of the tree.
CONFINED_REFUSED = frozenset(
    {
        "--protect-args",
        "--secluded-args",
        "--copy-links",
        "--copy-dirlinks",
        "--keep-dirlinks",
        "--copy-unsafe-links",
        "--files-from",
        "--filter",
    }
)
#: Short flags refused when confined: -s (protect args), -L, -k, -K (follow symlinks).
CONFINED_REFUSED_SHORT = {"s": "--protect-args", "L": "--copy-links", "k": "--copy-dirlinks", "K": "--keep-dirlinks"}
#: Short options that take a value (the rest of the cluster, or the next argument).
SHORT_WITH_VALUE = frozenset("eTBfM@")


@dataclass(frozen=True)
class ServerCommand:
    """A checked server command line."""

    #: The arguments to give the agent's rsync binary (everything after argv[0]).
    args: list[str]
    #: The path arguments (after the "." separator).
    paths: list[str]
    #: True for `--sender` (the container sends: a download).
    sender: bool


def check_server_args(argv: list[str], roots: tuple[str, ...] = (), cwd: str | None = None) -> ServerCommand:
    """Validate the argv a client asked for; raises PermissionDenied with the reason."""
    if len(argv) < 2 or argv[0] != "rsync" or argv[1] != "--server":
        shown = " ".join(argv[:3]) or "(empty)"
        raise PermissionDenied(f"only `rsync --server ...` may run through an rsync session, not {shown!r}")
    confined = bool(roots)
    base = os.path.realpath(cwd or os.getcwd())
    real_roots = [os.path.realpath(root) for root in roots]
    path_values: list[str] = []
    positionals: list[str] = []
    args = argv[2:]
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        # Options may follow the paths: rsync's option parser (popt) accepts them anywhere.
        if arg == "--":
            positionals.extend(args[index:])
            break
        if arg == "-" or not arg.startswith("-"):
            positionals.append(arg)
        elif arg.startswith("--"):
            name, has_value, value = arg.partition("=")
            _check_long(name, confined)
            if name in PATH_OPTIONS:
                if not has_value:
                    if index >= len(args):
                        raise PermissionDenied(f"{name} without a value")
                    value = args[index]
                    index += 1
                path_values.append(value)
        else:
            index = _check_short_cluster(arg, args, index, confined, path_values)
    paths = _split_paths(positionals, confined)
    if confined:
        for path in paths:
            _check_inside(path, real_roots, base)
        for value in path_values:
            # Relative values count from each destination folder, not from here: refuse `..` outright.
            if ".." in value.split(os.sep):
                raise PermissionDenied(f"{value!r}: '..' is not allowed in path options while rsync is confined")
            _check_inside(value, real_roots, base)
    return ServerCommand(args=argv[1:], paths=paths, sender="--sender" in argv[2:])


def _check_long(name: str, confined: bool) -> None:
    if name in ALWAYS_REFUSED:
        raise PermissionDenied(f"{name} is not allowed through an rsync session")
    if confined and name in CONFINED_REFUSED:
        raise PermissionDenied(f"{name} is not allowed while rsync is confined to --rsync-root directories")


def _check_short_cluster(arg: str, args: list[str], index: int, confined: bool, path_values: list[str]) -> int:
    """Check one cluster of short flags (`-logDtpre.iLsfx`); returns the index of the next argument."""
    letters = arg[1:]
    for position, letter in enumerate(letters):
        if letter in SHORT_WITH_VALUE:
            value = letters[position + 1 :]
            if not value:
                if index >= len(args):
                    raise PermissionDenied(f"-{letter} without a value")
                value = args[index]
                index += 1
            if letter == "T":
                path_values.append(value)
            elif letter in "fM" and confined:
                raise PermissionDenied(f"-{letter} is not allowed while rsync is confined to --rsync-root directories")
            # -e's value in server mode is the client's capability string, not a command.
            return index
        if confined and letter in CONFINED_REFUSED_SHORT:
            raise PermissionDenied(
                f"-{letter} ({CONFINED_REFUSED_SHORT[letter]}) is not allowed while rsync is confined "
                "to --rsync-root directories"
            )
    return index


def _split_paths(positionals: list[str], confined: bool) -> list[str]:
    """The path arguments: what follows the "." placeholder the client always puts first."""
    if not positionals:
        if confined:
            raise PermissionDenied("an rsync server command without paths cannot be checked against --rsync-root")
        return []
    if positionals[0] != ".":
        raise PermissionDenied(f"malformed rsync server command: expected '.' before the paths, got {positionals[0]!r}")
    return positionals[1:]


def _check_inside(path: str, roots: list[str], base: str) -> None:
    """Refuse a path that does not resolve inside one of the roots."""
    # No shell runs in between, so `~` and wildcards are literal for rsync: check exactly what it opens.
    resolved = os.path.realpath(os.path.join(base, path))
    for root in roots:
        if resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep):
            return
    raise PermissionDenied(f"{path!r} is outside the allowed rsync roots ({', '.join(roots)})")


def server_cwd(workdir: str | None, roots: tuple[str, ...]) -> str | None:
    """Where rsync --server runs (relative paths start there): --workdir, else the first root."""
    if workdir:
        return workdir
    return roots[0] if roots else None
