"""Where a stream is served: here, or on the replica that holds its other side (the `Placer` seam).

One router process has no Placer: every stream is served here. With a shared directory
(`router/scaleout/`), the Placer answers from it and opens the far stream on the owner replica;
the pipeline relays between the two with the ordinary relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from osmo_router.router.auth.identity import Identity
from osmo_router.router.core.session import DefaultedTask
from osmo_router.wire.protocol import pb


@dataclass(frozen=True)
class Owner:
    """The replica that holds an agent or a session, and the address other replicas reach it at."""

    replica: str
    address: str


@dataclass(frozen=True)
class Placement:
    """Where a stream is served: relayed to `owner`, or here (with `key` when the router makes the session key).

    `defaulted`: the agent (task) the replicas chose for a client that named none, served here.
    """

    owner: Owner | None = None
    key: str | None = None
    defaulted: DefaultedTask | None = None


HERE = Placement()


class FarStream(Protocol):
    """The stream opened on the owner replica, as encoded messages."""

    async def read(self) -> bytes | None:
        """The next encoded message, None at the end; raises RouterError when the call failed."""
        ...

    async def write(self, message: bytes) -> None:
        """Send one encoded message."""
        ...

    def cancel(self) -> None:
        """Cancel the call."""
        ...


class RelayCounters(Protocol):
    """The relaying replica's metrics: streams relayed now, and relays that failed."""

    def relay_started(self, label: str) -> None:
        """A relayed stream of `label` (an operation, or "connect") started."""
        ...

    def relay_ended(self, label: str) -> None:
        """A relayed stream ended."""
        ...

    def relay_failed(self, label: str, code: str) -> None:
        """A relayed stream ended with the status `code`."""
        ...


class Placer(RelayCounters, Protocol):
    """Placement of streams across replicas, and the far streams relays need."""

    #: How long the owner may take to answer a relayed stream's init.
    answer_timeout: float

    async def place_client(self, identity: Identity, target: pb.SessionTarget, *, from_peer: bool) -> Placement:
        """Where a client stream is served."""
        ...

    async def place_agent(self, identity: Identity, init: pb.ConnectInit, *, from_peer: bool) -> Placement:
        """Where an agent's session stream is served: with the session, wherever it waits."""
        ...

    async def open_stream(self, owner: Owner, method: str, identity: Identity, via: str) -> FarStream:
        """Open `method` of the owner's peer service for `identity`; raises RouterError when unreachable."""
        ...
