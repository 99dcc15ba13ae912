"""rsync's option table and parser (agent/rsync_options.py) against the installed rsync, and as properties.

The real binary is the reference: its --help, what it accepts (`rsync --server OPTION --version`
exits 0 only when OPTION took no value), the option names in the binary itself, and what its client
forwards to a server for each spelling of an option (its -e remote shell records the command).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osmo_router.agent.rsync_args import CONFINED_REFUSED, PATH_OPTIONS, check_server_args
from osmo_router.agent.rsync_options import FLAGS, SHORT, VALUED, parse_args, takes_value
from osmo_router.wire.errors import PermissionDenied

RSYNC = shutil.which("rsync")
needs_rsync = pytest.mark.skipif(RSYNC is None, reason="rsync is not installed")
#: Options that switch rsync to daemon parsing (where --version is unknown): not probed with --version.
DAEMON_SWITCHES = {"daemon", "config", "dparam", "detach", "no-detach"}
#: Canonical names (`--temp-dir`, `-D`) and the letter of each that has one.
NAMES = sorted({f"--{name}" for name in FLAGS | VALUED} | set(SHORT.values()))
LETTER = {name: letter for letter, name in SHORT.items()}


def rsync_run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real rsync with stdin closed."""
    assert RSYNC is not None
    return subprocess.run([RSYNC, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=cwd)


def help_table() -> dict[str, bool]:
    """Every option `rsync --help` lists (`--temp-dir`, `-T`), and whether it takes a value."""
    table: dict[str, bool] = {}
    for line in rsync_run("--help").stdout.splitlines():
        if not line.startswith("-") or line.startswith("--no-OPTION"):
            continue
        spellings = re.split(r"\s{2,}", line.strip())[0].split(", ")
        valued = any("=" in spelling for spelling in spellings)
        names = [spelling.split("=")[0] for spelling in spellings if "(*)" not in spelling]
        longs = [name for name in names if name.startswith("--")]
        for name in names:
            table[name] = valued
            if not name.startswith("--") and longs:
                assert SHORT[name[1]] in longs, f"-{name[1]} is {SHORT[name[1]]}, rsync --help says {longs}"
    return table


@needs_rsync
def test_the_table_agrees_with_rsync_help() -> None:
    table = help_table()
    assert len(table) > 200
    for name, valued in table.items():
        canonical = name if name.startswith("--") or name[1] not in SHORT else SHORT[name[1]]
        assert canonical in NAMES, f"{name} (rsync --help) is missing from our table"
        assert takes_value(canonical) == valued, f"{name}: rsync --help says takes a value={valued}"


def probe(spellings: list[str], cwd: Path) -> dict[str, str]:
    """How the real rsync takes `OPTION=x`, for each: "unknown", "flag" (popt: takes no argument) or "valued".

    rsync lingers ~0.1 s on its way out after an error, so the runs overlap (they mostly sleep).
    """

    def one(spelled: str) -> str:
        stderr = rsync_run("--server", f"{spelled}=x", "--version", cwd=cwd).stderr
        if "unknown option" in stderr:
            return "unknown"
        return "flag" if "does not take an argument" in stderr else "valued"

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(spellings, pool.map(one, spellings), strict=True))


@needs_rsync
def test_every_option_in_the_table_has_rsyncs_own_arity(tmp_path: Path) -> None:
    """popt refuses `--flag=x` and `-f=x` ("option does not take an argument") and nothing else."""
    expected = {}
    for name in NAMES:
        if name.removeprefix("--") not in DAEMON_SWITCHES:
            kind = "valued" if takes_value(name) else "flag"
            expected.update({name: kind} if name.startswith("--") else {})
            expected.update({f"-{LETTER[name]}": kind} if name in LETTER else {})
    for letter in map(chr, range(33, 127)):
        expected.setdefault(f"-{letter}", "unknown")
    del expected["--"]
    assert probe(sorted(expected), tmp_path) == expected


@needs_rsync
def test_no_option_of_the_binary_is_missing_from_the_table(tmp_path: Path) -> None:
    """Every word in the rsync binary that rsync takes as `--WORD` is in our table."""
    assert RSYNC is not None
    words = set()
    for run in re.findall(rb"[\x21-\x7e]{2,40}(?=\x00)", Path(RSYNC).read_bytes()):
        text = run.decode()  # the linker may keep "temp-dir" only as the tail of "--temp-dir"
        starts = [i for i in range(len(text)) if i == 0 or not text[i - 1].isalnum()]
        words.update(text[i:] for i in starts if re.fullmatch(r"[a-z0-9][a-zA-Z0-9-]+", text[i:]))
    assert {"temp-dir", "copy-links", "secluded-args", "confine-root"} <= words
    candidates = sorted(f"--{word}" for word in words - FLAGS - VALUED - DAEMON_SWITCHES)
    found = probe(candidates, tmp_path)
    assert [spelled for spelled, kind in found.items() if kind != "unknown"] == []


def render(pairs: list[tuple[str, str | None]], data: st.DataObject) -> list[str]:
    """One argv that says `pairs`, each option in a spelling drawn from every one rsync accepts."""
    argv: list[str] = []
    cluster = ""  # an open cluster of flags (`-av`) the next letter may join
    for name, value in pairs:
        letter = LETTER.get(name)
        if letter and (not name.startswith("--") or data.draw(st.booleans())):
            joined = bool(cluster) and data.draw(st.booleans())
            if cluster and not joined:
                argv.append(cluster)
            cluster = (cluster if joined else "-") + letter
            if value is None:
                continue
            forms = ["eq", "separate"] + (["attached"] if value and not value.startswith("=") else [])
            form = data.draw(st.sampled_from(forms))
            argv.extend(
                [cluster + value]
                if form == "attached"
                else [f"{cluster}={value}"]
                if form == "eq"
                else [cluster, value]
            )
            cluster = ""
            continue
        if cluster:
            argv.append(cluster)
            cluster = ""
        if value is None:
            argv.append(name)
        elif data.draw(st.booleans()):
            argv.append(f"{name}={value}")
        else:
            argv.extend([name, value])
    if cluster:
        argv.append(cluster)
    return argv


values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
options = st.sampled_from(NAMES).flatmap(
    lambda name: st.tuples(st.just(name), values if takes_value(name) else st.none())
)


@settings(max_examples=400, deadline=None)
@given(st.lists(options, max_size=8), st.data())
def test_every_spelling_parses_to_the_same_options(pairs: list[tuple[str, str | None]], data: st.DataObject) -> None:
    argv = render(pairs, data)
    assert parse_args(argv).pairs == pairs, argv


arguments = st.text(min_size=1).filter(lambda s: not s.startswith("-"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(options, st.lists(arguments, max_size=1)), max_size=6))
def test_arguments_may_come_anywhere_and_after_dash_dash_all_are_arguments(
    items: list[tuple[tuple[str, str | None], list[str]]],
) -> None:
    argv: list[str] = []
    for (name, value), extra in items:
        argv += ([name] if value is None else [name, value]) + extra
    parsed = parse_args([*argv, "--", "--temp-dir=x", "-L"])
    assert parsed.pairs == [pair for pair, _ in items]
    assert parsed.arguments == [*(arg for _, extra in items for arg in extra), "--temp-dir=x", "-L"]


def test_posixly_correct_stops_the_options_at_the_first_argument() -> None:
    parsed = parse_args(["-v", "a", "-L"], stop_at_first_argument=True)
    assert parsed.pairs == [("--verbose", None)] and parsed.arguments == ["a", "-L"]


@pytest.mark.parametrize(
    "argv, pairs",
    [
        (["-T=/x"], [("--temp-dir", "/x")]),
        (["-T==x"], [("--temp-dir", "=x")]),
        (["-T", "--delete"], [("--temp-dir", "--delete")]),
        (["-avT=d"], [("--archive", None), ("--verbose", None), ("--temp-dir", "d")]),
        (["-server"], [("--secluded-args", None), ("--rsh", "rver")]),
        (["-logDtpre.iLsfxCIvu"], [*((SHORT[c], None) for c in "logDtpr"), ("--rsh", ".iLsfxCIvu")]),
        (["--temp-dir="], [("--temp-dir", "")]),
        (["--log-file=a=b"], [("--log-file", "a=b")]),
    ],
)
def test_popt_corner_cases(argv: list[str], pairs: list[tuple[str, str | None]]) -> None:
    assert parse_args(argv).pairs == pairs


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--copy-l"], "no abbreviations: --copy-links"),
        (["--temp-d=/x"], "no abbreviations"),
        (["--no-a"], "unknown rsync option --no-a"),
        (["-Q"], "unknown rsync option -Q"),
        (["-a=x"], "takes no value"),
        (["--archive=x"], "takes no value"),
        (["--archive="], "takes no value"),
        (["-vT"], "needs a value"),
        (["--temp-dir"], "needs a value"),
    ],
)
def test_what_rsync_would_refuse_is_refused(argv: list[str], message: str) -> None:
    with pytest.raises(PermissionDenied, match=re.escape(message)):
        parse_args(argv)


def test_no_abbreviation_of_any_option_is_accepted() -> None:
    known = FLAGS | VALUED
    for name in known:
        for end in range(1, len(name)):
            if name[:end] not in known:
                with pytest.raises(PermissionDenied, match="unknown rsync option"):
                    parse_args([f"--{name[:end]}", "x"])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/sub, other/, and root/out -> other."""
    base = tmp_path_factory.mktemp("confine")
    (base / "root" / "sub").mkdir(parents=True)
    (base / "other").mkdir()
    (base / "root" / "out").symlink_to(base / "other")
    (base / "root" / "sub" / "out").symlink_to(base / "other")
    return base


def spellings(name: str, value: str) -> list[list[str]]:
    """Every way to write `name value` alone and inside a cluster of harmless flags."""
    forms = [[f"{name}={value}"], [name, value]]
    if name in LETTER:
        for prefix in ("-", "-av", "-logDtpr"):
            # Attached, the value loses one leading "=": `-T==x` is how to say "=x".
            forms += [[f"{prefix}{LETTER[name]}{value}"]] if value and not value.startswith("=") else []
            forms += [
                [f"{prefix}{LETTER[name]}={value}"],
                [f"{prefix}{LETTER[name]}", value],
            ]
    return forms


OUTSIDE = [
    "{other}",
    "{other}/x",
    "/etc",
    "/tmp",
    "out",
    "out/x",
    "{root}/out",
    "sub/out",
    "../other",
    "{root}/../other",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(sorted(PATH_OPTIONS)),
    st.sampled_from(OUTSIDE),
    st.lists(st.text("abz09._-", min_size=1, max_size=5), max_size=2),
    st.sampled_from(["sub/", "."]),
)
def test_a_path_value_outside_the_root_is_refused_in_every_spelling(
    tree: Path, name: str, value: str, below: list[str], dest: str
) -> None:
    root = str(tree / "root")
    value = "/".join([value.format(other=tree / "other", root=tree / "root"), *below])
    for form in spellings(name, value):
        with pytest.raises(PermissionDenied, match=r"outside the allowed|'\.\.' is not allowed|confined"):
            check_server_args(["rsync", "--server", *form, ".", dest], (root,), root)


@pytest.mark.parametrize("name", sorted(PATH_OPTIONS - CONFINED_REFUSED))
def test_a_path_value_inside_the_root_passes_in_every_spelling(tree: Path, name: str) -> None:
    root = str(tree / "root")
    for value in ("sub", f"{root}/sub/new", ".rsync-tmp"):
        for form in spellings(name, value):
            assert check_server_args(["rsync", "--server", *form, ".", "sub/"], (root,), root).paths == ["sub/"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(CONFINED_REFUSED)), st.sampled_from(["", "v", "logDtpr"]), st.sampled_from(["", "x"]))
def test_a_refused_option_is_refused_in_every_spelling(tree: Path, name: str, before: str, after: str) -> None:
    root = str(tree / "root")
    value = "sub" if takes_value(name) else None
    forms = spellings(name, value) if value is not None else [[name]] if name.startswith("--") else []
    if name in LETTER:
        forms.append([f"-{before}{LETTER[name]}{after if value is None else 'sub'}"])
    for form in forms:
        command = ["rsync", "--server", *form, ".", "sub/"]
        check_server_args(command)  # fine unconfined
        with pytest.raises(PermissionDenied, match="confined"):
            check_server_args(command, (root,), root)


def test_popt_next_argument_splice_is_refused_when_confined(tree: Path) -> None:
    root = str(tree / "root")
    command = ["rsync", "--server", "--temp-dir=/!#:+", ".", "sub/", "etc"]
    assert check_server_args(command).paths == ["sub/", "etc"]
    with pytest.raises(PermissionDenied, match="splices"):
        check_server_args(command, (root,), root)


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    """A remote shell that records the server command rsync asks for, then fails."""
    script = tmp_path / "record.sh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\nexit 3\n')
    script.chmod(0o755)
    (tmp_path / "src.txt").write_text("x\n")
    return script


def forwarded(recorder: Path, *options: str, env: dict[str, str] | None = None) -> list[str] | None:
    """The server argv the real rsync client sends for `options` (an upload), None if it refused them."""
    argv_file = recorder.parent / "argv"
    if argv_file.exists():
        argv_file.unlink()
    assert RSYNC is not None
    command = [RSYNC, "-e", str(recorder), *options, "src.txt", "host:dst/"]
    subprocess.run(command, capture_output=True, timeout=30, stdin=subprocess.DEVNULL, cwd=recorder.parent, env=env)
    return argv_file.read_text().splitlines()[2:] if argv_file.exists() else None


#: Path-valued options the client forwards on an upload, as it writes them to the server.
FORWARDED = ["--temp-dir", "--backup-dir", "--partial-dir", "--link-dest", "--compare-dest", "--copy-dest"]
segments = st.lists(st.text("abcxyz019_", min_size=1, max_size=6), min_size=1, max_size=3)


@needs_rsync
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(FORWARDED), segments, st.booleans(), st.data())
def test_the_real_client_reads_every_spelling_as_we_do(
    recorder: Path, name: str, parts: list[str], absolute: bool, data: st.DataObject
) -> None:
    value = ("/" if absolute else "") + "/".join(parts)
    form = data.draw(st.sampled_from(spellings(name, value)))
    ours = [v for n, v in parse_args(form).pairs if n == name]
    server = forwarded(recorder, *form)
    assert server is not None, form
    theirs = [v for n, v in parse_args(server).pairs if n == name]
    assert [v.rstrip("/") for v in theirs if v is not None] == [value] == ours, (form, server)


@needs_rsync
@pytest.mark.parametrize(
    "form", [["--temp-d=/x"], ["--copy-l"], ["-a=x"], ["--archive=x"], ["-Q"], ["-T=/x", "--no-a"]]
)
def test_what_we_refuse_the_real_rsync_refuses(recorder: Path, form: list[str]) -> None:
    with pytest.raises(PermissionDenied):
        parse_args(form)
    assert forwarded(recorder, *form) is None


@needs_rsync
def test_the_real_rsync_splices_the_next_argument_into_a_value(recorder: Path) -> None:
    """Why `!#:+` is refused: popt's expandNextArg() is applied to every option value."""
    server = forwarded(recorder, "--temp-dir=x!#:+", "other.txt")
    assert server is not None
    parsed = parse_args(server)
    assert ("--temp-dir", "xother.txt") in parsed.pairs  # other.txt went into the value...
    assert parsed.arguments == [".", "dst/"]  # ...and out of the arguments: only src.txt is sent


@needs_rsync
def test_posixly_correct_stops_the_real_rsync_at_the_first_argument(recorder: Path) -> None:
    env = {**os.environ, "POSIXLY_CORRECT": "1"}
    assert ("--temp-dir", "x") in parse_args(forwarded(recorder, "-T=x", "src.txt") or []).pairs
    server = forwarded(recorder, "src.txt", "-T=x", env=env)  # -T=x is a source file now
    assert server is not None and not any(name == "--temp-dir" for name, _ in parse_args(server).pairs)


@pytest.fixture
def server_shell(tmp_path: Path) -> Path:
    """A remote shell that ignores the command rsync asks for and runs `rsync` with the argv in $SERVER_ARGS."""
    script = tmp_path / "server.py"
    script.write_text(
        f"#!{sys.executable}\nimport json, os\n"
        'args = json.loads(os.environ["SERVER_ARGS"])\nos.execvp("rsync", ["rsync", *args])\n'
    )
    script.chmod(0o755)
    (tmp_path / "src.txt").write_text("x\n")
    (tmp_path / "dst").mkdir()
    return script


@needs_rsync
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text("abz09_=", min_size=1, max_size=6), st.booleans(), st.data())
def test_the_real_server_takes_every_spelling_of_the_temp_dir_as_we_do(
    server_shell: Path, name: str, absolute: bool, data: st.DataObject
) -> None:
    """`rsync --server` names the temp dir it was given when it does not exist: the value as rsync parsed it."""
    value = f"{server_shell.parent}/missing-{name}" if absolute else name
    form = data.draw(st.sampled_from(spellings("--temp-dir", value)))
    server = ["--server", "-vlogDtpre.iLsfxCIvu", *form, ".", "dst/"]
    assert [v for n, v in parse_args(server).pairs if n == "--temp-dir"] == [value]
    result = subprocess.run(
        [RSYNC or "rsync", "-a", "-e", str(server_shell), "src.txt", "host:dst/"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        cwd=server_shell.parent,
        env={**os.environ, "SERVER_ARGS": json.dumps(server)},
    )
    assert f"The temp-dir does not exist: {value}\n" in result.stderr, (form, result.stderr)


def test_wait_for_eof_returns_once_every_writer_is_gone_and_is_bounded() -> None:
    from osmo_router.client.rsync import wait_for_eof

    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"not yet the end")
        assert not wait_for_eof(read_end, 0.2)  # data is not EOF, and a held write end is waited for at most that
        os.close(write_end)
        assert wait_for_eof(read_end, 5.0)
    finally:
        os.close(read_end)


@pytest.mark.parametrize(
    "args",
    [
        ["-e", "ssh"],
        ["-essh"],
        ["-ave", "ssh"],
        ["--rsh=ssh"],
        ["--rsh", "ssh"],
        ["--rsync-path=/bin/x"],
        ["--exclude", "x", "-e", "ssh"],  # after a long option's value, -e is an option again
    ],
)
def test_options_replacing_the_remote_shell_are_refused(args: list[str]) -> None:
    import click

    from osmo_router.client.rsync import check_extra_args

    with pytest.raises(click.UsageError, match="remote shell is osmo-net-client's own"):
        check_extra_args(args)


@pytest.mark.parametrize(
    "args",
    [
        ["-z"],
        ["-avz", "--partial"],
        ["-f", "- *.e"],
        ["-f- *.e"],
        ["-T", "/tmp/e"],
        ["--exclude=-e"],
        ["-B1024"],
        # A long option's value in the next word, as rsync takes it: `--exclude -e` excludes files named -e.
        ["--exclude", "-e"],
        ["--include", "-essh", "--filter", "-e"],
        ["--chmod", "-e", "-z"],
    ],
)
def test_other_options_pass(args: list[str]) -> None:
    from osmo_router.client.rsync import check_extra_args

    check_extra_args(args)  # an `e` inside another option's argument is not -e
