"""Which transport a client uses: explicit choice, sticky canary percentage, fallback to WebSocket.

- `--transport` / OSMO_TRANSPORT set: that transport, no fallback (the user asked for it).
- else `--grpc-percent N` / OSMO_GRPC_PERCENT: gRPC for the users whose bucket
  (sha256 of the token's subject, else $USER, mod 100) is below N, WebSocket for the others;
  a user stays in the same bucket across runs and machines.
- else gRPC.
A gRPC choice that was not explicit falls back to WebSocket, with one warning line, when a TCP
connection to the gRPC port cannot be made within a bounded probe (3 s).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import json
import logging
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from osmo_router.client.config import ClientConfig
from osmo_router.dial.config import split_addresses
from osmo_router.dial.proxy import ProxyError, open_socket, open_tunnel_blocking, proxy_for
from osmo_router.transport import GRPC, WS, Transport
from osmo_router.transport.grpc_transport import GrpcTransport
from osmo_router.wire.wsproto import base_url, default_ws_address

if TYPE_CHECKING:
    from osmo_router.transport.ws_transport import WsTransport

log = logging.getLogger("osmo_router.client")

#: Longest wait for the gRPC port before falling back to WebSocket.
PROBE_TIMEOUT = 3.0


def token_subject(token: str | None) -> str | None:
    """The `sub` claim of a JWT, read without verifying it (only to pick a bucket)."""
    if not token or token.count(".") != 2:
        return None
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) and sub else None


def rollout_user(token: str | None) -> str:
    """Who the canary bucket belongs to: the token's subject, else the local user."""
    subject = token_subject(token)
    if subject:
        return subject
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "anonymous"


def bucket(user: str) -> int:
    """A stable bucket 0-99 for a user."""
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % 100


def choose(config: ClientConfig) -> tuple[str, bool]:
    """(transport name, chosen explicitly)."""
    if config.transport:
        return config.transport, True
    if config.grpc_percent is not None:
        return (GRPC if bucket(rollout_user(config.dial.current_token())) < config.grpc_percent else WS), False
    return GRPC, False


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `[v6]:port` address; None for other target forms."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host:
        return None
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return None
    return host.strip("[]"), int(port)


async def reachable(address: str, timeout: float) -> bool:
    """True when a TCP connection to the gRPC port opens within `timeout` seconds.

    Only reachability decides the fallback: a port that answers but fails later (TLS, auth) keeps
    the gRPC path, so its error is reported as it is instead of being hidden behind WebSocket.
    """
    for one in split_addresses(address):  # a list of replicas: reachable if any one is
        target = host_port(one)
        if target is None:
            return True  # a form we cannot probe (dns:///, unix:): let gRPC report on it
        try:
            async with asyncio.timeout(timeout):
                if (tunnel := await open_socket(*target)) is not None:  # through the proxy, as the dial goes
                    tunnel.close()
                    return True
                _, writer = await asyncio.open_connection(*target)
        except (ValueError, OSError, TimeoutError) as err:
            if _not_the_routers(err):
                return True
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def reachable_now(address: str, timeout: float) -> bool:
    """`reachable` for code outside an event loop (the rsync command decides for its remote shell)."""
    for one in split_addresses(address):
        target = host_port(one)
        if target is None:
            return True
        try:
            _connect_now(target, timeout).close()
        except (ValueError, OSError) as err:
            if _not_the_routers(err):
                return True
            continue
        return True
    return False


def _not_the_routers(err: Exception) -> bool:
    """True when a probe failed for a reason that is not the router's port (a malformed proxy setting,
    the proxy itself down or refusing our credentials): the dial reports it, rather than a fallback."""
    if isinstance(err, ProxyError):
        return not err.target_unreachable
    return isinstance(err, ValueError)


def _connect_now(target: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to target, through the proxy the environment names for it if any (dial/proxy.py)."""
    proxy = proxy_for(target[0])
    if proxy is not None:
        return open_tunnel_blocking(proxy, *target, timeout)
    return socket.create_connection(target, timeout=timeout)


def _log_fallback(config: ClientConfig, base: str) -> None:
    log.warning(
        "gRPC router %s unreachable; falling back to WebSocket at %s",
        config.dial.address,
        base,
        extra={"fields": {"event": "transport fallback", "transport": WS}},
    )


def resolve_transport(config: ClientConfig) -> tuple[str, bool]:
    """The transport name, probe and fallback included, decided once (blocking; see `connect_transport`),
    and whether it is the WebSocket fallback for an unreachable gRPC port."""
    name, explicit = choose(config)
    if name == GRPC and not explicit and not reachable_now(config.dial.address, probe_timeout(config)):
        _log_fallback(config, ws_base(config))
        return WS, True
    return name, False


def ws_port_problem(config: ClientConfig) -> str | None:
    """Why a TCP connection to the WebSocket port cannot be made within the probe time, or None (blocking)."""
    url = urlsplit(ws_base(config))
    port = url.port or (443 if url.scheme == "wss" else 80)
    try:
        _connect_now((url.hostname or "", port), probe_timeout(config)).close()
    except ValueError:
        return None  # a malformed proxy setting: the WebSocket dial reports it
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    return None


def neither_port(grpc_address: str, ws_base_url: str, reason: str) -> str:
    """The error of a client that reached neither the gRPC port nor, falling back, the WebSocket port
    (a mistyped gRPC address must not read as a problem with a WebSocket port nobody asked for)."""
    return (
        f"cannot reach the router: no answer on its gRPC port ({grpc_address}) "
        f"nor on its WebSocket port ({ws_base_url}): {reason}"
    )


def probe_timeout(config: ClientConfig) -> float:
    """How long the gRPC port is probed."""
    return min(PROBE_TIMEOUT, config.connect_timeout)


def ws_base(config: ClientConfig) -> str:
    """The WebSocket base URL the client uses."""
    return base_url(config.ws_address or default_ws_address(config.dial.addresses[0]), config.dial.tls)


def ws_transport(config: ClientConfig, *, fallback: bool = False) -> WsTransport:
    """The WebSocket transport at --ws-address (default: the gRPC host, port 8000); `fallback`: in place
    of the unreachable gRPC port (its errors name both)."""
    from osmo_router.transport.ws_transport import WsTransport  # aiohttp: only paid when used

    address = config.ws_address or default_ws_address(config.dial.addresses[0])
    fallback_from = config.dial.address if fallback else None
    return WsTransport(config.dial, address, connect_timeout=config.connect_timeout, fallback_from=fallback_from)


async def connect_transport(config: ClientConfig) -> Transport:
    """The transport this invocation uses, with the bounded gRPC probe and fallback."""
    name, explicit = choose(config)
    if name == WS:
        return ws_transport(config)
    if not explicit and not await reachable(config.dial.address, probe_timeout(config)):
        fallback = ws_transport(config, fallback=True)
        _log_fallback(config, fallback.base)
        return fallback
    return GrpcTransport(config)
