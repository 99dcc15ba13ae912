"""One user's held sessions fill at most her share of the agent's replay total (agent/held.py)."""

from __future__ import annotations

from osmo_router.agent.held import REPLAY_USER_SHARE, HeldSessions
from osmo_router.resume.window import ReplayBuffer, UserWindow

MIB = 1024 * 1024


def test_a_user_that_never_acknowledges_leaves_room_for_another_user() -> None:
    held = HeldSessions(replay_bytes=16 * MIB, total_bytes=256 * MIB)
    windows: dict[str, UserWindow] = held._user_windows
    mallory = windows["mallory"] = UserWindow(held.window.limit // REPLAY_USER_SHARE, held.window)
    alice = windows["alice"] = UserWindow(held.window.limit // REPLAY_USER_SHARE, held.window)
    # Her 17 sessions append until their buffers say they are full (as their senders would wait).
    for _ in range(17):
        buffer = ReplayBuffer(16 * MIB, mallory)
        while buffer.fits_now(MIB):
            buffer.append(b"x", 1, MIB)
    assert held.window.used <= held.window.limit // REPLAY_USER_SHARE + 17 * MIB
    # Alice's session still has room for a full window, not one frame per acknowledgement.
    buffer = ReplayBuffer(16 * MIB, alice)
    for _ in range(8):
        assert buffer.fits_now(MIB)
        buffer.append(b"a", 1, MIB)
