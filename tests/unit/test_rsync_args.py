"""The rules around rsync: which server commands the agent runs, and how the client builds rsync's command line."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from osmo_router.agent.rsync_args import check_server_args
from osmo_router.client.config import ClientConfig
from osmo_router.client.rsync import plan_paths, rsync_argv, shell_env
from osmo_router.client.rsync_shell import parse_remote_command
from osmo_router.dial.config import DialConfig
from osmo_router.wire.errors import PermissionDenied

RECEIVER = ["rsync", "--server", "-logDtpre.iLsfxCIvu"]
SENDER = ["rsync", "--server", "--sender", "-logDtpre.iLsfxCIvu"]


@pytest.fixture
def roots(tmp_path: Path) -> tuple[str, ...]:
    """One allowed root with a symlink pointing out of it."""
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "root" / "out").symlink_to(tmp_path / "other")
    (tmp_path / "root" / "sub" / "link").symlink_to(tmp_path / "other")
    return (str(tmp_path / "root"),)


def test_a_plain_server_command_passes_unconfined() -> None:
    command = check_server_args([*RECEIVER, "--delete", ".", "/anywhere/"])
    assert command.args == [*RECEIVER[1:], "--delete", ".", "/anywhere/"]
    assert command.paths == ["/anywhere/"]
    assert not command.sender
    assert check_server_args([*SENDER, ".", "a", "b"]).sender
    # rsync passes a remote --files-from list as two arguments: the value is not a path argument.
    assert check_server_args([*SENDER, "--files-from", "/list", "--from0", ".", "src/"]).paths == ["src/"]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["sh", "-c", "id"],
        ["/usr/bin/rsync", "--server", ".", "x"],
        ["rsync", "--daemon"],
        ["rsync", "-e", "--server"],
        ["rsync", "--server", "--daemon", "."],
        ["rsync", "--server", "--config=/tmp/c", "."],
        ["rsync", "--server", "-logDtpre.iLsfx", "/x", "/y"],  # no "." placeholder
    ],
)
def test_anything_but_rsync_server_is_refused(argv: list[str]) -> None:
    with pytest.raises(PermissionDenied):
        check_server_args(argv)


@pytest.mark.parametrize("path", ["sub/", "./sub/new", "", "sub/../sub"])
def test_relative_and_inner_paths_pass_when_confined(roots: tuple[str, ...], path: str) -> None:
    assert check_server_args([*RECEIVER, ".", path], roots, roots[0]).paths == [path]


@pytest.mark.parametrize(
    "tail",
    [
        [".", "/etc/"],
        [".", "../other/"],
        [".", "out/"],  # a symlink that leads out
        [".", "out/../other"],
        [".", "sub/", "/etc/passwd"],
        [".", "sub/", "--log-file=/tmp/evil.log"],  # options after the paths count too
        ["--temp-dir", "/tmp", ".", "sub/"],
        ["-T/tmp", ".", "sub/"],
        ["--backup-dir", "/var/backup", ".", "sub/"],
        ["--link-dest=/usr", ".", "sub/"],
        # rsync (popt) strips the "=" of an attached short value: -T=/tmp is the temp dir /tmp.
        ["-T=/tmp", ".", "sub/"],
        ["-avT=/tmp", ".", "sub/"],
        ["-aT/tmp", ".", "sub/"],
        ["-aT", "/tmp", ".", "sub/"],
        ["--temp-dir=/tmp", ".", "sub/"],
        ["-T=out", ".", "sub/"],  # a relative value through a symlink
        ["--partial-dir=link", ".", "sub/"],  # relative to the destination, where sub/link leads out
        ["--backup-dir", "link/x", ".", "sub/"],
        [".", "sub/", "--confine-root=/"],
        ["--password-file=/etc/shadow", ".", "sub/"],
    ],
)
def test_paths_outside_the_roots_are_refused(roots: tuple[str, ...], tail: list[str]) -> None:
    with pytest.raises(PermissionDenied, match="outside the allowed rsync roots"):
        check_server_args([*RECEIVER, *tail], roots, roots[0])


@pytest.mark.parametrize(
    "argv",
    [
        ["rsync", "--server", "-slogDtpre.iLsfxCIvu"],  # protect-args: the paths are not on the command line
        [*SENDER, "--copy-links", ".", "sub/"],
        ["rsync", "--server", "--sender", "-lLogDtpre.iLsfx", ".", "sub/"],
        ["rsync", "--server", "-lKogDtpre.iLsfx", ".", "sub/"],
        [*SENDER, "--files-from=-", "--from0", ".", "sub/"],
        [*RECEIVER, "-f", ". /etc/shadow", ".", "sub/"],
        [*RECEIVER, "-vf. /etc/shadow", ".", "sub/"],
        [*RECEIVER, "-F", ".", "sub/"],  # --filter='dir-merge /.rsync-filter'
        [*SENDER, "-avL", ".", "sub/"],
        [*SENDER, "-vsa", ".", "sub/"],
        [*SENDER, "--secluded-args", ".", "sub/"],
        [*SENDER, ".", "sub/", "--copy-unsafe-links"],
        [*RECEIVER, "--trust-sender", ".", "sub/"],
        [*RECEIVER, "--insecure-links", ".", "sub/"],
        [*RECEIVER, "-M--copy-links", ".", "sub/"],
        [*RECEIVER, "--temp-dir=!#:+", ".", "sub/", "x"],  # popt splices "sub/" into the value
    ],
)
def test_options_that_escape_are_refused_when_confined(roots: tuple[str, ...], argv: list[str]) -> None:
    check_server_args(argv)  # fine without roots
    with pytest.raises(PermissionDenied, match="confined"):
        check_server_args(argv, roots, roots[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*RECEIVER, "--copy-l", ".", "sub/"], "unknown rsync option --copy-l (rsync takes no abbreviations"),
        ([*RECEIVER, "--temp-d=/tmp", ".", "sub/"], "unknown rsync option --temp-d"),
        ([*RECEIVER, "-Q", ".", "sub/"], "unknown rsync option -Q"),
        ([*RECEIVER, "--delete=yes", ".", "sub/"], "takes no value"),
        ([*RECEIVER, ".", "sub/", "-T"], "needs a value"),
        ([*RECEIVER, "--detach", ".", "sub/"], "not allowed through an rsync session"),
        ([*RECEIVER, "-v", "--early-input=/x", ".", "sub/"], "not allowed through an rsync session"),
    ],
)
def test_what_rsync_would_not_parse_is_refused_even_unconfined(argv: list[str], message: str) -> None:
    with pytest.raises(PermissionDenied, match=re.escape(message)):
        check_server_args(argv)


def test_letters_after_a_valued_letter_are_its_value(roots: tuple[str, ...]) -> None:
    """In -logDtpre.iLsfxCIvu the L, s and f belong to -e's value (the client's capabilities)."""
    assert check_server_args([*SENDER, "-T.tmp", "--sender", ".", "sub/"], roots, roots[0]).sender
    assert check_server_args([*RECEIVER, "-aT", "sub", ".", "sub/"], roots, roots[0]).paths == ["sub/"]


def test_dotdot_in_a_path_option_is_refused_when_confined(roots: tuple[str, ...]) -> None:
    with pytest.raises(PermissionDenied, match=r"'\.\.' is not allowed"):
        check_server_args([*RECEIVER, "--partial-dir=sub/../..", ".", "sub/"], roots, roots[0])


def test_path_options_inside_the_roots_pass(roots: tuple[str, ...]) -> None:
    argv = [*RECEIVER, "--partial-dir", ".rsync-partial", "--temp-dir", f"{roots[0]}/sub", ".", "sub/"]
    assert check_server_args(argv, roots, roots[0]).paths == ["sub/"]


def test_remote_command_is_split_like_a_remote_shell() -> None:
    words = ["osmo", "rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "/tmp/a\\ b/c\\'d"]
    assert parse_remote_command(words) == ["rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "/tmp/a b/c'd"]
    assert parse_remote_command(["-l", "me", "osmo", "rsync", "--server", "."]) == ["rsync", "--server", "."]
    with pytest.raises(ValueError):
        parse_remote_command(["osmo"])


def test_paths_plan() -> None:
    assert plan_paths(["a", "b:c", ":/x"]) == ["a", "./b:c", "osmo:/x"]
    assert plan_paths([":/x", ":y", "local/"]) == ["osmo:/x", "osmo:y", "local/"]
    for bad in (["a", "b"], [":a", ":b"], [":a", "b", "c"], ["a"], ["a", "::module"]):
        with pytest.raises(click.UsageError):
            plan_paths(bad)


def test_the_token_travels_in_the_environment_not_the_command_line() -> None:
    config = ClientConfig(dial=DialConfig(address="r:1", tls=False, token="s3cret"), workflow_id="wf")
    argv = rsync_argv(config, "rsync", ["src/", ":/dst/"], delete=True, exclude=["*.o"], progress=True, bwlimit="10m")
    assert not any("s3cret" in arg for arg in argv)
    assert argv[:6] == ["rsync", "-a", "--delete", "--exclude=*.o", "--progress", "--bwlimit=10m"]
    assert argv[-3:] == ["--", "src/", "osmo:/dst/"]
    env = shell_env(config, {"OSMO_TOKEN": "stale", "OSMO_TLS_CA": "/stale", "HOME": "/h"})
    assert env["OSMO_TOKEN"] == "s3cret" and env["OSMO_TLS"] == "false" and env["OSMO_WORKFLOW_ID"] == "wf"
    assert "OSMO_TLS_CA" not in env and env["HOME"] == "/h"
    native = ClientConfig(dial=DialConfig(address="r:1", grpc_channel="native"), workflow_id="wf")
    assert shell_env(native, {})["OSMO_GRPC_CHANNEL"] == "native"  # the remote shell dials as the command does


def test_posixly_correct_makes_everything_after_the_first_path_a_path(
    roots: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """popt stops at the first argument under POSIXLY_CORRECT, and rsync --server inherits the agent's environment."""
    argv = [*RECEIVER, ".", "sub/", "--log-file=/tmp/x"]
    with pytest.raises(PermissionDenied):
        check_server_args(argv, roots, roots[0])
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    assert check_server_args(argv, roots, roots[0]).paths == ["sub/", "--log-file=/tmp/x"]
