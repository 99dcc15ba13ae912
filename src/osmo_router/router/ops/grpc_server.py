"""The gRPC port's server (--grpc-server): the native h2 one or grpc.aio, with the same limits and TLS rules."""

from __future__ import annotations

import ssl
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from osmo_router.h2.config import DEFAULT_CONNECTION_WINDOW, H2Config
from osmo_router.h2.server import NativeServer, tls_context
from osmo_router.router.config import RouterConfig
from osmo_router.router.ops.conn_limits import ConnectionBudget, grpc_connection_options
from osmo_router.router.ops.connection_gate import ConnectionGate, HttpLimits, peer_address
from osmo_router.wire.protocol import CLOSE_GRACE, MIN_PING_INTERVAL, server_options

#: The native server's SETTINGS_INITIAL_WINDOW_SIZE: what a stream not (yet) counted in budgets may hold
#: (an init fits; a larger first message is charged as below). Its session's budgets grow it at once.
INITIAL_STREAM_WINDOW = 16 * 1024
#: What streams not yet counted in budgets (before their sessions pair) may hold, together: their window,
#: their headers and a first message larger than the window (h2/credit.py UncountedCharge), per connection
#: (a gRPC request's stream is counted as about 20 KiB: --max-concurrent-streams' 4096 of them fit) and
#: over all connections. Past it a new stream is refused (REFUSED_STREAM) and a large message waits.
UNCOUNTED_PER_CONNECTION = 96 * 1024 * 1024
UNCOUNTED_TOTAL = 512 * 1024 * 1024
#: Fields one request's headers may have: each costs about 155 bytes whatever its size on the wire.
MAX_HEADER_FIELDS = 128


def grpc_credentials(config: RouterConfig) -> grpc.ServerCredentials | ssl.SSLContext:
    """What add_secure_port takes on the configured server: an SSLContext (native) or grpc credentials."""
    return native_tls(config) if config.grpc_server == "native" else server_credentials(config)


def server_credentials(config: RouterConfig) -> grpc.ServerCredentials:
    """TLS credentials from the configured certificate and key (and client CA for mutual TLS).

    gRPC Python offers two client-certificate modes only: not requested, or requested, required and
    verified. So with --tls-client-ca every caller (agents and users alike) must present a
    certificate that chains to that CA; the handshake fails for anyone else.
    """
    cert = _read_pem("--tls-cert", config.tls_cert, defaulted=True)
    key = _read_pem("--tls-key", config.tls_key, defaulted=True)
    client_ca = _read_pem("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def native_tls(config: RouterConfig) -> ssl.SSLContext:
    """The native server's TLS context: the same certificate, key and client-CA rule as server_credentials.

    The files are read twice (here, then by `ssl`, which loads a certificate chain only from a path)
    so that a missing or non-PEM file gives the same clear error on both servers, not OpenSSL's.
    """
    _read_pem("--tls-cert", config.tls_cert, defaulted=True)
    _read_pem("--tls-key", config.tls_key, defaulted=True)
    if config.tls_client_ca:
        _read_pem("--tls-client-ca", config.tls_client_ca)
    return tls_context(config.tls_cert, config.tls_key, config.tls_client_ca)


class AddressCap:
    """The native gRPC port's connections per peer address (--max-connections-per-address).

    Counted and refused like the aiohttp ports' (connection_gate.ConnectionGate): a refusal is counted in
    `router_http_connections_refused_total{port="grpc",reason="address_cap"}` and logged once per
    address (`event: connection refused`); `router_http_connections_open{port="grpc"}` is the gauge.
    """

    def __init__(self, config: RouterConfig, registry: CollectorRegistry | None = None) -> None:
        limits = HttpLimits(
            "grpc",
            0,  # the port's total is the server's own max_connections
            config.max_connections_per_address,
            config.handshake_timeout,
            config.max_connection_idle,
            config.handshake_timeout,
        )
        self.gate = ConnectionGate(limits, registry)

    def admit(self, peer: Any) -> bool:
        """Count a connection from `peer` (a peername), or refuse it."""
        return self.gate.admit(peer_address(peer))

    def release(self, peer: Any) -> None:
        """A connection from `peer` ended."""
        self.gate.release(peer_address(peer))


def build_grpc_server(
    config: RouterConfig, budget: ConnectionBudget, registry: CollectorRegistry | None = None
) -> grpc.aio.Server:
    """The gRPC port's server (--grpc-server): the native h2 one, or grpc.aio, with the same limits.

    `registry`: where the native server's per-address refusals are counted (prometheus_client's
    default one when None).
    """
    if config.grpc_server == "native":
        return NativeServer(
            H2Config(
                stream_window=config.stream_window_bytes,
                # A stream starts small and grows to --stream-window-bytes once the relay counts it in
                # its session's budgets (h2/stream.py): uncounted streams (before the init, a pending
                # session, a registration) hold at most this much each.
                initial_stream_window=min(INITIAL_STREAM_WINDOW, config.stream_window_bytes),
                max_stream_window=config.max_stream_window_bytes,
                # Given back on receipt: room for every stream's window on a busy connection.
                connection_window=max(DEFAULT_CONNECTION_WINDOW, 4 * config.stream_window_bytes),
                max_concurrent_streams=config.max_concurrent_streams,
                # Streams before their session pairs are counted in no user's budget: bounded here
                # (their headers, a large first message), per connection and in all.
                max_uncounted_per_connection=UNCOUNTED_PER_CONNECTION,
                max_uncounted_total=UNCOUNTED_TOTAL,
                max_header_fields=MAX_HEADER_FIELDS,
                max_message_size=config.max_message_size,
                keepalive_time=config.keepalive_time,
                keepalive_timeout=config.keepalive_timeout,
                min_ping_interval=MIN_PING_INTERVAL,
                handshake_timeout=config.handshake_timeout,
                max_connection_idle=config.max_connection_idle,
                max_connection_age=config.max_connection_age,
                max_connection_age_grace=config.drain_timeout,
            ),
            max_connections=budget.grpc,
            close_grace=CLOSE_GRACE,
            address_gate=AddressCap(config, registry) if config.max_connections_per_address else None,
        )
    return grpc.aio.server(
        options=[
            *server_options(config.max_message_size, config.keepalive_time, config.keepalive_timeout),
            *grpc_connection_options(config, budget),
        ]
    )


def _read_pem(flag: str, path: str, *, defaulted: bool = False) -> bytes:
    """The PEM file `flag` names; ValueError naming it. `defaulted`: the flag has a default path (the
    certificate and key), so an unreadable one says how to give them or turn TLS off."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        if not defaulted:
            raise ValueError(f"{flag} {path} cannot be read: {err.strerror}") from None
        raise ValueError(
            f"TLS is on by default and {flag} {path} cannot be read ({err.strerror}); "
            "pass --tls-cert and --tls-key, or --tls-enabled=false on loopback"
        ) from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{flag} {path} is not a PEM file")
    return data
