"""Sessions per user, where one port-forward command is one session however many connections it carries.

A forwarded TCP connection is a stream (and a session) of its own, so counting streams would let a
load test or a connection pool through one `port-forward` hit the per-user limit after a few hundred
connections. A client that names its command (`PortForwardInit.forward_id`) is counted once per
command against `--max-sessions-per-user`, and its connections against `--max-connections-per-forward`.
Older clients send no id: each of their streams counts as a session, as before.
"""

from __future__ import annotations

from osmo_router.wire.errors import ResourceExhausted


class UserSessions:
    """Live sessions by user, port-forward commands counted once."""

    def __init__(self, max_per_user: int, max_per_forward: int) -> None:
        self._max_per_user = max_per_user
        self._max_per_forward = max_per_forward
        self._users: dict[str, int] = {}
        self._forwards: dict[tuple[str, str], int] = {}

    def check(self, user: str, forward_id: str = "") -> None:
        """Raise ResourceExhausted if one more session of `user` (in command `forward_id`) is over a limit."""
        live = self._forwards.get((user, forward_id), 0) if forward_id else 0
        if live:
            if live >= self._max_per_forward:
                raise ResourceExhausted(
                    f"this port-forward holds its maximum of {self._max_per_forward} connections"
                    " (--max-connections-per-forward)"
                )
            return
        if self._users.get(user, 0) >= self._max_per_user:
            raise ResourceExhausted(f"user {user} holds its maximum of {self._max_per_user} sessions")

    def add(self, user: str, forward_id: str = "") -> None:
        """Count one more session (a command's first stream counts for the user, the others only for it)."""
        if forward_id:
            live = self._forwards.get((user, forward_id), 0)
            self._forwards[(user, forward_id)] = live + 1
            if live:
                return
        self._users[user] = self._users.get(user, 0) + 1

    def remove(self, user: str, forward_id: str = "") -> None:
        """Count one session less."""
        if forward_id:
            left = self._forwards.get((user, forward_id), 1) - 1
            if left > 0:
                self._forwards[(user, forward_id)] = left
                return
            self._forwards.pop((user, forward_id), None)
        left = self._users.get(user, 1) - 1
        if left > 0:
            self._users[user] = left
        else:
            self._users.pop(user, None)
