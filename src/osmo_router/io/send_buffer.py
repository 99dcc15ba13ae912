"""A bounded send buffer for a TCP socket on a short link (issue 18).

TCP autotuning lets a socket's send queue grow to tcp_wmem's maximum (4 MiB here) whatever the
link needs. On a link whose round trip is a few tens of microseconds (loopback, a rack, a cluster's
pod network) that queue holds bytes long enough for them to leave the CPU's caches: the receiver's
copy out of them, and the sender's next copies, cost more. With `iperf3` through a loopback
port-forward (docs/bench/NOTES.md):

- SHORT_LINK_SNDBUF on the three processes' HTTP/2 connections (h2/connection.py) cut their CPU
  per byte by 3-7% and raised throughput 4-8% (-P 1 and -P 8, both ways);
- LOCAL_SNDBUF on the forward's local sockets (io/socket_pumps.py, the application's on the client,
  the target's on the agent) cut the receiving edge's CPU per byte by a further 6-17%.

A fixed send buffer caps a socket at about its size per round trip, so it is set only when the
kernel's own measure of the round trip (TCP_INFO's smoothed RTT, known from the handshake on) is
below SHORT_LINK_RTT_US: 512 KiB per 500 us is 1 GB/s. A longer link (a user's laptop across a WAN,
a router in another region, a peer reaching a client's --address from afar) keeps autotuning. The
round trip is the kernel's sample at this end: a SYN proxy in front of the router (iptables SYNPROXY)
answers handshakes itself, so a far client's connection there looks short and would be held to about
2 MiB per round trip (50 MB/s at 40 ms); proxies that end TCP (sidecars, kubectl port-forward, SSH
tunnels) do not, since each of their hops is a connection of its own.

The kernel cuts an SO_SNDBUF request to net.core.wmem_max without a word, and the socket's autotuning
is off for good either way. Where that cap is below the size (212992 bytes, the kernel's default for
years; the figures above were measured with 4 MiB) the socket would get a buffer a fifth of the one
measured (416 KiB for SHORT_LINK_SNDBUF's 2 MiB), a bound nobody measured: autotuning stays there.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Final

#: A round trip below this (microseconds) is a short link: the bounded send buffer cannot limit it.
SHORT_LINK_RTT_US: Final = 500
#: SO_SNDBUF asked for an HTTP/2 connection on a short link (the kernel doubles it for its own overhead).
SHORT_LINK_SNDBUF: Final = 1024 * 1024
#: SO_SNDBUF asked for a forward's local socket on a short link (beside its LOCAL_RCVBUF).
LOCAL_SNDBUF: Final = 512 * 1024
#: Where struct tcp_info keeps tcpi_rtt (microseconds): 8 one-byte fields, then 15 u32s before it
#: (linux/tcp.h; the layout only ever grew at its end).
_TCPI_RTT_OFFSET: Final = 68
_TCP_INFO_SIZE: Final = 104
#: The kernel's cap on an SO_SNDBUF request (net.core.wmem_max, global to the host).
WMEM_MAX_PATH = "/proc/sys/net/core/wmem_max"


def is_tcp(sock: socket.socket) -> bool:
    """Whether a socket is a TCP one (IPv4 or IPv6 stream): the sockets TCP options apply to."""
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def smoothed_rtt_us(sock: socket.socket) -> int | None:
    """The kernel's smoothed round trip of a TCP socket (microseconds); None where it cannot say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, AttributeError):  # not TCP, closed, or no TCP_INFO on this platform
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    rtt: int = struct.unpack_from("I", info, _TCPI_RTT_OFFSET)[0]
    return rtt or None  # 0: nothing measured yet


def bound_send_buffer(sock: socket.socket | None, size: int = SHORT_LINK_SNDBUF) -> bool:
    """Give a TCP socket on a short link `size` bytes of send buffer (SO_SNDBUF); True if it was set."""
    if sock is None or not is_tcp(sock):
        return False
    rtt = smoothed_rtt_us(sock)
    if rtt is None or rtt >= SHORT_LINK_RTT_US:
        return False
    cap = send_buffer_cap()
    if cap is None or cap < size:
        return False  # the kernel would cut the size (see the module docstring): autotuning is better known
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        return False
    return True


def send_buffer_cap() -> int | None:
    """The largest SO_SNDBUF the kernel grants an unprivileged request (net.core.wmem_max); None where
    it cannot say. Read at each call (once per connection): the host's administrator may change it."""
    try:
        return int(Path(WMEM_MAX_PATH).read_text())
    except (OSError, ValueError):
        return None
