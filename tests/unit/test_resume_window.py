"""Numbering and the replay buffer of resumable sessions (resume/window.py)."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.resume.window import AckClock, ReplayBuffer, SharedWindow, ack_interval, slice_from, units_of
from osmo_router.wire.codec import decode_data_message, encode_data_message
from osmo_router.wire.protocol import pb


def test_units_count_payload_bytes_and_one_per_control_frame() -> None:
    assert units_of(pb.Frame(data=b"abcde")) == 5
    assert units_of(pb.Frame(stderr=b"xy")) == 2
    assert units_of(pb.Frame(half_close=pb.HalfClose())) == 1
    assert units_of(pb.Frame(exit_status=pb.ExitStatus(code=3))) == 1
    assert units_of(pb.Frame(ack=pb.Ack(received=9))) == 0
    assert units_of(pb.Frame(resume=pb.Resume())) == 0
    assert units_of(pb.Frame(detach=pb.Detach())) == 0


def test_ack_forgets_only_whole_frames_received() -> None:
    buffer = ReplayBuffer(1 << 20)
    buffer.append(pb.Frame(data=b"a" * 10), 10, 10)
    buffer.append(pb.Frame(half_close=pb.HalfClose()), 1, 2)
    buffer.append(pb.Frame(data=b"b" * 5), 5, 5)
    assert buffer.end == 16
    buffer.ack(9)  # inside the first frame: it stays
    assert len(buffer) == 3 and buffer.base == 9
    buffer.ack(11)
    assert len(buffer) == 1 and buffer.first_held() == 11
    buffer.ack(16)
    assert buffer.settled and buffer.bytes == 0


def test_resend_from_inside_a_frame_cuts_it() -> None:
    buffer = ReplayBuffer(1 << 20)
    buffer.append(encode_data_message(b"0123456789"), 10, 13)
    buffer.append(pb.Frame(data=b"abc"), 3, 3)
    items = [item for _, item in buffer.since(4)]
    first = items[0]
    assert isinstance(first, bytes)
    assert bytes(decode_data_message(first) or b"") == b"456789"
    assert items[1] == pb.Frame(data=b"abc")
    assert buffer.since(10)[0][1] == pb.Frame(data=b"abc")
    assert buffer.since(13) == []


def test_slice_of_stderr_keeps_its_kind() -> None:
    buffer = ReplayBuffer(1 << 20)
    entry = buffer.append(pb.Frame(stderr=b"hello"), 5, 5)
    assert slice_from(entry, 2) == pb.Frame(stderr=b"llo")


def test_holds_tells_what_can_be_resent() -> None:
    buffer = ReplayBuffer(1 << 20)
    buffer.append(pb.Frame(data=b"x" * 4), 4, 4)
    buffer.append(pb.Frame(data=b"y" * 4), 4, 4)
    buffer.ack(4)
    assert buffer.holds(4) and buffer.holds(6) and buffer.holds(8)
    assert not buffer.holds(3) and not buffer.holds(9)


@pytest.mark.asyncio
async def test_reserve_waits_for_an_ack_when_full() -> None:
    buffer = ReplayBuffer(1000)
    buffer.append(pb.Frame(data=b"x" * 600), 600, 600)
    waiter = asyncio.create_task(buffer.reserve(600))
    await asyncio.sleep(0)
    assert not waiter.done()
    buffer.ack(600)
    await asyncio.wait_for(waiter, 1)


@pytest.mark.asyncio
async def test_reserve_takes_one_oversized_frame_into_an_empty_buffer() -> None:
    buffer = ReplayBuffer(1000)
    await asyncio.wait_for(buffer.reserve(5000), 1)


@pytest.mark.asyncio
async def test_close_wakes_a_blocked_sender() -> None:
    buffer = ReplayBuffer(1000)
    buffer.append(pb.Frame(data=b"x" * 900), 900, 900)
    waiter = asyncio.create_task(buffer.reserve(900))
    settled = asyncio.create_task(buffer.wait_settled())
    await asyncio.sleep(0)
    buffer.close()
    await asyncio.wait_for(asyncio.gather(waiter, settled), 1)


def test_a_closed_buffer_holds_nothing_more() -> None:
    """What a session sends after its end (a command's last output, its exit status) is numbered and not held:
    held, it kept `settled` False for good (an agent spun at 100% CPU waiting for it) and kept the shared window."""
    shared = SharedWindow(10_000)
    buffer = ReplayBuffer(1000, shared)
    buffer.append(pb.Frame(data=b"x" * 100), 100, 100)
    buffer.close()
    entry = buffer.append(pb.Frame(data=b"y" * 100), 100, 100)
    assert entry.start == 100 and buffer.end == 200
    assert buffer.settled and len(buffer) == 0 and buffer.bytes == 0 and shared.used == 0


@pytest.mark.parametrize("every", [1, 100])
def test_ack_clock(every: int) -> None:
    clock = AckClock(every)
    assert clock.take(50) is (50 >= every)
    assert clock.owed
    frame = clock.frame()
    assert frame.ack.received == 50 and not clock.owed


@pytest.mark.asyncio
async def test_a_shared_window_bounds_all_buffers_together() -> None:
    shared = SharedWindow(1000)
    first, second = ReplayBuffer(800, shared), ReplayBuffer(800, shared)
    first.append(pb.Frame(data=b"x" * 500), 500, 500)
    second.append(pb.Frame(data=b"y" * 300), 300, 300)
    assert shared.used > 800
    # Within its own limit, but not within what the process may hold: the second buffer waits.
    blocked = asyncio.create_task(second.reserve(200))
    await asyncio.sleep(0)
    assert not blocked.done()
    first.ack(500)  # the first session's client acknowledged: room for everyone
    await asyncio.wait_for(blocked, 1)
    second.close()
    assert shared.used == 0


def test_ack_interval_is_a_quarter_of_the_peer_window() -> None:
    assert ack_interval(64 * 1024) == 16 * 1024
    assert ack_interval(0) == 256 * 1024  # an end that does not say
    assert ack_interval(8 * 1024 * 1024) == ack_interval(64 * 1024 * 1024) == 2 * 1024 * 1024
    assert ack_interval(1) == 4096
