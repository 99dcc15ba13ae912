"""The wire protocol in one place: message types, frame helpers, sizes and metadata keys.

Every stream starts with an init in field 1 of its request message; every later message carries
a `Frame` in field 2, on every stream and in both directions. The router relies on that layout to
forward encoded messages unchanged: the byte-level facts are in `codec`.
"""

from __future__ import annotations

from typing import Final

from osmo.router.v1 import router_pb2 as pb
from osmo.router.v1 import router_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]


#: Payload bytes per data frame: large enough that per-message cost is small, well below the limits.
CHUNK_SIZE: Final = 128 * 1024
#: Largest read on bulk streams (TCP port-forward, rsync): grpc.aio costs about the same per message
#: whatever its size, so a streaming connection goes in 1 MiB frames (a small read still goes at
#: once, as it is), with glibc malloc tuned for it (io/memtune.py). Figures: docs/bench/NOTES.md.
BULK_CHUNK_SIZE: Final = 1024 * 1024
#: How long a bulk read (16 KiB or more: the writer is streaming) waits for more to fill a frame.
BULK_LINGER: Final = 0.001
#: Default limit on one gRPC message, on every side.
MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024

#: Most standby Connect streams a router parks for one registered agent; more are RESOURCE_EXHAUSTED.
MAX_STANDBY_STREAMS: Final = 8

#: Metadata keys.
AUTHORIZATION_HEADER: Final = "authorization"
COOKIE_HEADER: Final = "osmo-cookie"

CLIENT_SERVICE: Final = "osmo.router.v1.RouterClientService"
AGENT_SERVICE: Final = "osmo.router.v1.RouterAgentService"


#: Keepalive pings: idle streams survive load balancers, dead peers are found within time + timeout.
KEEPALIVE_TIME: Final = 20.0
KEEPALIVE_TIMEOUT: Final = 10.0


def channel_options(
    max_message_size: int = MAX_MESSAGE_SIZE,
    keepalive_time: float = KEEPALIVE_TIME,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
) -> list[tuple[str, int]]:
    """gRPC channel/server options shared by every side: message limits and keepalive."""
    return [
        ("grpc.max_send_message_length", max_message_size),
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
        # Recent gRPC cores time a ping out with this one rather than the keepalive timeout.
        ("grpc.http2.ping_timeout_ms", int(keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


#: Servers take the peers' pings at most this often without data in between (more: GOAWAY ENHANCE_YOUR_CALM).
MIN_PING_INTERVAL: Final = 5.0


def server_options(
    max_message_size: int = MAX_MESSAGE_SIZE,
    keepalive_time: float = KEEPALIVE_TIME,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
) -> list[tuple[str, int]]:
    """gRPC server options: the channel options, and tolerance for the peers' own keepalive pings."""
    return [
        *channel_options(max_message_size, keepalive_time, keepalive_timeout),
        ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_PING_INTERVAL * 1000)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(MIN_PING_INTERVAL * 1000)),
        # Connection limits and timeouts (idle, handshake, streams, total) are the router's settings:
        # router/ops/conn_limits.py grpc_connection_options, passed next to these.
    ]


def data_frame(payload: bytes) -> pb.Frame:
    """A frame carrying stdout/stdin/TCP/rsync bytes."""
    return pb.Frame(data=payload)


def half_close_frame() -> pb.Frame:
    """A frame saying the sender will send no more data."""
    return pb.Frame(half_close=pb.HalfClose())


def error_frame(code: int, message: str) -> pb.Frame:
    """A frame reporting an error (a gRPC status code number and a message)."""
    return pb.Frame(error=pb.Error(code=code, message=message))


#: How long the router waits for a client to end its side after SessionEnd.
CLOSE_GRACE: Final = 5.0
