"""router/core/abandoned.py: the keys whose client left before the agent joined, bounded and expiring."""

from __future__ import annotations

from osmo_router.router.core.abandoned import AbandonedKeys


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_remembered_for_its_time_to_live() -> None:
    clock = Clock()
    keys = AbandonedKeys(ttl=60.0, clock=clock)
    keys.add("wf\0a")
    assert "wf\0a" in keys and "wf\0b" not in keys
    clock.now += 59.9
    assert "wf\0a" in keys
    clock.now += 0.2
    assert "wf\0a" not in keys
    keys.add("wf\0b")  # an add drops what expired
    assert len(keys) == 1


def test_the_oldest_key_goes_first_when_full() -> None:
    clock = Clock()
    keys = AbandonedKeys(ttl=60.0, limit=3, clock=clock)
    for name in "abcd":
        keys.add(name)
        clock.now += 1
    assert len(keys) == 3
    assert "a" not in keys and all(name in keys for name in "bcd")
    keys.add("b")  # added again: the newest now, its time-to-live starts over
    keys.add("e")
    assert "c" not in keys and all(name in keys for name in "bde")


def test_a_key_used_again_is_forgotten() -> None:
    keys = AbandonedKeys(ttl=60.0)
    keys.add("wf\0a")
    keys.discard("wf\0a")
    keys.discard("wf\0never")
    assert "wf\0a" not in keys and len(keys) == 0
