"""rsync's command-line options, and a parser that reads an argv exactly as `rsync --server` will.

The agent decides what `rsync --server ARGS` may do by reading ARGS, so it must read them the way
rsync does; any difference is a way round the check (`-T=DIR` read as the relative path `=DIR` let
an upload put its temporary file outside `--rsync-root`). This module is our own table and parser,
written from reading rsync's sources (RsyncProject/rsync, version 3.5.0), not a copy of them:

- The table: `long_options[]` in options.c, the one table rsync parses every command line with,
  the server's included (there is no separate server table; `server_options()` in options.c only
  shows which of them a client sends). Each entry is a long name, an optional one-letter name and
  whether it takes a value (`POPT_ARG_STRING`/`POPT_ARG_INT`) or not (`NONE`/`VAL`/`BIT_SET`).
  `-D`, `-F` and `-P` have no long name. Options that switch to daemon parsing (`--daemon`,
  `--config`, `--dparam`, `--detach`, `--no-detach`) are in it too; the checker refuses them.
- The parsing: popt's `poptGetNextOpt()` (popt/popt.c; the installed rsync links the system
  libpopt 1.19, which behaves the same):
  - `--name=value` and `--name value`; the name must match exactly (`longOptionStrcmp()`
    compares lengths): no abbreviations, `--copy-l` is an unknown option. No option of rsync's is
    `POPT_ARGFLAG_TOGGLE` or `ONEDASH`, so there is no generic `--no-NAME` (every `no-` option
    is in the table) and a single dash always starts a cluster of one-letter options (`-server`
    is `-s -e rver`).
  - In a cluster, a letter that takes a value takes the rest of the argument with one leading
    `=` removed (`-TDIR`, `-T=DIR`, `-avT=DIR` all mean DIR), else the next argument whatever it
    looks like (`-T --delete` sets the temp dir to `--delete`).
  - An option without a value given one (`--archive=x`, `-a=x`) is an error, as is an unknown
    name or letter and a value missing at the end: rsync would exit, we refuse instead of guessing.
  - `--` ends the options; `-` alone is an argument. Options may follow arguments, unless
    `POSIXLY_CORRECT` or `POSIX_ME_HARDER` is set in the environment: then the first argument
    ends the options (`poptGetContext()`); the agent's rsync inherits the agent's environment.
  - Every option value goes through `expandNextArg()`: `!#:+` in a value is replaced by the next
    argument not starting with `-`, which is then removed from the arguments. The parser reports
    values as written; the checker refuses any with NEXT_ARG when confined rather than replay it.
  - popt aliases (/etc/popt, ~/.popt) never apply: `parse_arguments()` in options.c starts a
    fresh context without them when it meets `--server`, which the agent requires first.

tests/unit/test_rsync_options.py holds this to the installed rsync: the table to its --help, to popt's
answer for `--NAME=x` and `-L=x` (unknown / takes no argument) for every name and letter, and to
every option-like word in the binary; the parser to what the real client forwards and what the real
server uses for each spelling. An older rsync in a container knows fewer options and refuses the
others itself; an option newer than this table is refused here as unknown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from osmo_router.wire.errors import PermissionDenied

#: Long options that take a value (options.c long_options[], POPT_ARG_STRING and POPT_ARG_INT).
VALUED = frozenset(
    """
    info debug stderr modify-window confine-root chmod max-size min-size max-alloc max-delete filter
    exclude include exclude-from include-from checksum-choice cc block-size compare-dest copy-dest
    link-dest compress-choice zc skip-compress compress-level zl compress-threads zt partial-dir
    log-file log-file-format out-format log-format bwlimit backup-dir suffix read-batch write-batch
    only-write-batch files-from usermap groupmap chown timeout contimeout stop-after time-limit
    stop-at rsh rsync-path temp-dir iconv copy-as address port sockopts password-file early-input
    outbuf remote-option protocol checksum-seed config dparam
    """.split()
)
#: Long options without a value (POPT_ARG_NONE, POPT_ARG_VAL, POPT_BIT_SET).
FLAGS = frozenset(
    """
    help version verbose no-verbose no-v msgs2stderr no-msgs2stderr quiet motd no-motd stats
    human-readable no-human-readable no-h dry-run archive recursive no-recursive no-r
    inc-recursive no-inc-recursive i-r no-i-r dirs no-dirs no-d old-dirs old-d perms no-perms no-p
    executability acls no-acls no-A xattrs no-xattrs no-X times no-times no-t atimes no-atimes no-U
    open-noatime no-open-noatime crtimes no-crtimes no-N omit-dir-times no-omit-dir-times no-O
    omit-link-times no-omit-link-times no-J super no-super fake-super owner no-owner no-o group
    no-group no-g no-D devices no-devices copy-devices write-devices no-write-devices specials
    no-specials drop-D no-drop-D links no-links no-l copy-links copy-unsafe-links safe-links
    insecure-links no-insecure-links munge-links no-munge-links copy-dirlinks keep-dirlinks
    hard-links no-hard-links no-H relative no-relative no-R implied-dirs no-implied-dirs i-d no-i-d
    ignore-times size-only one-file-system no-one-file-system no-x update existing
    ignore-non-existing ignore-existing sparse no-sparse no-S preallocate inplace no-inplace append
    append-verify no-append del delete delete-before delete-during delete-delay delete-after
    delete-excluded delete-missing-args ignore-missing-args remove-sent-files remove-source-files
    force no-force ignore-errors no-ignore-errors cvs-exclude whole-file no-whole-file no-W checksum
    no-checksum no-c fuzzy no-fuzzy no-y compress old-compress new-compress no-compress no-z
    progress no-progress partial no-partial delay-updates no-delay-updates prune-empty-dirs
    no-prune-empty-dirs no-m itemize-changes no-itemize-changes no-i no-bwlimit backup no-backup
    list-only from0 no-from0 old-args no-old-args secluded-args no-secluded-args protect-args
    no-protect-args no-s trust-sender numeric-ids no-numeric-ids no-timeout no-contimeout fsync
    no-iconv ipv4 ipv6 8-bit-output no-8-bit-output no-8 mkpath no-mkpath qsort blocking-io
    no-blocking-io server sender daemon detach no-detach
    """.split()
)
#: One-letter options: the letter, then the long option it is (or -D, -F, -P, which have none).
SHORT: dict[str, str] = {
    pair[0]: pair[2:]
    for pair in """
    V:--version v:--verbose q:--quiet h:--human-readable n:--dry-run a:--archive r:--recursive
    d:--dirs p:--perms E:--executability A:--acls X:--xattrs t:--times U:--atimes N:--crtimes
    O:--omit-dir-times J:--omit-link-times @:--modify-window o:--owner g:--group D:-D l:--links
    L:--copy-links k:--copy-dirlinks K:--keep-dirlinks H:--hard-links R:--relative I:--ignore-times
    x:--one-file-system u:--update S:--sparse F:-F f:--filter C:--cvs-exclude W:--whole-file
    c:--checksum B:--block-size y:--fuzzy z:--compress P:-P m:--prune-empty-dirs i:--itemize-changes
    b:--backup 0:--from0 s:--secluded-args e:--rsh T:--temp-dir 4:--ipv4 6:--ipv6 8:--8-bit-output
    M:--remote-option
    """.split()
}
#: popt's "insert the next argument here" in an option value (expandNextArg()).
NEXT_ARG = "!#:+"


@dataclass(frozen=True)
class Option:
    """One option as rsync reads it: its canonical name, its value, and how it was written."""

    #: `--temp-dir` for -T, -TDIR, -T=DIR, --temp-dir=DIR...; `-D`, `-F`, `-P` for those letters.
    name: str
    #: The value (None for options without one).
    value: str | None
    #: What the client wrote, for messages (`-T` in `-avT=/tmp`).
    spelled: str


@dataclass(frozen=True)
class ParsedArgs:
    """An argv split into options and arguments."""

    options: list[Option]
    #: The arguments that are not options or option values, in order.
    arguments: list[str]

    @property
    def pairs(self) -> list[tuple[str, str | None]]:
        """(name, value) of every option, in order."""
        return [(option.name, option.value) for option in self.options]


def takes_value(name: str) -> bool:
    """Whether the option with this canonical name (`--temp-dir`, `-D`) takes a value."""
    return name.removeprefix("--") in VALUED


def posix_me_harder(environ: dict[str, str] | None = None) -> bool:
    """Whether popt stops at the first argument (POSIXLY_CORRECT or POSIX_ME_HARDER is set)."""
    env = os.environ if environ is None else environ
    return "POSIXLY_CORRECT" in env or "POSIX_ME_HARDER" in env


def parse_args(args: list[str], stop_at_first_argument: bool = False) -> ParsedArgs:
    """Read `args` (the argv after the program name) as rsync's popt does; PermissionDenied if rsync would not."""
    options: list[Option] = []
    arguments: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            arguments.extend(args[index:])
            break
        if arg == "-" or not arg.startswith("-"):
            arguments.append(arg)
            if stop_at_first_argument:
                arguments.extend(args[index:])
                break
        elif arg.startswith("--"):
            index = _parse_long(arg, args, index, options)
        else:
            index = _parse_cluster(arg, args, index, options)
    return ParsedArgs(options, arguments)


def _parse_long(arg: str, args: list[str], index: int, options: list[Option]) -> int:
    """One `--name[=value]` (its value possibly the next argument); returns the next index."""
    name, has_value, value = arg.partition("=")
    bare = name[2:]
    if bare in FLAGS:
        if has_value:
            raise PermissionDenied(f"{arg!r}: rsync option {name} takes no value")
        options.append(Option(name, None, name))
        return index
    if bare not in VALUED:
        raise PermissionDenied(_unknown(name))
    if not has_value:
        value, index = _next_value(name, args, index)
    options.append(Option(name, value, name))
    return index


def _parse_cluster(arg: str, args: list[str], index: int, options: list[Option]) -> int:
    """One cluster of letters (`-avT=DIR`); returns the index of the next argument."""
    position = 1
    while position < len(arg):
        letter = arg[position]
        position += 1
        name = SHORT.get(letter)
        if name is None:
            raise PermissionDenied(f"{arg!r}: unknown rsync option -{letter}")
        spelled = f"-{letter}" if len(arg) == 2 else f"-{letter} in {arg!r}"
        rest = arg[position:]
        if not takes_value(name):
            if rest.startswith("="):
                raise PermissionDenied(f"{arg!r}: rsync option -{letter} ({name}) takes no value")
            options.append(Option(name, None, spelled))
            continue
        if rest:
            value = rest.removeprefix("=")
        else:
            value, index = _next_value(f"-{letter}", args, index)
        options.append(Option(name, value, spelled))
        break
    return index


def _next_value(spelled: str, args: list[str], index: int) -> tuple[str, int]:
    """The next argument as the value of `spelled`, whatever it looks like."""
    if index >= len(args):
        raise PermissionDenied(f"rsync option {spelled} needs a value")
    return args[index], index + 1


def _unknown(name: str) -> str:
    """The refusal for an unknown long option, naming what an abbreviation might have meant."""
    bare = name[2:]
    meant = sorted(f"--{known}" for known in FLAGS | VALUED if bare and known.startswith(bare))
    if meant:
        return f"unknown rsync option {name} (rsync takes no abbreviations: {', '.join(meant[:4])}?)"
    return f"unknown rsync option {name}"
