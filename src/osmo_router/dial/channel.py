"""Dialling the router: one gRPC channel per process, with TLS and bearer-token metadata."""

from __future__ import annotations

import grpc

from osmo_router.dial.config import DialConfig
from osmo_router.wire.protocol import channel_options


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


#: gRPC waits 1 s, then 1.6 times longer each time (up to 2 min), before it dials a lost router
#: again, and fails every call meanwhile: a session resuming after a router restart would wait for
#: that rather than its own backoff (client/resume.py). Dial again within 2 s.
RECONNECT_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(dial: DialConfig) -> grpc.aio.Channel:
    """A grpc.aio channel to the router (TLS verified against the system store or --tls-ca)."""
    options: list[tuple[str, int | str]] = [*channel_options(), *RECONNECT_OPTIONS]
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
