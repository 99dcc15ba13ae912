"""The agent's terminals (agent/pty.py): sizes on a real PTY."""

from __future__ import annotations

import os

import pytest

from osmo_router.agent import pty as ptys


def test_set_size_says_whether_the_size_changed() -> None:
    master, slave = ptys.open_pty(30, 100)
    try:
        assert os.get_terminal_size(slave) == (100, 30)
        assert ptys.set_size(master, 30, 100) is False  # the kernel signals nobody for this one
        assert ptys.set_size(master, 31, 100) is True
        assert ptys.set_size(master, 31, 120) is True
        assert os.get_terminal_size(slave) == (120, 31)
    finally:
        os.close(master)
        os.close(slave)


def test_a_size_out_of_range_is_refused_and_changes_nothing() -> None:
    master, slave = ptys.open_pty(24, 80)
    try:
        with pytest.raises(ValueError, match="out of range"):
            ptys.set_size(master, 70000, 80)
        assert os.get_terminal_size(slave) == (80, 24)
    finally:
        os.close(master)
        os.close(slave)
