"""The gRPC transport: one channel per router address, one bidirectional stream per session (FrameStream).

`--router-address` may list several routers (comma-separated: the replicas of one scaled-out
router, each reachable from the client). Sessions open on the current one; when it refuses with
UNAVAILABLE (unreachable, draining, gone) the transport moves to the next and tries each once
before it gives up. A resuming session (client/resume.py) opens its new streams through `open`
too, so after a replica is lost or drains its sessions resume on the next replica of the list.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.client.session import BrokeBeforeReady, open_session
from osmo_router.dial.channel import open_channel
from osmo_router.transport import GRPC, SessionInit, SessionStream
from osmo_router.wire.codec import fast_method
from osmo_router.wire.errors import InvalidArgument, RouterError
from osmo_router.wire.ops import BY_VALUE
from osmo_router.wire.protocol import CLIENT_SERVICE

log = logging.getLogger(__name__)


class GrpcTransport:
    """Sessions as streams of RouterClientService, on the first router of the list that takes them."""

    name = GRPC

    def __init__(self, config: ClientConfig, channel: grpc.aio.Channel | None = None) -> None:
        self._config = config
        self.addresses = config.dial.addresses
        self._current = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        if channel is not None:
            self._channels[self.addresses[0]] = channel

    @property
    def address(self) -> str:
        """The router address sessions open on now."""
        return self.addresses[self._current]

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the current router (dialled on first use)."""
        return self._channel(self.address)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(replace(self._config.dial, address=address))
            self._channels[address] = channel
        return channel

    async def open(self, operation: int, init: SessionInit) -> SessionStream:
        """Start the stream with its init and wait until the agent joined; the next router on UNAVAILABLE."""
        op = BY_VALUE.get(operation)
        if op is None:
            raise InvalidArgument(f"unknown operation {operation}")
        for tried in range(len(self.addresses)):
            address = self.address
            config = (
                self._config
                if len(self.addresses) == 1
                else replace(self._config, dial=replace(self._config.dial, address=address))
            )
            # Data frames skip protobuf both ways (wire/codec.py): the hot path of every stream.
            method = fast_method(self._channel(address), f"/{CLIENT_SERVICE}/{op.method}", op.response)
            try:
                return await open_session(config, method, op.request, init, raw=True)
            except BrokeBeforeReady:
                # Not to the next router: this one may have started the session (resume_start.py resumes it).
                raise
            except RouterError as err:
                if err.code == grpc.StatusCode.UNAVAILABLE and "draining" in err.message:
                    # Dial afresh next time: behind a balancer a new connection reaches a live replica,
                    # while this one would keep reaching the draining one.
                    await self._forget(address)
                if err.code != grpc.StatusCode.UNAVAILABLE or tried == len(self.addresses) - 1:
                    raise
                self._current = (self._current + 1) % len(self.addresses)
                log.info("router %s: %s; trying %s", address, err.message, self.address)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _forget(self, address: str) -> None:
        """New sessions to `address` get a new channel; streams still on the old one keep it until aclose."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            self._retired.append(channel)

    async def aclose(self) -> None:
        """Close the channels."""
        channels, self._channels = self._channels, {}
        retired, self._retired = self._retired, []
        for channel in [*channels.values(), *retired]:
            await channel.close(grace=None)
