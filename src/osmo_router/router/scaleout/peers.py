"""Replica to replica: channels to the other replicas, the peer metadata, and a peer call as an Endpoint.

A replica that relays a stream to the replica holding the other side opens the same method on that
replica's RouterPeerService, with the shared peer secret and the original caller's identity as
metadata. The owner checks the secret and then serves the stream as its own, for that identity.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Sequence
from typing import Any

import grpc

from osmo_router.dial.channel import MIN_CONNECT_TIMEOUT_MS
from osmo_router.router.auth.identity import Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core.placement import Owner
from osmo_router.wire.codec import ENCODED_SESSION_END
from osmo_router.wire.errors import InvalidArgument, RouterError, Unauthenticated, Unavailable, from_status
from osmo_router.wire.protocol import channel_options

PEER_SERVICE = "osmo.router.v1.RouterPeerService"
PEER_SECRET_HEADER = "osmo-peer-secret"
PEER_IDENTITY_HEADER = "osmo-peer-identity"
PEER_VIA_HEADER = "osmo-peer-via"
#: How long a relaying replica waits to connect to the owner before the stream fails (UNAVAILABLE).
PEER_CONNECT_TIMEOUT = 5.0

#: Transport failures: the message names the replica so the user knows which hop broke.
_HOP_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
)


def peer_metadata(secret: str | None, identity: Identity, via: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a relayed call: the peer secret, the caller's identity, and where it came from."""
    who = json.dumps(
        {
            "sub": identity.subject,
            "role": identity.role,
            "workflows": list(identity.workflows),
            "task": identity.task,
            "agent_id": identity.instance,
            "exp": identity.expires,
        }
    )
    items = [(PEER_IDENTITY_HEADER, who), (PEER_VIA_HEADER, via)]
    if secret:
        items.append((PEER_SECRET_HEADER, secret))
    return tuple(items)


def peer_identity(metadata: Sequence[tuple[str, str | bytes]], secret: str | None) -> tuple[Identity, str]:
    """The identity a replica relays a call for, and where it came from; Unauthenticated without the secret."""
    values = {key: value if isinstance(value, str) else value.decode(errors="replace") for key, value in metadata}
    if secret and not hmac.compare_digest(values.get(PEER_SECRET_HEADER, "").encode(), secret.encode()):
        raise Unauthenticated("the peer service is for router replicas only (wrong or missing peer secret)")
    try:
        who = json.loads(values[PEER_IDENTITY_HEADER])
        subject, role, workflows = who["sub"], who["role"], who["workflows"]
    except (KeyError, TypeError, ValueError):
        raise InvalidArgument("peer call without a valid identity") from None
    if not isinstance(subject, str) or not isinstance(role, str) or not isinstance(workflows, list):
        raise InvalidArgument("peer call without a valid identity")
    task, instance, expires = who.get("task"), who.get("agent_id"), who.get("exp")
    if not all(isinstance(v, str) or v is None for v in (task, instance)) or not isinstance(
        expires, int | float | None
    ):
        raise InvalidArgument("peer call without a valid identity")
    identity = Identity(
        subject=subject,
        role=role,
        workflows=tuple(str(w) for w in workflows),
        task=task,
        instance=instance,
        expires=None if expires is None else float(expires),
    )
    return identity, values.get(PEER_VIA_HEADER, "")


class PeerAuthenticator:
    """The Authenticator of RouterPeerService: the peer secret, then the identity the calling replica vouches for."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The identity a replica relays a call for; Unauthenticated without the right secret."""
        identity, _via = peer_identity(metadata, self._secret)
        return identity

    async def revalidate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The relayed identity again (the relaying replica re-checks the caller's token itself)."""
        return await self.authenticate(metadata)

    async def close(self) -> None:
        """Nothing to release."""


class PeerChannels:
    """One gRPC channel per peer replica address, shared by every relayed stream to it."""

    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        """The channel to a replica (created on first use)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._open(address)
            self._channels[address] = channel
        return channel

    async def connect(self, owner: Owner) -> grpc.aio.Channel:
        """The channel to a replica once connected; Unavailable when a fresh attempt fails or takes too long.

        A channel that is backing off after a failure gets one new attempt (a replica restarted at
        the same address is reached at once); a refused attempt fails the stream at once, a silent
        one after PEER_CONNECT_TIMEOUT.
        """
        channel = self.get(owner.address)
        try:
            async with asyncio.timeout(PEER_CONNECT_TIMEOUT):
                await _connected(channel)
        except (TimeoutError, ConnectionError) as err:
            # Dial afresh next time; streams still on this channel are broken anyway.
            if self._channels.get(owner.address) is channel:
                del self._channels[owner.address]
            await channel.close(grace=None)
            reason = str(err) or f"no connection within {PEER_CONNECT_TIMEOUT:g}s"
            raise Unavailable(f"router replica {owner.replica} at {owner.address} is unreachable ({reason})") from None
        return channel

    async def close(self) -> None:
        """Close every channel (cuts relayed streams still open)."""
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(grace=None)

    def _open(self, address: str) -> grpc.aio.Channel:
        options: list[tuple[str, int | str]] = [
            *channel_options(
                self._config.max_message_size, self._config.keepalive_time, self._config.keepalive_timeout
            ),
            # A replica that restarts comes back in seconds: don't wait out gRPC's long default backoff.
            ("grpc.initial_reconnect_backoff_ms", 200),
            # Each connection attempt's time to receive SETTINGS (gRPC core): 200 ms gave up on a
            # busy replica; gRPC's default, as in dial/channel.py.
            ("grpc.min_reconnect_backoff_ms", MIN_CONNECT_TIMEOUT_MS),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # A channel dialled afresh after a failure must dial afresh: with the global subchannel
            # pool it would share the failed channel's subchannel, still backing off, and fail at once.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if not self._config.tls_enabled:
            return grpc.aio.insecure_channel(address, options=options)
        if self._config.peer_tls_server_name:
            options.append(("grpc.ssl_target_name_override", self._config.peer_tls_server_name))
        root = _read(self._config.peer_tls_ca)
        # Under mutual TLS a replica dials its peers with its own certificate, like any client.
        key = _read(self._config.tls_key) if self._config.tls_client_ca else None
        chain = _read(self._config.tls_cert) if self._config.tls_client_ca else None
        credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
        return grpc.aio.secure_channel(address, credentials, options=options)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


async def _connected(channel: grpc.aio.Channel) -> None:
    """Return once the channel is READY; raise ConnectionError when an attempt made meanwhile failed."""
    connectivity = grpc.ChannelConnectivity
    state = channel.get_state(try_to_connect=True)
    attempted = state in (connectivity.IDLE, connectivity.CONNECTING)
    while state != connectivity.READY:
        if state == connectivity.SHUTDOWN or (state == connectivity.TRANSIENT_FAILURE and attempted):
            raise ConnectionError("connection failed")
        attempted = attempted or state == connectivity.CONNECTING
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)


class CallEndpoint:
    """A client call to a peer replica as a relay Endpoint of encoded messages.

    The relay treats the replica as the far side of the session. In both roles one message needs
    translating: a `SessionEnd` the owner sends (the session is over) and a `SessionEnd` the relay
    writes (this side is done) both mean "end our half of the call", which lets the owner finish
    the call without a write of ours racing with it.
    """

    __slots__ = ("_call", "_closed", "_lock", "_owner")

    def __init__(self, call: Any, owner: Owner) -> None:
        self._call = call
        self._owner = owner
        self._lock = asyncio.Lock()
        self._closed = False

    async def read(self) -> bytes | None:
        """The next encoded message, None at the end; a failed call raises its RouterError."""
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise self.error(err) from None
        except asyncio.InvalidStateError:
            raise Unavailable(f"the stream to router replica {self._owner.replica} broke") from None
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, bytes)
        if message == ENCODED_SESSION_END:
            await self.close()
            return None
        return message

    async def write(self, message: bytes) -> None:
        """Send one encoded message (dropped once our half is closed)."""
        if message == ENCODED_SESSION_END:
            await self.close()
            return
        async with self._lock:
            if self._closed:
                return
            try:
                await self._call.write(message)
            except grpc.aio.AioRpcError as err:
                raise self.error(err) from None
            except asyncio.InvalidStateError:
                raise Unavailable(f"the stream to router replica {self._owner.replica} broke") from None

    async def close(self) -> None:
        """End our half of the call."""
        async with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    await self._call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass

    def cancel(self) -> None:
        """Cancel the call (a no-op once it finished)."""
        self._call.cancel()

    def error(self, err: grpc.aio.AioRpcError) -> RouterError:
        """The RouterError for a failed call; transport failures name the replica."""
        details = err.details() or err.code().name.lower()
        if err.code() in _HOP_CODES:
            details = f"{details} (via router replica {self._owner.replica} at {self._owner.address})"
            if err.code() != grpc.StatusCode.CANCELLED:
                return Unavailable(details)
        return from_status(err.code(), details)
