"""client/notice.py: the one writer of the client's own stderr lines."""

from __future__ import annotations

import errno
import io

import pytest

from osmo_router.client.notice import say


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class _HungUp(_Terminal):
    """A terminal that hung up: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")


def test_a_plain_line_names_the_program_and_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    say("cannot listen: Address already in use", "port-forward", tty=False)
    say("defaulted to task 'a' out of: 'a', 'b' (pass --task to choose)", tty=False)
    assert capsys.readouterr().err == (
        "osmo-net-client: port-forward: cannot listen: Address already in use\n"
        "osmo-net-client: defaulted to task 'a' out of: 'a', 'b' (pass --task to choose)\n"
    )


def test_a_raw_terminal_line_starts_and_ends_with_crlf(capsys: pytest.CaptureFixture[str]) -> None:
    say("the session ended", "exec", tty=True)
    assert capsys.readouterr().err == "\r\nosmo-net-client: exec: the session ended\r\n"


def test_unsaid_mode_frames_the_line_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, terminal = io.StringIO(), _Terminal()
    monkeypatch.setattr("sys.stderr", pipe)
    say("session resumed")
    monkeypatch.setattr("sys.stderr", terminal)
    say("session resumed")
    assert pipe.getvalue() == "osmo-net-client: session resumed\n"
    assert terminal.getvalue() == "\r\nosmo-net-client: session resumed\r\n"


def test_a_stderr_that_is_gone_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", _HungUp())
    say("detached", "attach", tty=False)  # no OSError: the line has nowhere to go
