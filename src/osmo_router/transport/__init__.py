"""The transport seam shared by the client and the agent: a session stream of typed frames.

Two methods open and end everything, in the spirit of httpx's transport interface:
`Transport.open(operation, init)` starts a session and returns a `SessionStream`, whose
`send(frame)` / `recv()` / `close()` move typed `Frame`s and `abort()` ends it at once. Agent
and client handlers are typed against it alone. `FrameStream` (wire/streams.py) is the gRPC
implementation; `WsSessionStream` (ws_transport.py) speaks the old router's WebSocket protocol,
so the same exec, port-forward and rsync code runs over either.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from osmo_router.wire.protocol import pb

#: The init of a session, one per operation.
SessionInit = pb.ExecInit | pb.PortForwardInit | pb.RsyncInit

#: Transport names, as `--transport` / OSMO_TRANSPORT spell them.
GRPC = "grpc"
WS = "ws"


class SessionStream(Protocol):
    """One session as typed frames, whatever carries them."""

    async def send(self, frame: pb.Frame) -> None:
        """Send one frame (dropped once this side was closed)."""
        ...

    async def recv(self) -> pb.Frame | None:
        """The next frame, or None when the session ended."""
        ...

    async def close(self) -> None:
        """Say this side sends nothing more."""
        ...

    async def send_data(self, payload: bytes) -> None:
        """Send a data frame."""
        ...

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        """Report an error to the far side."""
        ...

    @property
    def raw(self) -> bool:
        """True when `send_data_message` takes pre-encoded data-frame messages (the gRPC fast path)."""
        ...

    async def send_data_message(self, message: bytes) -> None:
        """Send a pre-encoded data-frame message (`wire.codec.encode_data_message`)."""
        ...

    def abort(self) -> None:
        """End the session at once, from synchronous code too (a reset, not a half-close)."""
        ...


class Transport(Protocol):
    """Opens session streams to the router; one per process, many sessions."""

    name: str

    async def open(self, operation: int, init: SessionInit) -> SessionStream:
        """Start a session of `operation` with its init; raises RouterError when refused."""
        ...

    async def aclose(self) -> None:
        """Release the connection(s)."""
        ...


__all__ = ["GRPC", "WS", "SessionInit", "SessionStream", "Transport"]
