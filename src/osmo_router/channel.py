"""Dialling the router: one gRPC channel per process, with TLS and bearer-token metadata."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from osmo_router.protocol import AUTHORIZATION_HEADER, COOKIE_HEADER, channel_options


@dataclass(frozen=True)
class DialConfig:
    """How to reach the router, shared by the client and the agent."""

    address: str
    tls: bool = True
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None
    cookie: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token and the load-balancer cookie."""
        items: list[tuple[str, str]] = []
        if self.token:
            items.append((AUTHORIZATION_HEADER, f"Bearer {self.token}"))
        if self.cookie:
            items.append((COOKIE_HEADER, self.cookie))
        return tuple(items)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def open_channel(dial: DialConfig) -> grpc.aio.Channel:
    """A grpc.aio channel to the router (TLS verified against the system store or --tls-ca)."""
    options: list[tuple[str, int | str]] = list(channel_options())
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
