"""The session directory: which replica holds which agent and which waiting session.

One router process needs no directory (`MemoryDirectory`: every lookup finds nothing, so every
stream is served locally, exactly as without scale-out). Several replicas share a
`RedisDirectory` (router/redis_directory.py) so that a stream reaching the wrong replica can be
relayed to the right one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from osmo_router.router.core.placement import Owner
from osmo_router.router.core.registry import AgentRegistration
from osmo_router.router.scaleout.agent_index import DefaultAgent
from osmo_router.wire.errors import Unavailable


class DirectoryUnavailable(Unavailable):
    """The shared directory cannot be read or written right now."""


#: Tells the directory whether a session key is still held by this replica (unknown keys are released).
SessionAlive = Callable[[str], bool]


class Directory(Protocol):
    """What the replicas share. Writes are best effort; lookups raise DirectoryUnavailable when they cannot answer."""

    @property
    def up(self) -> bool:
        """False after an operation failed, until one succeeds."""
        ...

    async def start(self, address: str, session_alive: SessionAlive) -> None:
        """Start publishing this replica's entries under `address`."""
        ...

    async def close(self) -> None:
        """Withdraw this replica's entries and stop."""
        ...

    async def agent_registered(self, reg: AgentRegistration) -> None:
        """Publish an agent that registered here (it replaces one registered anywhere for the same target)."""
        ...

    def agent_unregistered(self, reg: AgentRegistration) -> None:
        """Withdraw an agent that left (in the background)."""
        ...

    async def find_agent(self, workflow_id: str, task: str) -> Owner | None:
        """The replica holding an agent for the workflow (and task, if given)."""
        ...

    async def default_agent(self, workflow_id: str) -> DefaultAgent | None:
        """The agent a client naming no task gets over all replicas, and the tasks it is told of; None if none."""
        ...

    async def find_session(self, key: str) -> Owner | None:
        """The replica holding the session with this key."""
        ...

    async def claim_session(self, key: str, workflow_id: str, *, take_over: bool = False) -> Owner | None:
        """Publish a session held here; if another replica already holds the key, that replica instead.

        `take_over`: publish it here whoever held it (a resume: the old holder lost the session).
        """
        ...

    def session_removed(self, key: str) -> None:
        """Withdraw a session that ended (in the background)."""
        ...


class MemoryDirectory:
    """One replica alone: nothing is shared, nothing is ever found elsewhere."""

    @property
    def up(self) -> bool:
        """Always: nothing to reach."""
        return True

    async def start(self, address: str, session_alive: SessionAlive) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to withdraw."""

    async def agent_registered(self, reg: AgentRegistration) -> None:
        """Nothing to publish."""

    def agent_unregistered(self, reg: AgentRegistration) -> None:
        """Nothing to withdraw."""

    async def find_agent(self, workflow_id: str, task: str) -> Owner | None:
        """Never elsewhere."""
        return None

    async def default_agent(self, workflow_id: str) -> DefaultAgent | None:
        """None: the registry alone chooses (core/sessions.py `join_client`)."""
        return None

    async def find_session(self, key: str) -> Owner | None:
        """Never elsewhere."""
        return None

    async def claim_session(self, key: str, workflow_id: str, *, take_over: bool = False) -> Owner | None:
        """Always ours."""
        return None

    def session_removed(self, key: str) -> None:
        """Nothing to withdraw."""
