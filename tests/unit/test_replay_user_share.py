"""One user's held sessions take at most her share of the agent's replay total and of its slots for
held sessions (agent/held_sessions.py)."""

from __future__ import annotations

from osmo_router.agent.held_sessions import REPLAY_USER_SHARE, HeldSessions
from osmo_router.resume.window import ReplayBuffer

MIB = 1024 * 1024


def test_a_user_that_never_acknowledges_leaves_room_for_another_user() -> None:
    held = HeldSessions(replay_bytes=16 * MIB, total_bytes=256 * MIB)
    mallory = held.window_for("mallory")
    assert held.window_for("mallory") is mallory, "one share per user, whatever her sessions"
    # Her 17 sessions append until their buffers say they are full (as their senders would wait).
    for _ in range(17):
        buffer = ReplayBuffer(16 * MIB, mallory)
        while buffer.fits_now(MIB):
            buffer.append(b"x", 1, MIB)
    share = held.window.limit // REPLAY_USER_SHARE
    # (a buffer that is empty may always take one frame: 17 of them past the share at most)
    assert held.window.used <= share + 17 * MIB, held.window.used
    # Alice's session still has room for a full window, not one frame per acknowledgement.
    buffer = ReplayBuffer(16 * MIB, held.window_for("alice"))
    for _ in range(12):  # (its own 16 MiB buffer counts each entry's overhead too)
        assert buffer.fits_now(MIB)
        buffer.append(b"a", 1, MIB)


def test_a_users_share_is_at_least_one_sessions_buffer() -> None:
    held = HeldSessions(replay_bytes=16 * MIB, total_bytes=32 * MIB)
    assert held.window_for("bob").limit == 16 * MIB  # a quarter (8 MiB) would not hold one session's buffer


def test_one_users_held_sessions_leave_room_for_the_others() -> None:
    from types import SimpleNamespace

    from osmo_router.agent.held_sessions import MAX_HELD, MAX_HELD_PER_USER

    held = HeldSessions(replay_bytes=16 * MIB, total_bytes=256 * MIB)
    sessions: dict[str, object] = held._held  # type: ignore[assignment]
    for n in range(MAX_HELD_PER_USER):
        sessions[f"m{n}"] = SimpleNamespace(user="mallory")
    assert "mallory" in held._full_for("mallory")
    assert held._full_for("alice") == "", "another user's sessions are still held"
    for n in range(MAX_HELD - MAX_HELD_PER_USER):
        sessions[f"o{n}"] = SimpleNamespace(user=f"user{n}")
    assert held._full_for("alice") == f"{MAX_HELD} resumable sessions"
