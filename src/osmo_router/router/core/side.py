"""What the pipeline needs of a stream, whatever carries it, and what an entry point hands it.

Entry points (gRPC client and agent services, the WebSocket endpoints, the peer service) parse and
authenticate, then build a `Side` and a `ClientJoin` or `AgentJoin`; `SessionPipeline` does the
rest. A Side translates at its edge only: the messages it reads and writes are the encoded frame
messages every stream carries (`wire/codec.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from osmo_router.router.auth.identity import Identity
from osmo_router.router.core.budget import ByteBudget
from osmo_router.wire.errors import RouterError
from osmo_router.wire.ops import Operation
from osmo_router.wire.protocol import pb

#: The label of agent session streams in metrics and audit lines (a client's is its operation's).
CONNECT = "connect"


class Side(Protocol):
    """One stream of a session as its transport provides it."""

    #: Transport label of metrics and audit lines: "grpc" or "ws".
    transport: str
    #: The caller's address, for the audit.
    peer: str
    #: Whether queued data frames may be written to this side as one message (False where each
    #: message means something of its own: the old WebSocket protocol, and hops between replicas).
    merge_frames: bool

    async def read(self) -> bytes | None:
        """The next encoded frame message; None at the end. Raises RouterError when the stream broke."""
        ...

    async def write(self, message: bytes) -> None:
        """Send one encoded frame message or the SessionEnd. Raises RouterError when the stream broke."""
        ...

    def watch_gone(self, budgets: tuple[ByteBudget, ...] = ()) -> Awaitable[None] | None:
        """While the session waits for its other side: an awaitable that ends once this peer is gone.

        None where the transport notices by itself (a gRPC call whose peer leaves is cancelled).
        What the side keeps of its peer's messages meanwhile counts as held in `budgets`.
        """
        ...

    async def accept(self) -> None:
        """Take the stream on (a WebSocket backend's upgrade): refusals after this go on the stream itself."""
        ...

    async def send_first(self, message: bytes) -> None:
        """Send the client's encoded ready or the agent's encoded SessionOpen, translated for the transport.

        Raises RouterError when the session cannot be served on this stream (a WebSocket backend of
        another operation).
        """
        ...

    async def refuse(self, error: RouterError) -> None:
        """End the stream with an error: a gRPC status, WebSocket close 4000, or an HTTP status before the upgrade."""
        ...

    async def finish(self) -> None:
        """End the stream after the session ended cleanly."""
        ...


@dataclass(frozen=True, slots=True)
class ClientJoin:
    """A client stream, parsed and authenticated: what the pipeline needs to place and join it."""

    identity: Identity
    operation: Operation
    target: pb.SessionTarget
    open_msg: pb.SessionOpen
    #: The client's encoded init, as a replica holding the agent is sent it.
    raw_init: bytes
    rendezvous_timeout: float
    #: Relayed here by another replica: served here, never relayed again.
    from_peer: bool = False


@dataclass(frozen=True, slots=True)
class AgentJoin:
    """An agent's (or old backend's) session stream, parsed and authenticated."""

    identity: Identity
    init: pb.ConnectInit
    #: The encoded ConnectRequest(init), as a replica holding the session is sent it.
    raw_init: bytes
    rendezvous_timeout: float
    from_peer: bool = False
