"""Connection limits and timeouts of the router's three ports (issue 14: one user cannot take the router down).

Every connection costs a file descriptor, and a process out of descriptors fails everyone: new users
see `Handshake read failed` and the health probes are reset. So:

- the router raises its soft descriptor limit to the hard one at start (as Go programs do);
- every port has a total connection cap, and the caps leave `reserve` descriptors free, so no flood
  on one port takes the descriptors the others (and the metrics port's health endpoints) need;
- every connection that does not finish its handshake or request headers, or sits idle, is closed
  after a timeout (`handshake_timeout`, `http_header_timeout`, `http_idle_timeout`, gRPC
  `max_connection_idle`);
- the aiohttp ports (WebSocket, metrics) also cap connections per peer address (`connection_gate.py`, `http_limits.py`).

The native gRPC server caps connections per peer address too (`--max-connections-per-address`,
router/ops/grpc_server.py). With --grpc-server grpcio the gRPC port has no per-address cap (gRPC
Python exposes no per-connection accept hook): its half-open and idle connections are bounded in
time and its total is bounded (see docs/security.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from osmo_router.router.config import RouterConfig

log = logging.getLogger(__name__)

#: Descriptors kept out of every connection cap: Redis, peer channels, JWKS fetches, logs, the loop's own.
MAX_FD_RESERVE = 512
#: Largest share of the descriptor limit the reserve and the metrics port's default take (1/16 each).
SHARE = 16
#: gRPC's own value for "never" in millisecond channel arguments.
GRPC_INFINITE_MS = 2**31 - 1


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force (0 when unknown)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as err:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, err)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return int(soft)


@dataclass(frozen=True)
class ConnectionBudget:
    """How many connections each port may hold at once."""

    descriptor_limit: int
    reserve: int
    grpc: int
    ws: int
    metrics: int


def connection_budget(config: RouterConfig, descriptor_limit: int | None = None) -> ConnectionBudget:
    """The caps of the three ports: the configured ones, else shares of the descriptor limit.

    Auto (0): the metrics port gets min(256, limit/16) (its flag's default); `reserve` =
    min(512, limit/16) stays free; the gRPC and WebSocket ports split the rest evenly (gRPC takes it all
    when the WebSocket port is off). Configured caps that do not fit the limit are kept (`log_limits` warns).
    """
    limit = raise_descriptor_limit() if descriptor_limit is None else descriptor_limit
    if limit <= 0:
        limit = 1 << 20
    reserve = max(32, min(MAX_FD_RESERVE, limit // SHARE))
    metrics = config.metrics_max_connections or max(16, min(256, limit // SHARE))
    if config.metrics_port < 0:
        metrics = 0
    free = max(2, limit - reserve - metrics)
    ws_on = config.ws_port >= 0
    grpc_cap = config.max_connections
    ws_cap = config.ws_max_connections if ws_on else 0
    if not grpc_cap and not ws_cap:
        grpc_cap, ws_cap = (free // 2, free // 2) if ws_on else (free, 0)
    elif not grpc_cap:
        grpc_cap = max(1, free - ws_cap)
    elif ws_on and not ws_cap:
        ws_cap = max(1, free - grpc_cap)
    return ConnectionBudget(limit, reserve, grpc_cap, ws_cap, metrics)


def _ms(seconds: float) -> int:
    return GRPC_INFINITE_MS if seconds <= 0 else min(GRPC_INFINITE_MS, max(1, int(seconds * 1000)))


def grpc_connection_options(config: RouterConfig, budget: ConnectionBudget) -> list[tuple[str, int]]:
    """gRPC server channel arguments for the limits: pass them with `protocol.server_options`.

    - `grpc.server_handshake_timeout_ms`: TCP accept to the client's HTTP/2 SETTINGS, TLS included
      (gRPC core's default is 120 s); a connection that sends nothing or half a preface is closed.
    - `grpc.max_connection_idle_ms`: a connection with no call for this long gets a GOAWAY and is
      closed (keepalive pings do not count as activity). Sessions are calls, so they are never cut.
    - `grpc.max_connection_age_ms`: off by default. Age would cut long sessions (an exec of hours, an
      agent's registration) once its grace ran out; when set, the grace is the drain timeout.
    - `grpc.max_allowed_incoming_connections`: the port's total; past it, gRPC closes a new
      connection at once (the client sees UNAVAILABLE and retries).
    - `grpc.max_concurrent_streams`: per connection; a client past it queues its new streams.
    """
    options = [
        ("grpc.server_handshake_timeout_ms", _ms(config.handshake_timeout)),
        ("grpc.max_connection_idle_ms", _ms(config.max_connection_idle)),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", budget.grpc),
    ]
    if config.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(config.drain_timeout)),
        ]
    return options


def log_limits(config: RouterConfig, budget: ConnectionBudget) -> None:
    """One log line with every connection limit in force (`event: connection limits`)."""
    fields = {
        "event": "connection limits",
        "descriptor_limit": budget.descriptor_limit,
        "descriptor_reserve": budget.reserve,
        "grpc_max_connections": budget.grpc,
        "ws_max_connections": budget.ws,
        "metrics_max_connections": budget.metrics,
        "grpc_max_connections_per_address": config.max_connections_per_address,
        "ws_max_connections_per_address": config.ws_max_connections_per_address,
        "metrics_max_connections_per_address": config.metrics_max_connections_per_address,
        "handshake_timeout_s": config.handshake_timeout,
        "http_header_timeout_s": config.http_header_timeout,
        "http_idle_timeout_s": config.http_idle_timeout,
        "max_connection_idle_s": config.max_connection_idle,
        "max_connection_age_s": config.max_connection_age,
        "max_concurrent_streams": config.max_concurrent_streams,
    }
    log.info(
        "connection limits: grpc %d (%d per address), websocket %d (%d per address), metrics %d (%d per address) "
        "of %d descriptors",
        budget.grpc,
        config.max_connections_per_address,
        budget.ws,
        config.ws_max_connections_per_address,
        budget.metrics,
        config.metrics_max_connections_per_address,
        budget.descriptor_limit,
        extra={"fields": fields},
    )
    if budget.grpc + budget.ws + budget.metrics + budget.reserve > budget.descriptor_limit:
        log.warning(
            "connection caps (grpc %d + websocket %d + metrics %d) and the reserve (%d) exceed the descriptor "
            "limit %d: a flood can exhaust the descriptors; raise the limit (ulimit -n) or lower the caps",
            budget.grpc,
            budget.ws,
            budget.metrics,
            budget.reserve,
            budget.descriptor_limit,
        )
