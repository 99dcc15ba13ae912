"""Router settings, validated once; the CLI only parses flags into this."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from osmo_router.h2.config import DEFAULT_MAX_STREAM_WINDOW, DEFAULT_STREAM_WINDOW
from osmo_router.wire.protocol import BULK_CHUNK_SIZE, MAX_MESSAGE_SIZE

#: Smallest --max-message-size: a full bulk data chunk plus its framing must fit, with room to spare.
MIN_MESSAGE_SIZE = 2 * BULK_CHUNK_SIZE
#: The gRPC port's servers (--grpc-server) and the default: the native one costs 3-5x less CPU per message.
GRPC_SERVERS = ("native", "grpcio")
DEFAULT_GRPC_SERVER = "native"

#: The role claim of agent tokens (auth/identity.py ROLE_AGENT); not usable as --ws-backend-role.
ROLE_AGENT_VALUE = "agent"

#: Shortest accepted --peer-secret: it guards every stream relayed between replicas.
MIN_PEER_SECRET = 16


def is_loopback_host(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RouterConfig:
    """Everything `osmo-router serve` can be told."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 8080
    #: The old router's WebSocket endpoints (migration); -1 disables them.
    ws_port: int = 8000
    tls_enabled: bool = True
    tls_cert: str = "/etc/router/tls/tls.crt"
    tls_key: str = "/etc/router/tls/tls.key"
    tls_client_ca: str | None = None
    auth: str = "jwt"
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    #: How long a fetched key set is used before it is fetched again (auth/jwks.py JwksKeys.lifespan).
    jwks_cache_ttl: float = 300.0
    jwt_audience: str = "osmo-router"
    jwt_hs256_secret: str | None = None
    #: A role value marking OSMO backends' workflow tokens, accepted on the WS backend endpoint only
    #: for the workflow the token names (auth/jwt.py LegacyBackendRule); "" accepts none.
    ws_backend_role: str = ""
    #: The claim of such a token that names its workflow.
    ws_backend_workflow_claim: str = "osmo_workflow_id"
    #: When set, such tokens must also have this issuer (`iss`).
    ws_backend_issuer: str | None = None
    #: A JSON file of workflow names (as OSMO's CLI types them) to workflow IDs, for WS clients (ws/aliases.py).
    ws_workflow_aliases: str | None = None
    #: How long a session created through RouterControlService lives unused (its own ttl_seconds wins).
    created_session_ttl: float = 600.0
    #: Bounds on created sessions, in total and per service identity (count and bytes).
    max_created_sessions: int = 10_000
    max_created_per_service: int = 1000
    max_created_bytes: int = 64 * 1024 * 1024
    max_created_bytes_per_service: int = 4 * 1024 * 1024
    session_ttl: float = 30 * 60.0
    rendezvous_timeout: float = 60.0
    flow_control_buffer: int = 16
    #: Bytes queued per relay direction at most, whatever the message count (one message always fits).
    flow_control_bytes: int = 4 * 1024 * 1024
    flow_control_timeout: float = 30.0
    #: Bytes a second a reader must take while data waits for it, over each flow-control-timeout
    #: period (relay.py; 0: only the flow-control timeout applies).
    min_drain_rate: int = 16 * 1024
    init_timeout: float = 10.0
    drain_timeout: float = 30.0
    #: How often the TLS certificate, key and client CA files are looked at, to load them again once they
    #: changed (router/ops/tls_reload.py; 0: never).
    tls_reload_interval: float = 30.0
    keepalive_time: float = 20.0
    keepalive_timeout: float = 10.0
    max_message_size: int = MAX_MESSAGE_SIZE
    max_sessions: int = 10_000
    max_sessions_per_user: int = 256
    max_pending_rendezvous: int = 10_000
    heartbeat_interval: float = 15.0
    #: How often a long-lived agent stream's token is verified again (it also ends at the token's exp).
    credential_recheck: float = 60.0
    #: Most sessions one identity keeps waiting for rendezvous (0: no such limit).
    max_pending_per_identity: int = 1000
    #: Bytes all of one user's sessions may queue in the router together.
    user_buffer_bytes: int = 256 * 1024 * 1024
    #: Bytes every session may queue together; 0: half the container's memory limit (else 2 GiB).
    total_buffer_bytes: int = 0
    #: RSS above which the held-back sessions of the heaviest user are ended (core/memory_guard.py);
    #: 0: three quarters of the container's memory limit, else 1.5 x the total buffer budget.
    memory_guard_bytes: int = 0
    #: Connections one port-forward command may hold at once (it counts as one session of its user).
    max_connections_per_forward: int = 4096
    redis_url: str | None = None
    advertise_address: str | None = None
    peer_secret: str | None = None
    peer_tls_ca: str | None = None
    peer_tls_server_name: str | None = None
    directory_ttl: float = 45.0
    # Connection limits and timeouts (router/conn_limits.py, router/http_limits.py, docs/security.md).
    #: TLS handshake, and on the gRPC port up to the client's HTTP/2 SETTINGS.
    handshake_timeout: float = 10.0
    #: WebSocket and metrics ports: connection open to a complete request line and headers.
    http_header_timeout: float = 10.0
    #: WebSocket and metrics ports: idle keep-alive between requests.
    http_idle_timeout: float = 60.0
    #: gRPC: a connection without calls for this long is closed (0: never).
    max_connection_idle: float = 120.0
    #: gRPC: connections older than this are drained, with --drain-timeout as grace (0: never).
    max_connection_age: float = 0.0
    #: gRPC: streams at once on one HTTP/2 connection.
    max_concurrent_streams: int = 4096
    #: The gRPC port's server: "native" (osmo_router.h2, issue 18) or "grpcio" (grpc.aio).
    grpc_server: str = DEFAULT_GRPC_SERVER
    #: Native server: each stream's receive window. A stream whose reader (the router's relay) stops
    #: taking messages holds at most this much in the router (plus one partial message).
    stream_window_bytes: int = DEFAULT_STREAM_WINDOW
    #: Native server: the stream window grows up to this while a connection's bandwidth-delay product
    #: calls for it (h2/bdp.py: a long, fast link); equal to stream_window_bytes: no growth.
    max_stream_window_bytes: int = DEFAULT_MAX_STREAM_WINDOW
    #: Total connections on the gRPC / WebSocket / metrics port (0: a share of the descriptor limit).
    max_connections: int = 0
    ws_max_connections: int = 0
    metrics_max_connections: int = 0
    #: Connections from one peer address at once (0: no per-address cap); the gRPC port's needs the
    #: native server (grpc.aio has no accept hook).
    max_connections_per_address: int = 1024
    ws_max_connections_per_address: int = 1024
    metrics_max_connections_per_address: int = 16
    router_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse settings that are unsafe or make no sense."""
        if self.user_buffer_bytes < self.flow_control_bytes or self.total_buffer_bytes < 0:
            raise ValueError("--user-buffer-bytes must hold one session's --flow-control-bytes at least")
        if self.credential_recheck <= 0:
            raise ValueError("--credential-recheck must be positive")
        if self.auth not in ("jwt", "none"):
            raise ValueError(f"--auth must be jwt or none, not {self.auth!r}")
        if self.auth == "none" and not is_loopback_host(self.host):
            raise ValueError(
                f"--auth=none is only allowed on a loopback --host (got {self.host}); "
                "anyone who can reach the port could enter every workload"
            )
        if self.auth == "jwt" and not (self.jwt_public_key or self.jwks_url or self.jwt_hs256_secret):
            raise ValueError(
                "--auth=jwt needs --jwt-public-key or --jwks-url (or, for development, --jwt-hs256-secret)"
            )
        if self.ws_backend_role and not self.ws_backend_workflow_claim:
            raise ValueError("--ws-backend-role needs a --ws-backend-workflow-claim")
        if self.ws_backend_role in (ROLE_AGENT_VALUE, "*"):
            raise ValueError(f"--ws-backend-role cannot be {self.ws_backend_role!r}")
        if self.max_message_size < MIN_MESSAGE_SIZE:
            raise ValueError(
                f"--max-message-size must be at least {MIN_MESSAGE_SIZE} (bulk data chunks are {BULK_CHUNK_SIZE})"
            )
        for name in (
            "max_sessions",
            "max_sessions_per_user",
            "max_pending_rendezvous",
            "max_created_sessions",
            "max_created_per_service",
            "max_created_bytes",
            "max_created_bytes_per_service",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.flow_control_bytes < 64 * 1024:
            raise ValueError("--flow-control-bytes must be at least 64 KiB")
        if self.memory_guard_bytes < 0:
            raise ValueError("--memory-guard-bytes must be 0 (automatic) or more")
        if self.min_drain_rate < 0:
            raise ValueError("--min-drain-rate must be 0 (off) or more")
        if self.flow_control_buffer < 1:
            raise ValueError("--flow-control-buffer must be at least 1")
        timeouts = ("session_ttl", "created_session_ttl", "rendezvous_timeout", "flow_control_timeout", "init_timeout")
        for name in (*timeouts, "directory_ttl", "jwks_cache_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        self._validate_connection_limits()
        self._validate_scaleout()

    def _validate_connection_limits(self) -> None:
        for name in ("handshake_timeout", "http_header_timeout", "http_idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in (
            "max_connection_idle",
            "max_connection_age",
            "max_connections",
            "ws_max_connections",
            "metrics_max_connections",
            "max_connections_per_address",
            "ws_max_connections_per_address",
            "metrics_max_connections_per_address",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 (off or automatic) or more")
        if self.max_concurrent_streams < 1:
            raise ValueError("--max-concurrent-streams must be at least 1")
        if self.grpc_server not in GRPC_SERVERS:
            raise ValueError(f"--grpc-server must be native or grpcio, not {self.grpc_server!r}")
        if not 64 * 1024 <= self.stream_window_bytes <= 2**31 - 1:
            raise ValueError("--stream-window-bytes must be between 64 KiB and 2 GiB")
        if not self.stream_window_bytes <= self.max_stream_window_bytes <= 2**31 - 1:
            raise ValueError("--max-stream-window-bytes must be between --stream-window-bytes and 2 GiB")

    def _validate_scaleout(self) -> None:
        if self.peer_secret and len(self.peer_secret) < MIN_PEER_SECRET:
            raise ValueError(f"--peer-secret must be at least {MIN_PEER_SECRET} characters")
        if not self.redis_url:
            return
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--redis-url must be a redis://, rediss:// or unix:// URL, not {self.redis_url!r}")
        if self.auth != "none" and not self.peer_secret:
            raise ValueError(
                "--peer-secret (or OSMO_PEER_SECRET) is required with --redis-url: replicas relay "
                "streams to each other on behalf of authenticated users and must prove who they are"
            )
