"""The gRPC transport: one channel, one bidirectional stream per session (FrameStream)."""

from __future__ import annotations

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.client.session import open_session
from osmo_router.dial.channel import open_channel
from osmo_router.transport import GRPC, SessionInit, SessionStream
from osmo_router.wire.codec import fast_method
from osmo_router.wire.errors import InvalidArgument
from osmo_router.wire.ops import BY_VALUE
from osmo_router.wire.protocol import CLIENT_SERVICE


class GrpcTransport:
    """Sessions as streams of RouterClientService on one channel."""

    name = GRPC

    def __init__(self, config: ClientConfig, channel: grpc.aio.Channel | None = None) -> None:
        self._config = config
        self.channel = channel or open_channel(config.dial)

    async def open(self, operation: int, init: SessionInit) -> SessionStream:
        """Start the stream with its init and wait until the agent joined."""
        op = BY_VALUE.get(operation)
        if op is None:
            raise InvalidArgument(f"unknown operation {operation}")
        # Data frames skip protobuf both ways (wire/codec.py): the hot path of every stream.
        method = fast_method(self.channel, f"/{CLIENT_SERVICE}/{op.method}", op.response)
        return await open_session(self._config, method, op.request, init, raw=True)

    async def aclose(self) -> None:
        """Close the channel."""
        await self.channel.close(grace=None)
