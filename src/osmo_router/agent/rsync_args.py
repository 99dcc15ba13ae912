"""What the agent agrees to run for an rsync session: `rsync --server ...` only, inside the allowed roots.

The local rsync asks for `rsync --server [--sender] OPTIONS . PATH...`. The agent execs its own
rsync binary with those arguments directly (no shell), so the only program that can run is rsync in
server mode. The arguments are read by `rsync_options.parse_args`, which follows rsync's own option
table and popt's rules (see that module), so every spelling of an option counts: `-T DIR`, `-TDIR`,
`-T=DIR`, `-avT=DIR`, `--temp-dir=DIR` and `--temp-dir DIR` all name the temp dir DIR. Options
rsync does not know, abbreviations (popt has none), and values given to options that take none are
refused: rsync would exit on them, and guessing their arity is how a checker gets out of step.

Always refused: `--daemon`, `--config`, `--dparam`, `--detach`, `--no-detach` (they switch rsync to
daemon parsing and its config file) and `--early-input` (a file for a daemon).

With `--rsync-root` the paths are confined. Every path argument and every path-valued option
(PATH_OPTIONS) must resolve, symlinks followed and `..` applied, inside a root. A relative value
must also stay inside from each path argument (and its parent): rsync takes `--temp-dir`,
`--partial-dir`, `--backup-dir` and the `--*-dest` directories relative to the destination, where
a symlink could lead out; `..` in a value is refused outright. Refused as well when confined
(CONFINED_REFUSED), in every spelling (`-L` inside `-avL` too): the options that hide the real
arguments (`-s`/`--secluded-args`/`--protect-args`: the server reads them from the protocol),
follow symlinks out of the tree (`-L`, `-k`, `-K`, `--copy-unsafe-links`), lift rsync's own guards
(`--insecure-links`, `--trust-sender`), read rules or names the check never sees (`--filter`/`-f`,
`-F`, which is `--filter='dir-merge /.rsync-filter'`, whose rules may merge any file, and
`--files-from`), `-M`/`--remote-option` (an option for a further rsync: the server has none), and
any value with popt's `!#:+`, which rsync would replace by a later path argument. The options
without a value that touch devices (`--write-devices`, `--copy-devices`) act on the confined paths.
Option values that are not paths (`--suffix`: rsync refuses a `/` in it; `--chown`, `--usermap`,
`--chmod`, `--exclude`/`--include` patterns, `-e`, which carries the client's capabilities in server
mode) pass unchecked.

Limits, stated plainly: the check covers what the command line names. The rsync protocol itself is
not sandboxed: a client that crafts protocol messages (its own file list, filter rules) is bounded
by the container's file permissions, as with rsync over ssh. Nor is what the tree holds: a relative
`--partial-dir` is used in every folder rsync writes, and a symlink of that name deeper down is
content the check does not walk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from osmo_router.agent.rsync_options import NEXT_ARG, Option, parse_args, posix_me_harder
from osmo_router.wire.errors import PermissionDenied

#: Options whose value names a file or directory the server would read or write.
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
        "--password-file",
        "--confine-root",
    }
)
#: Options that turn the server into something else than an rsync peer of this session.
ALWAYS_REFUSED = frozenset({"--daemon", "--config", "--dparam", "--detach", "--no-detach", "--early-input"})
#: Options refused when paths are confined: they hide the paths, follow symlinks out of the tree,
#: lift rsync's own guards or read rules and names from elsewhere.
CONFINED_REFUSED = frozenset(
    {
        "--secluded-args",
        "--protect-args",
        "--copy-links",
        "--copy-dirlinks",
        "--keep-dirlinks",
        "--copy-unsafe-links",
        "--insecure-links",
        "--trust-sender",
        "--files-from",
        "--filter",
        "-F",
        "--remote-option",
    }
)
CONFINED = "while rsync is confined to --rsync-root directories"


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
    parsed = parse_args(argv[2:], stop_at_first_argument=posix_me_harder())
    for option in parsed.options:
        _check_option(option, confined)
    paths = _split_paths(parsed.arguments, confined)
    if confined:
        base = os.path.realpath(cwd or os.getcwd())
        real_roots = [os.path.realpath(root) for root in roots]
        for path in paths:
            _check_inside(path, real_roots, base, repr(path))
        bases = _value_bases(paths, real_roots, base)
        for option in parsed.options:
            if option.name in PATH_OPTIONS and option.value is not None:
                _check_path_value(option, option.value, real_roots, bases)
    sender = any(option.name == "--sender" for option in parsed.options)
    return ServerCommand(args=argv[1:], paths=paths, sender=sender)


def _check_option(option: Option, confined: bool) -> None:
    """Refuse an option that is never allowed, or not while confined."""
    plain = option.spelled == option.name or not option.name.startswith("--")  # -F has no long name
    shown = option.spelled if plain else f"{option.spelled} ({option.name})"
    if option.name in ALWAYS_REFUSED:
        raise PermissionDenied(f"{shown} is not allowed through an rsync session")
    if not confined:
        return
    if option.name in CONFINED_REFUSED:
        raise PermissionDenied(f"{shown} is not allowed {CONFINED}")
    if option.value is not None and NEXT_ARG in option.value:
        raise PermissionDenied(
            f"{option.value!r} ({shown}): {NEXT_ARG!r} in an option value (rsync splices the next "
            f"argument in) is not allowed {CONFINED}"
        )


def _split_paths(arguments: list[str], confined: bool) -> list[str]:
    """The path arguments: what follows the "." placeholder the client always puts first."""
    if not arguments:
        if confined:
            raise PermissionDenied("an rsync server command without paths cannot be checked against --rsync-root")
        return []
    if arguments[0] != ".":
        raise PermissionDenied(f"malformed rsync server command: expected '.' before the paths, got {arguments[0]!r}")
    return arguments[1:]


def _value_bases(paths: list[str], roots: list[str], base: str) -> list[str]:
    """Where a relative path value may be taken from: the server's directory, each path and its parent."""
    bases = [base]
    for path in paths:
        resolved = os.path.realpath(os.path.join(base, path))
        for candidate in (resolved, os.path.dirname(resolved)):
            if candidate not in bases and _inside(candidate, roots):
                bases.append(candidate)
    return bases


def _check_path_value(option: Option, value: str, roots: list[str], bases: list[str]) -> None:
    """Refuse a path-valued option that could lead outside the roots."""
    what = f"{value!r} ({option.spelled})"
    # Relative values count from each destination folder, not from here: refuse `..` outright.
    if ".." in value.split(os.sep):
        raise PermissionDenied(f"{what}: '..' is not allowed in path options {CONFINED}")
    for base in bases[:1] if os.path.isabs(value) else bases:
        _check_inside(value, roots, base, what)


def _inside(resolved: str, roots: list[str]) -> bool:
    """Whether an already resolved path is one of the roots or below one."""
    return any(resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _check_inside(path: str, roots: list[str], base: str, what: str) -> None:
    """Refuse a path that does not resolve inside one of the roots."""
    # No shell runs in between, so `~` and wildcards are literal for rsync: check exactly what it opens.
    if not _inside(os.path.realpath(os.path.join(base, path)), roots):
        raise PermissionDenied(f"{what} is outside the allowed rsync roots ({', '.join(roots)})")


def server_cwd(workdir: str | None, roots: tuple[str, ...]) -> str | None:
    """Where rsync --server runs (relative paths start there): --workdir, else the first root."""
    if workdir:
        return workdir
    return roots[0] if roots else None
