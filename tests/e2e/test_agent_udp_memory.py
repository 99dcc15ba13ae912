"""A UDP forward whose client stops reading holds the agent's memory to its byte bounds.

The target answers one datagram with a burst of large replies. The client (a raw gRPC call) reads
none of them, so once the router's queue and the windows between are full the agent's send waits,
and the replies queue in the agent. They used to be bounded in count only (1,024 datagrams: 60 MiB
of 60 KiB replies per session); now in bytes too (io/datagram_queue.py): the rest is dropped and
counted. A real router and agent; the agent's memory is read from /proc.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from tests.e2e.test_agent_limits import UdpSession, channel, datagram_frame, router
from tests.e2e.test_memory_idle import rss_kib
from tests.forward_servers import udp_echo_server
from tests.harness import AgentProc, Router

REPLY_SIZE = 60 * 1024
#: Replies in the burst: 120 MB, far beyond what the router and the windows take before the agent waits.
BURST = 2000
WAIT = 60.0
#: What the agent may grow by: its reply queue's 4 MiB (UDP_QUEUE_BYTES) and what waits to be written,
#: with room for the allocator. 1,024 queued replies were 60 MiB.
GROWTH_BOUND = 32 * 1024 * 1024

__all__ = ["channel", "router"]  # the fixtures, shared with test_agent_limits


def rx_queue(port: int) -> int | None:
    """Bytes waiting in the receive queue of the loopback UDP socket bound to `port` (/proc/net/udp)."""
    with open("/proc/net/udp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    return None


@contextmanager
def burst_target() -> Iterator[tuple[int, threading.Event]]:
    """A UDP server that answers its first datagram with BURST replies of REPLY_SIZE bytes, each sent
    once the sender's socket has taken the last (its receive queue empty), so none is lost before the
    agent reads it; yields its port and an event set when the burst was sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sent = threading.Event()

    def serve() -> None:
        sock.settimeout(WAIT)
        try:
            _, peer = sock.recvfrom(65536)
        except OSError:
            return
        deadline = time.monotonic() + WAIT
        payload = b"r" * REPLY_SIZE
        for _ in range(BURST):
            while (rx_queue(peer[1]) or 0) > 0 and time.monotonic() < deadline:
                time.sleep(0.0005)  # pacing to the agent's reads, not synchronisation: bounded by deadline
            sock.sendto(payload, peer)
        sent.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], sent
    finally:
        sock.close()
        thread.join(5)


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    return rss_kib(pid) * 1024


@pytest.mark.asyncio
async def test_replies_to_a_client_that_stopped_reading_are_bounded_in_bytes(
    router: Router, channel: grpc.aio.Channel
) -> None:
    wf = "wf-udp-memory"
    agent = AgentProc(router.address, wf)
    try:
        with burst_target() as (port, sent):
            session = UdpSession(channel, wf, port)
            await session.start()
            reader = session._reader
            assert reader is not None
            reader.cancel()  # the client reads nothing from now on
            await asyncio.gather(reader, return_exceptions=True)
            before = rss(agent.pid)
            assert await session.call.send(datagram_frame("p:1", b"go"))
            assert await asyncio.to_thread(sent.wait, WAIT), "the burst was not sent"
            # Every reply the agent's socket got has been read by the agent (paced to its reads).
            grown = rss(agent.pid) - before
            assert grown < GROWTH_BOUND, f"the agent grew by {grown >> 20} MiB"
            # Another UDP session on the same agent still gets its replies while this one holds its queue.
            with udp_echo_server() as echo_port:
                other = UdpSession(channel, wf, echo_port)
                await other.start()
                assert await other.probe("other:1"), "another session got no reply"
                await other.end()
            await session.end()
            record = agent.wait_for(lambda r: r.get("event") == "udp_forward_end", timeout=WAIT)
            assert record["dropped"] > 0, record
            assert record["dropped"] < BURST, record
    finally:
        agent.stop()
