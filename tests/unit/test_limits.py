"""UserSessions: a port-forward command is one session of its user; its connections have their own bound."""

from __future__ import annotations

import pytest

from osmo_router.router.core.limits import UserSessions
from osmo_router.wire.errors import ResourceExhausted


def test_sessions_without_a_forward_id_each_count() -> None:
    users = UserSessions(max_per_user=2, max_per_forward=10)
    users.add("alice")
    users.add("alice")
    with pytest.raises(ResourceExhausted, match="alice holds its maximum of 2"):
        users.check("alice")
    users.check("bob")  # another user is not affected
    users.remove("alice")
    users.check("alice")


def test_one_forward_counts_once_and_bounds_its_connections() -> None:
    users = UserSessions(max_per_user=2, max_per_forward=3)
    for _ in range(3):
        users.check("alice", "fw1")
        users.add("alice", "fw1")
    with pytest.raises(ResourceExhausted, match="maximum of 3 connections"):
        users.check("alice", "fw1")
    users.add("alice")  # one more session fits: the forward counted once
    with pytest.raises(ResourceExhausted, match="alice holds its maximum"):
        users.check("alice", "fw2")  # a second forward is a second session
    for _ in range(3):
        users.remove("alice", "fw1")
    users.check("alice", "fw2")  # the forward's last connection gave its session back
