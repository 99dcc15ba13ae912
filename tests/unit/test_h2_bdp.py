"""The stream window grows to the link's bandwidth-delay product (h2/bdp.py): the estimator's rules,
then two real connections through a delay link."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from osmo_router.h2.bdp import MAX_PING_GAP, BdpEstimator
from osmo_router.h2.connection import Connection, H2Config, Stream
from tests.delay_link import start as start_delay_link
from tests.h2_pair import connected_pair, read_until

MIB = 1024 * 1024
REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/M"), (":authority", "x"), ("te", "trailers")]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_sample_grows_the_window_to_twice_it_up_to_the_limit() -> None:
    clock = Clock()
    bdp = BdpEstimator(2 * MIB, 16 * MIB, clock)
    assert bdp.on_data(64 * 1024)  # the first data sends a ping
    assert not bdp.on_data(3 * MIB)  # one ping at a time; counted in the sample
    clock.now += 0.04
    assert bdp.on_ack() == 2 * (3 * MIB + 64 * 1024)
    assert bdp.rtt == pytest.approx(0.04)
    assert bdp.on_data(1)  # grown: the next ping goes at once
    bdp.on_data(20 * MIB)
    clock.now += 0.04
    assert bdp.on_ack() == 16 * MIB  # capped
    assert not bdp.on_data(MIB)  # at the limit: no more pings


def test_a_sample_below_two_thirds_of_the_window_does_not_grow_it_and_spaces_the_pings() -> None:
    clock = Clock()
    bdp = BdpEstimator(2 * MIB, 16 * MIB, clock)
    gaps = []
    acked_at = clock.now
    for _ in range(10):  # gaps of 0.01 s doubling reach 1 s in 8 steps
        while not bdp.on_data(1):
            clock.now += 0.001
        gaps.append(clock.now - acked_at)
        bdp.on_data(MIB)  # 1 MiB of a 2 MiB window: the sender, not the window, is the limit
        clock.now += 0.01
        assert bdp.on_ack() is None
        acked_at = clock.now
    assert gaps[1] == pytest.approx(0.01, abs=0.002)  # a round trip after the first sample
    assert gaps[2] == pytest.approx(0.02, abs=0.002)  # then doubling
    assert gaps[-1] == pytest.approx(MAX_PING_GAP, abs=0.002)  # up to the most
    assert bdp.window == 2 * MIB


def test_a_peer_that_delays_its_acks_does_not_grow_the_window_with_the_same_bandwidth() -> None:
    clock = Clock()
    bdp = BdpEstimator(2 * MIB, 16 * MIB, clock)
    bdp.on_data(2 * MIB)
    clock.now += 0.01
    assert bdp.on_ack() == 4 * MIB  # 200 MiB/s, the window was full
    for delay in (0.02, 0.04, 0.08):  # the same 200 MiB/s, the ack held back longer each time
        clock.now += 2
        assert bdp.on_data(int(200 * MIB * delay))
        clock.now += delay
        assert bdp.on_ack() is None
    assert bdp.window == 4 * MIB


def test_between_samples_the_estimator_needs_no_data_until_its_timer_marks_the_next_ping_due() -> None:
    """With a scheduler, `active` is off from an ack that puts the next ping off until that ping's
    time (callers then skip on_data and its clock read per DATA frame), and on again for a grown window."""
    clock = Clock()
    timers: list[tuple[float, Callable[[], None]]] = []
    bdp = BdpEstimator(2 * MIB, 16 * MIB, clock, later=lambda delay, callback: timers.append((delay, callback)))
    assert bdp.active and bdp.on_data(MIB)  # the first ping
    clock.now += 0.01
    assert bdp.on_ack() is None  # half the window: no growth, the next ping a round trip later
    assert not bdp.active
    assert [delay for delay, _ in timers] == [pytest.approx(0.01)]
    clock.now += 0.01
    timers.pop()[1]()  # the loop runs the timer
    assert bdp.active and bdp.on_data(2 * MIB)
    clock.now += 0.01
    assert bdp.on_ack() == 4 * MIB
    assert bdp.active and not timers  # grown: the next ping at once
    bdp.on_data(8 * MIB)
    clock.now += 0.01
    assert bdp.on_ack() == 16 * MIB
    assert not bdp.active  # at the limit: never again


def test_an_ack_never_asked_for_changes_nothing() -> None:
    bdp = BdpEstimator(2 * MIB, 16 * MIB, Clock())
    assert bdp.on_ack() is None
    assert bdp.window == 2 * MIB


async def _transfer_through_delay_link(config: H2Config, delay: float, total: int) -> tuple[Connection, Stream, int]:
    """Send `total` bytes in 64 KiB messages client -> server over a link of `delay` each way; returns
    the server's connection, the client's stream once the server read everything, and what a second client
    stream that sent 1 MiB first and whose messages the server never reads has still unsent (taken before
    the close, which ends the streams)."""
    links: list[asyncio.Server] = []

    async def via(port: int) -> int:
        links.append(await start_delay_link(("127.0.0.1", port), delay))
        return int(links[0].sockets[0].getsockname()[1])

    async with connected_pair(config, via=via) as connected:
        client, served, servers = connected.client, connected.streams, connected.servers
        try:
            stalled = await client.open_stream(REQUEST)
            for _ in range(16):  # 1 MiB in messages smaller than the window (a larger one may arrive whole)
                stalled.write_nowait(bytes(64 * 1024))
            await served.get()  # never read
            stream = await client.open_stream(REQUEST)
            message = bytes(64 * 1024)

            async def send() -> None:
                for _ in range(total // len(message)):
                    await stream.write(message)

            sender = asyncio.create_task(send())
            receiving = await served.get()
            got = 0
            while got < total:
                chunk = await receiving.read()
                assert chunk is not None
                got += len(chunk)
            await sender
            await _grants_arrived(client, stream, receiving)
            return servers[0], stream, stalled.unsent
        finally:
            links[0].close()


async def _grants_arrived(client: Connection, sending: Stream, receiving: Stream) -> None:
    """Until every WINDOW_UPDATE the receiver sent for the stream crossed the link (both sides then
    agree on what the sender may still send), checked after each read of the client's connection."""
    await read_until(client, lambda: sending.send_window == receiving._recv_left)


@pytest.mark.asyncio
async def test_the_window_grows_on_a_long_link_and_the_sender_sees_it() -> None:
    config = H2Config(stream_window=256 * 1024, max_stream_window=4 * MIB, connection_window=16 * MIB)
    async with asyncio.timeout(60):
        server, stream, stalled = await _transfer_through_delay_link(config, delay=0.05, total=24 * MIB)
    # 256 KiB per 100 ms round trip is 2.5 MiB/s: the window is the limit, so it grew.
    assert server.stream_window >= 1 * MIB
    assert server.stream_window <= 4 * MIB
    # The client took the grown window up for its open stream: at the end (everything read and the
    # grants arrived, at most a quarter of the window not yet given back) it may send more than the first.
    assert stream.send_window > 256 * 1024
    # A stream whose reader never read keeps the first window (plus the message in part received,
    # given back so that it can complete): most of its 1 MiB is still unsent.
    assert stalled >= MIB + 16 * 5 - (256 * 1024 + 64 * 1024 + 5)


@pytest.mark.asyncio
async def test_no_growth_when_the_limit_is_the_window() -> None:
    config = H2Config(stream_window=256 * 1024, max_stream_window=256 * 1024, connection_window=16 * MIB)
    async with asyncio.timeout(60):
        server, _, _ = await _transfer_through_delay_link(config, delay=0.02, total=4 * MIB)
    assert server.stream_window == 256 * 1024
