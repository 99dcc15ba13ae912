"""Connections counted per peer address and per port, admitted only under both caps.

The gate of every guarded port: the aiohttp ones (WebSocket, metrics: http_limits.py) and the native
gRPC server's (grpc_server.py). A refusal is counted in `router_http_connections_refused_total` and
logged once per reason and address in WARN_EVERY.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

#: A refusal is logged once per reason and address in this many seconds, for at most MAX_WARNED pairs.
WARN_EVERY = 600.0
MAX_WARNED = 1000


@dataclass(frozen=True)
class HttpLimits:
    """The limits of one aiohttp port."""

    #: Label of the port in metrics and logs ("ws", "metrics").
    port_name: str
    #: Connections at once on the port (0: no cap).
    max_connections: int
    #: Connections at once from one peer address (0: no cap).
    max_per_address: int
    #: Connection open (TLS done) to the first request's complete headers.
    header_timeout: float
    #: Idle keep-alive between requests (aiohttp's keepalive_timeout).
    idle_timeout: float
    #: TLS handshake (and its close_notify exchange on close).
    handshake_timeout: float


class _Metrics:
    """Connection counters of the guarded ports, one set per Prometheus registry."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "router_http_connections_open",
            "Connections open on a guarded port (WebSocket, metrics; gRPC with the native server)",
            ["port"],
            registry=registry,
        )
        self.refused = Counter(
            "router_http_connections_refused_total",
            "Connections closed by a limit: address_cap, port_cap, header_timeout, header_size, tls_handshake",
            ["port", "reason"],
            registry=registry,
        )

    @classmethod
    def of(cls, registry: CollectorRegistry | None) -> _Metrics:
        """The counters registered in `registry` (prometheus_client's default one when None)."""
        key = registry if registry is not None else REGISTRY
        if key not in cls._by_registry:
            cls._by_registry[key] = cls(key)
        return cls._by_registry[key]


class ConnectionGate:
    """Open connections by peer address; admits a connection only under both caps."""

    def __init__(self, limits: HttpLimits, registry: CollectorRegistry | None = None) -> None:
        self.limits = limits
        self.total = 0
        self._by_address: dict[str, int] = {}
        metrics = _Metrics.of(registry)
        self._open = metrics.open.labels(limits.port_name)
        self._refused = metrics.refused
        self._warned: set[str] = set()
        self._warned_since = time.monotonic()

    def admit(self, address: str) -> bool:
        """Count a new connection from `address`, or refuse it (False) when a cap is reached."""
        limits = self.limits
        reason = ""
        if limits.max_connections and self.total >= limits.max_connections:
            reason = "port_cap"
        elif limits.max_per_address and self._by_address.get(address, 0) >= limits.max_per_address:
            reason = "address_cap"
        if reason:
            self.refuse(reason, address)
            return False
        self.total += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        self._open.inc()
        return True

    def release(self, address: str) -> None:
        """One connection from `address` ended."""
        self.total -= 1
        left = self._by_address.get(address, 1) - 1
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)
        self._open.dec()

    def refuse(self, reason: str, address: str) -> None:
        """Count a connection closed by a limit (logged once per reason and address every WARN_EVERY)."""
        self._refused.labels(self.limits.port_name, reason).inc()
        key = f"{reason} {address}"
        if time.monotonic() - self._warned_since > WARN_EVERY:
            self._warned.clear()
            self._warned_since = time.monotonic()
        if key not in self._warned and len(self._warned) < MAX_WARNED:
            self._warned.add(key)
            log.warning(
                "%s port: connection from %s closed (%s)",
                self.limits.port_name,
                address,
                reason.replace("_", " "),
                extra={
                    "fields": {
                        "event": "connection refused",
                        "port": self.limits.port_name,
                        "peer": address,
                        "reason": reason,
                    }
                },
            )

    def connections_from(self, address: str) -> int:
        """Connections open from `address`."""
        return self._by_address.get(address, 0)


def peer_address(peer: Any) -> str:
    """The IP address of a peer name (IPv4-mapped IPv6 written as IPv4)."""
    if isinstance(peer, (tuple, list)) and peer:
        address = str(peer[0])
        return address.removeprefix("::ffff:") if address.startswith("::ffff:") and "." in address else address
    return "unknown"


__all__ = ["MAX_WARNED", "WARN_EVERY", "ConnectionGate", "HttpLimits", "peer_address"]
