"""The gRPC transport: one channel, one bidirectional stream per session (FrameStream)."""

from __future__ import annotations

from typing import Any

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.client.session import open_session
from osmo_router.dial.channel import open_channel
from osmo_router.transport import GRPC, SessionInit, SessionStream
from osmo_router.wire.codec import fast_method
from osmo_router.wire.errors import InvalidArgument
from osmo_router.wire.protocol import CLIENT_SERVICE, pb

_METHODS: dict[int, tuple[str, Any, Any]] = {
    pb.OPERATION_EXEC: ("Exec", pb.ExecRequest, pb.ExecResponse),
    pb.OPERATION_PORT_FORWARD: ("PortForward", pb.PortForwardRequest, pb.PortForwardResponse),
    pb.OPERATION_RSYNC: ("Rsync", pb.RsyncRequest, pb.RsyncResponse),
}


class GrpcTransport:
    """Sessions as streams of RouterClientService on one channel."""

    name = GRPC

    def __init__(self, config: ClientConfig, channel: grpc.aio.Channel | None = None) -> None:
        self._config = config
        self.channel = channel or open_channel(config.dial)

    async def open(self, operation: int, init: SessionInit) -> SessionStream:
        """Start the stream with its init and wait until the agent joined."""
        if operation not in _METHODS:
            raise InvalidArgument(f"unknown operation {operation}")
        name, request_type, response_type = _METHODS[operation]
        # Data frames skip protobuf both ways (framecodec): the hot path of every stream.
        method = fast_method(self.channel, f"/{CLIENT_SERVICE}/{name}", response_type)
        return await open_session(self._config, method, request_type, init, raw=True)

    async def aclose(self) -> None:
        """Close the channel."""
        await self.channel.close(grace=None)
