"""The gRPC transport: one channel, one bidirectional stream per session (FrameStream)."""

from __future__ import annotations

from typing import Any

import grpc

from osmo_router.channel import open_channel
from osmo_router.client.config import ClientConfig
from osmo_router.client.session import open_session
from osmo_router.errors import InvalidArgument
from osmo_router.protocol import pb, pb_grpc
from osmo_router.transport import GRPC, SessionInit, SessionStream

_METHODS: dict[int, tuple[str, Any]] = {
    pb.OPERATION_EXEC: ("Exec", pb.ExecRequest),
    pb.OPERATION_PORT_FORWARD: ("PortForward", pb.PortForwardRequest),
    pb.OPERATION_RSYNC: ("Rsync", pb.RsyncRequest),
}


class GrpcTransport:
    """Sessions as streams of RouterClientService on one channel."""

    name = GRPC

    def __init__(self, config: ClientConfig, channel: grpc.aio.Channel | None = None) -> None:
        self._config = config
        self.channel = channel or open_channel(config.dial)
        self._stub = pb_grpc.RouterClientServiceStub(self.channel)

    async def open(self, operation: int, init: SessionInit) -> SessionStream:
        """Start the stream with its init and wait until the agent joined."""
        if operation not in _METHODS:
            raise InvalidArgument(f"unknown operation {operation}")
        method_name, request_type = _METHODS[operation]
        return await open_session(self._config, getattr(self._stub, method_name), request_type, init)

    async def aclose(self) -> None:
        """Close the channel."""
        await self.channel.close(grace=None)
