"""Dialling the router: one gRPC channel per process, with TLS and bearer-token metadata."""

from __future__ import annotations

import grpc

from osmo_router.dial.config import DialConfig
from osmo_router.wire.protocol import channel_options

#: First and longest wait (ms) before the channel dials a router again after losing it.
RECONNECT_BACKOFF_MS = (250, 2_000)
#: gRPC core's default time for one connection attempt to receive SETTINGS.
MIN_CONNECT_TIMEOUT_MS = 20_000


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def open_channel(dial: DialConfig) -> grpc.aio.Channel:
    """A grpc.aio channel to the router (TLS verified against the system store or --tls-ca).

    `dial.address` is one address: callers that accept a list (`DialConfig.addresses`) dial each.
    With `dial.grpc_channel == "native"` it is the asyncio HTTP/2 channel (h2/channel.py), same API.
    """
    if dial.grpc_channel == "native":
        return _native_channel(dial)
    options: list[tuple[str, int | str]] = [
        *channel_options(),
        # A router that restarts (or a replica taking over) is back in seconds: a resuming session
        # must not wait out gRPC's default reconnect backoff (up to 2 minutes). gRPC core takes
        # `grpc.min_reconnect_backoff_ms` as the time one connection attempt gets to receive the
        # server's SETTINGS: at 250 ms a router busy under load was never reached
        # (tests/unit/test_dial_channel.py), so it is gRPC's own default, 20 s. Set explicitly:
        # leaving it out changed how a trickle reader's session flowed (not understood yet; the
        # router then never ended it, see docs/security.md).
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", MIN_CONNECT_TIMEOUT_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]
    if not dial.tls:
        return grpc.aio.insecure_channel(dial.address, options=options)
    if dial.tls_server_name:
        options.append(("grpc.ssl_target_name_override", dial.tls_server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(dial.tls_ca),
        private_key=_read(dial.tls_key),
        certificate_chain=_read(dial.tls_cert),
    )
    return grpc.aio.secure_channel(dial.address, credentials, options=options)


def _native_channel(dial: DialConfig) -> grpc.aio.Channel:
    """The h2 channel: the same TLS, keepalive and message limits as the grpc.aio one."""
    from osmo_router.dial.proxy import open_socket
    from osmo_router.h2.channel import Channel, client_ssl_context
    from osmo_router.h2.config import H2Config
    from osmo_router.wire.protocol import KEEPALIVE_TIME, KEEPALIVE_TIMEOUT, MAX_MESSAGE_SIZE

    config = H2Config(
        max_message_size=MAX_MESSAGE_SIZE, keepalive_time=KEEPALIVE_TIME, keepalive_timeout=KEEPALIVE_TIMEOUT
    )
    context = client_ssl_context(dial.tls_ca, dial.tls_cert, dial.tls_key) if dial.tls else None
    # Through an HTTP CONNECT proxy when the environment names one for the router (as grpcio does).
    return Channel(dial.address, ssl=context, server_name=dial.tls_server_name, config=config, tunnel=open_socket)
