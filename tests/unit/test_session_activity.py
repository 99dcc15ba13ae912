"""A session's activity for idle expiry (core/session.py Session.last_activity): the relay counts bytes
per message and reads no clock; a look that finds bytes moved since the look before sees the session
active then, and a session that moved nothing keeps its last time."""

from __future__ import annotations

import pytest

from osmo_router.router.core import session as session_module
from osmo_router.router.core.session import Session


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bytes_counted_since_the_last_look_are_activity_and_nothing_else_is(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(session_module.time, "monotonic", clock)
    # (active_at's default comes from the real clock: created at the fake clock's now instead)
    session = Session(key="k", workflow_id="w", task="t", buffer=16, active_at=clock())
    assert session.last_activity == 100.0
    clock.now = 110.0
    assert session.last_activity == 100.0  # nothing moved: idle for 10 s
    session.bytes_to_agent += 5  # (the relay, per message)
    clock.now = 112.0
    assert session.last_activity == 112.0  # moved since the last look: active at this look
    clock.now = 130.0
    assert session.last_activity == 112.0  # and idle since
    session.bytes_to_client += 1
    assert session.last_activity == 130.0
