"""Which transport a client uses: explicit choice, sticky canary percentage, fallback to WebSocket.

- `--transport` / OSMO_TRANSPORT set: that transport, no fallback (the user asked for it).
- else `--grpc-percent N` / OSMO_GRPC_PERCENT: gRPC for the users whose bucket
  (sha256 of the token's subject, else $USER, mod 100) is below N, WebSocket for the others;
  a user stays in the same bucket across runs and machines.
- else gRPC.
A gRPC choice that was not explicit falls back to WebSocket, with one warning line, when the gRPC
port cannot be reached within a bounded probe.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import json
import logging

import grpc

from osmo_router.channel import open_channel
from osmo_router.client.config import ClientConfig
from osmo_router.transport import GRPC, WS, Transport
from osmo_router.transport.grpc_transport import GrpcTransport
from osmo_router.transport.ws_transport import WsTransport
from osmo_router.wsproto import default_ws_address

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
        return (GRPC if bucket(rollout_user(config.dial.token)) < config.grpc_percent else WS), False
    return GRPC, False


async def reachable(channel: grpc.aio.Channel, timeout: float) -> bool:
    """True once the channel is READY; False on a connection failure or after `timeout` seconds."""
    state = channel.get_state(try_to_connect=True)
    try:
        async with asyncio.timeout(timeout):
            while state != grpc.ChannelConnectivity.READY:
                if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return True


def ws_transport(config: ClientConfig) -> WsTransport:
    """The WebSocket transport at --ws-address (default: the gRPC host, port 8000)."""
    address = config.ws_address or default_ws_address(config.dial.address)
    return WsTransport(config.dial, address, connect_timeout=config.connect_timeout)


async def connect_transport(config: ClientConfig) -> Transport:
    """The transport this invocation uses, with the bounded gRPC probe and fallback."""
    name, explicit = choose(config)
    if name == WS:
        return ws_transport(config)
    channel = open_channel(config.dial)
    if not explicit and not await reachable(channel, min(PROBE_TIMEOUT, config.connect_timeout)):
        await channel.close(grace=None)
        fallback = ws_transport(config)
        log.warning(
            "gRPC router %s unreachable; falling back to WebSocket at %s",
            config.dial.address,
            fallback.base,
            extra={"fields": {"event": "transport fallback", "transport": WS}},
        )
        return fallback
    return GrpcTransport(config, channel)
