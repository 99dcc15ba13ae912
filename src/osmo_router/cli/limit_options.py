"""The `osmo-router serve` flags of the limits: connections and timeouts on every port, and buffers."""

from __future__ import annotations

from typing import Any

import click

from osmo_router.cli.options import DURATION
from osmo_router.h2.config import DEFAULT_MAX_STREAM_WINDOW, DEFAULT_STREAM_WINDOW
from osmo_router.router.config import DEFAULT_GRPC_SERVER, GRPC_SERVERS


def connection_limit_options(f: Any) -> Any:
    """`serve` flags of the connection limits and timeouts (docs/security.md, "Connection limits and timeouts")."""
    options = [
        click.option(
            "--handshake-timeout",
            type=DURATION,
            default="10s",
            show_default=True,
            help="TLS handshake on every port; on the gRPC port, up to the client's HTTP/2 settings.",
        ),
        click.option(
            "--http-header-timeout",
            type=DURATION,
            default="10s",
            show_default=True,
            help="WebSocket and metrics ports: a connection's first request line and headers must arrive within this.",
        ),
        click.option(
            "--http-idle-timeout",
            type=DURATION,
            default="60s",
            show_default=True,
            help="WebSocket and metrics ports: idle keep-alive between requests.",
        ),
        click.option(
            "--max-connection-idle",
            type=DURATION,
            default="2m",
            show_default=True,
            help="gRPC: close a connection without calls for this long (0: never). Sessions are calls.",
        ),
        click.option(
            "--max-connection-age",
            type=DURATION,
            default="0",
            show_default=True,
            help="gRPC: drain connections older than this, with --drain-timeout as grace (0: never; "
            "cuts sessions longer than age + grace).",
        ),
        click.option(
            "--max-concurrent-streams",
            type=int,
            default=4096,
            show_default=True,
            help="gRPC: streams at once on one connection (a port-forward uses one per forwarded connection).",
        ),
        click.option(
            "--grpc-server",
            type=click.Choice(list(GRPC_SERVERS)),
            default=DEFAULT_GRPC_SERVER,
            show_default=True,
            help="gRPC port: the router's own HTTP/2 server (native: 3-5x less CPU per message) or grpc.aio (grpcio).",
        ),
        click.option(
            "--stream-window-bytes",
            type=int,
            default=DEFAULT_STREAM_WINDOW,
            show_default=True,
            help="gRPC port, native server: each session stream's HTTP/2 receive window, given back as the router "
            "reads; counted in the user's and total buffer budgets (a stream starts at 64 KiB and grows to this "
            "while they have room), so a stream whose data the router cannot pass on holds at most this "
            "(plus one message).",
        ),
        click.option(
            "--max-stream-window-bytes",
            type=int,
            default=DEFAULT_MAX_STREAM_WINDOW,
            show_default=True,
            help="gRPC port, native server: the stream window grows up to this when a connection's "
            "bandwidth-delay product calls for it (a long, fast link); --stream-window-bytes' value turns growth off.",
        ),
        click.option(
            "--max-connections",
            type=int,
            default=0,
            show_default=True,
            help="gRPC port: connections at once (0: half of what the descriptor limit leaves, all without --ws-port).",
        ),
        click.option(
            "--ws-max-connections",
            type=int,
            default=0,
            show_default=True,
            help="WebSocket port: connections at once (0: half of what the descriptor limit leaves).",
        ),
        click.option(
            "--metrics-max-connections",
            type=int,
            default=0,
            show_default=True,
            help="Metrics port: connections at once, kept apart from the others (0: 256, less under 4096 descriptors).",
        ),
        click.option(
            "--max-connections-per-address",
            type=int,
            default=1024,
            show_default=True,
            help="gRPC port, native server: connections at once from one client address; past it a new one is "
            "closed as soon as its address is known (0: no cap; raise it behind SNAT or a proxy).",
        ),
        click.option(
            "--ws-max-connections-per-address",
            type=int,
            default=1024,
            show_default=True,
            help="WebSocket port: connections at once from one client address "
            "(0: no cap; raise it behind SNAT or a proxy).",
        ),
        click.option(
            "--metrics-max-connections-per-address",
            type=int,
            default=16,
            show_default=True,
            help="Metrics port: connections at once from one address (0: no cap).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def buffer_limit_options(f: Any) -> Any:
    """`serve` flags of what sessions may make the router hold, and of readers too slow to keep up
    (docs/security.md, "Resource limits")."""
    options = [
        click.option(
            "--flow-control-bytes",
            type=int,
            default=4 * 1024 * 1024,
            show_default=True,
            help="Bytes a session may queue per direction in the router (with --flow-control-buffer messages); "
            "a full queue stops reading from the sender.",
        ),
        click.option(
            "--user-buffer-bytes",
            type=int,
            default=256 * 1024 * 1024,
            show_default=True,
            help="Bytes all of one user's sessions may queue in the router together; past it they stop reading.",
        ),
        click.option(
            "--total-buffer-bytes",
            type=int,
            default=0,
            help="Bytes every session may queue together [default: half the container's memory limit, else 2 GiB].",
        ),
        click.option(
            "--min-drain-rate",
            type=int,
            default=16 * 1024,
            show_default=True,
            help="Bytes a second a side must read while data waits for it: one that takes less over a whole "
            "--flow-control-timeout (a trickle) ends its session like a stalled one; 0: no such rule.",
        ),
        click.option(
            "--memory-guard-bytes",
            type=int,
            default=0,
            help="When the router's RSS passes this, the sessions its readers hold back are ended, the user with "
            "the most of them first (gRPC buffers for them beyond the budgets) "
            "[default: 3/4 of the container's memory limit, else 1.5 x --total-buffer-bytes].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f
