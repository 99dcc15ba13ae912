"""The bounded send buffer of an HTTP/2 connection over a short link (io/send_buffer.py).

Real loopback connections (uvloop and asyncio's loop, plain and TLS) get SHORT_LINK_SNDBUF; a socket
the kernel measures a long round trip on keeps autotuning. There is no netem on this kernel, so the
long link is a socket whose TCP_INFO says so (the gate's own logic); the rest are real sockets.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from osmo_router.h2.connection import Connection
from osmo_router.io import send_buffer
from osmo_router.io.send_buffer import (
    SHORT_LINK_RTT_US,
    SHORT_LINK_SNDBUF,
    bound_send_buffer,
    send_buffer_cap,
    smoothed_rtt_us,
)
from tests.h2_pair import connected_pair
from tests.security_kit import loopback_tls
from tests.unit.test_h2_rcvlowat import CONFIG
from tests.unit.test_h2_rcvlowat_tcp import LOOPS, run

#: The real-socket checks of the bound need a host that grants it (net.core.wmem_max, see send_buffer.py).
granted = pytest.mark.skipif(
    (send_buffer_cap() or 0) < SHORT_LINK_SNDBUF, reason="net.core.wmem_max is below SHORT_LINK_SNDBUF here"
)


@pytest.fixture
def wmem_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make the gate read this value as the host's net.core.wmem_max (a global sysctl: not changed here)."""

    def set_cap(value: int) -> None:
        path = tmp_path / "wmem_max"
        path.write_text(f"{value}\n")
        monkeypatch.setattr(send_buffer, "WMEM_MAX_PATH", str(path), raising=False)

    return set_cap


def _sndbuf(conn: Connection) -> int:
    sock = conn.transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


def _both_ends(tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> Callable[[], Awaitable[None]]:
    """A check that both ends of one loopback connection have the bounded send buffer."""

    async def main() -> None:
        async with connected_pair(CONFIG, tls=tls) as connected:
            # The kernel doubles what was asked (its bookkeeping); autotuned, it reads tcp_wmem's figures.
            assert _sndbuf(connected.client) == 2 * SHORT_LINK_SNDBUF
            assert _sndbuf(connected.servers[0]) == 2 * SHORT_LINK_SNDBUF

    return main


@granted
@pytest.mark.parametrize("loop", LOOPS)
def test_both_ends_of_a_loopback_connection_get_the_bounded_send_buffer(loop: str) -> None:
    run(loop, _both_ends())


@granted
def test_over_tls_too(tmp_path: Path) -> None:
    run("uvloop", _both_ends(loopback_tls(tmp_path)))


def test_the_kernel_measures_a_loopback_round_trip_as_short() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as dialled:
            accepted, _ = listener.accept()
            with accepted:
                for sock in (dialled, accepted):
                    rtt = smoothed_rtt_us(sock)
                    assert rtt is not None and 0 < rtt < SHORT_LINK_RTT_US, rtt
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert smoothed_rtt_us(udp) is None
        assert not bound_send_buffer(udp)


class MeasuredSocket:
    """A TCP socket as the gate sees it: TCP_INFO with this smoothed round trip; what it was set to."""

    family, type = socket.AF_INET, socket.SOCK_STREAM

    def __init__(self, rtt_us: int) -> None:
        self.info = bytearray(104)
        struct.pack_into("I", self.info, 68, rtt_us)
        self.set: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_INFO)
        return bytes(self.info[:size])

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.set.append((level, option, value))


@pytest.mark.parametrize(
    ("rtt_us", "bounded"),
    [(20, True), (SHORT_LINK_RTT_US - 1, True), (SHORT_LINK_RTT_US, False), (40_000, False), (0, False)],
    ids=["loopback", "just-short", "at-the-limit", "wan-40ms", "not-measured"],
)
def test_only_a_short_round_trip_bounds_the_send_buffer(
    rtt_us: int, bounded: bool, wmem_max: Callable[[int], None]
) -> None:
    wmem_max(4 << 20)
    sock = MeasuredSocket(rtt_us)
    assert bound_send_buffer(sock) is bounded  # type: ignore[arg-type]
    assert sock.set == ([(socket.SOL_SOCKET, socket.SO_SNDBUF, SHORT_LINK_SNDBUF)] if bounded else [])


def test_the_offset_read_is_tcpi_rtt() -> None:
    """Against the kernel: a real socket's tcpi_rtt field sits where the gate reads it (rttvar right
    after it is non-zero and under the rtt's scale too), so a layout change would show here."""
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as dialled,
    ):
        info = dialled.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        state, rto = info[0], struct.unpack_from("I", info, 8)[0]
        assert state == 1  # TCP_ESTABLISHED
        assert rto >= 200_000  # tcpi_rto, microseconds: at least TCP_RTO_MIN (200 ms)
        assert 0 < struct.unpack_from("I", info, 68)[0] < rto


@pytest.mark.parametrize("cap", [212_992, SHORT_LINK_SNDBUF - 1])
def test_a_host_that_would_cut_the_bound_keeps_autotuning(cap: int, wmem_max: Callable[[int], None]) -> None:
    """212992 is the kernel's default net.core.wmem_max: SO_SNDBUF 1 MiB would silently become 416 KiB
    of buffer, a bound nobody measured, with autotuning off for good. A real loopback socket keeps its own."""
    wmem_max(cap)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as dialled:
            accepted, _ = listener.accept()
            with accepted:
                before = dialled.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                assert not bound_send_buffer(dialled)
                assert dialled.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before
