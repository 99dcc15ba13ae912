"""Registered agents: which agent serves which workflow/task, and how to reach it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from osmo_router.router.auth.identity import Identity
from osmo_router.wire.errors import PermissionDenied
from osmo_router.wire.protocol import MAX_STANDBY_STREAMS, pb

if TYPE_CHECKING:
    from osmo_router.router.core.sessions import Session

log = logging.getLogger(__name__)

#: Most standby Connect streams the router parks for one registered agent (more: RESOURCE_EXHAUSTED).
MAX_STANDBY_PER_AGENT = MAX_STANDBY_STREAMS
#: Most held sessions kept per registration (the agent reports at most as many: agent/held.py).
MAX_HELD_REPORTED = 256


class RegistrationHeld(PermissionDenied):
    """A live registration belongs to another agent credential: it may not be replaced."""


class StandbyStream:
    """An agent's Connect stream opened ahead of any session, parked next to its registration.

    `first_read` is the stream's pending read, started when it was parked: it ends when the agent
    closes the stream, and otherwise carries the agent's first frame once a session started. It is
    never cancelled (that would cancel the RPC); the session's relay takes it over.
    """

    __slots__ = ("first_read", "outcome")

    def __init__(self, first_read: asyncio.Future[object]) -> None:
        self.first_read = first_read
        #: Resolves to the session the stream serves, or None when it is ended unused.
        self.outcome: asyncio.Future[Session | None] = asyncio.get_running_loop().create_future()

    def usable(self) -> bool:
        """Still parked, and the agent has not closed it."""
        return not self.outcome.done() and not self.first_read.done()

    def end(self) -> None:
        """End the stream unused (its handler finishes the call)."""
        if not self.outcome.done():
            self.outcome.set_result(None)

    def wait(self) -> Awaitable[Session | None]:
        """The session this stream serves, or None once it is ended unused."""
        return self.outcome


@dataclass(eq=False)
class AgentRegistration:
    """One live Register stream: an agent and the queue of messages pushed down to it."""

    agent_id: str
    workflow_id: str
    task: str
    operations: tuple[int, ...]
    #: The credential that registered (None in unit tests that need none): only it may replace this
    #: registration, park standby streams on it, or join the sessions it is asked to serve.
    identity: Identity | None = None
    outbox: asyncio.Queue[pb.RegisterResponse] = field(default_factory=asyncio.Queue)
    replaced: asyncio.Event = field(default_factory=asyncio.Event)
    #: Parked standby Connect streams, oldest first.
    standby: list[StandbyStream] = field(default_factory=list)
    #: Set once the Register stream ended: no stream is parked any more.
    closed: bool = False
    #: The resumable sessions the agent holds, as it last reported them (`osmo-net-client sessions`).
    held: tuple[pb.HeldSession, ...] = ()
    #: The agent said it recognises resumes (AgentHello.resumes): told to its sessions' clients in
    #: SessionReady.agent_resumes, and required of the agent an unconfirmed resume is paired with.
    resumes: bool = False

    def take_report(self, raw: bytes) -> None:
        """Take a message of the agent's Register stream other than a heartbeat: its held-session list."""
        try:
            request = pb.RegisterRequest.FromString(raw)
        except DecodeError:
            log.warning("agent %s sent an undecodable message on Register; ignored", self.agent_id)
            return
        if request.WhichOneof("kind") == "held":
            self.held = tuple(request.held.sessions[:MAX_HELD_REPORTED])

    def held_by(self, user: str) -> list[pb.HeldSession]:
        """The sessions of `user` the agent holds, with this registration's task filled in."""
        out = []
        for entry in self.held:
            if entry.user == user:
                copy = pb.HeldSession()
                copy.CopyFrom(entry)
                copy.task = self.task
                out.append(copy)
        return out

    def park(self, stream: StandbyStream) -> bool:
        """Park a standby stream; False when the registration ended or already holds its maximum."""
        self.standby[:] = [s for s in self.standby if s.usable()]
        if self.closed or len(self.standby) >= MAX_STANDBY_PER_AGENT:
            return False
        self.standby.append(stream)
        return True

    def unpark(self, stream: StandbyStream) -> None:
        """Forget a standby stream (idempotent)."""
        if stream in self.standby:
            self.standby.remove(stream)

    def take_standby(self, session: Session) -> bool:
        """Give a session to the oldest usable parked stream; False when none is parked."""
        while self.standby:
            stream = self.standby.pop(0)
            if stream.usable():
                session.agent_joined = True
                session.agent_id = self.agent_id
                session.agent_resumes = self.resumes
                stream.outcome.set_result(session)
                return True
        return False

    def close_standby(self) -> None:
        """The registration ended (or the router drains): end every parked stream unused."""
        streams, self.standby = self.standby, []
        for stream in streams:
            stream.end()

    def request_session(self, session_key: str, operation: int) -> None:
        """Ask the agent to open a Connect stream for a session."""
        self.outbox.put_nowait(
            pb.RegisterResponse(
                session_request=pb.SessionRequest(session_key=session_key, operation=pb.Operation.ValueType(operation))
            )
        )


class AgentRegistry:
    """Agents by workflow and task. The newest registration for a (workflow, task) wins."""

    def __init__(self) -> None:
        self._by_target: dict[tuple[str, str], AgentRegistration] = {}

    def __len__(self) -> int:
        return len(self._by_target)

    def register(self, reg: AgentRegistration) -> bool:
        """Add an agent; an older registration of the same agent identity is told it was replaced.

        Newest wins only within one identity (a restarted pod must not be locked out while the old
        stream lingers); a registration held by another credential raises PermissionDenied. True
        when an older registration was replaced.
        """
        old = self._by_target.get((reg.workflow_id, reg.task))
        if old is not None and old is not reg and old.identity is not None and reg.identity is not None:
            if not old.identity.same_agent(reg.identity):
                raise RegistrationHeld(
                    f"workflow {reg.workflow_id!r} task {reg.task!r} is served by another agent credential"
                )
        replaced = old is not None and old is not reg
        if old is not None and old is not reg:
            log.warning(
                "agent %s replaces agent %s for workflow %s task %r",
                reg.agent_id,
                old.agent_id,
                reg.workflow_id,
                reg.task,
            )
            old.replaced.set()
        self._by_target[(reg.workflow_id, reg.task)] = reg
        return replaced

    def unregister(self, reg: AgentRegistration) -> None:
        """Remove an agent if it is still the registered one."""
        if self._by_target.get((reg.workflow_id, reg.task)) is reg:
            del self._by_target[(reg.workflow_id, reg.task)]

    def pick(self, workflow_id: str, task: str) -> AgentRegistration | None:
        """The agent for a workflow and task; with no task, the task-less agent or else the oldest one."""
        if task:
            return self._by_target.get((workflow_id, task))
        exact = self._by_target.get((workflow_id, ""))
        if exact is not None:
            return exact
        for (wf, _), reg in self._by_target.items():
            if wf == workflow_id:
                return reg
        return None

    def tasks(self, workflow_id: str) -> list[str]:
        """The tasks of a workflow's registered agents, sorted ("" for a task-less agent)."""
        return sorted(task for wf, task in self._by_target if wf == workflow_id)

    def exact(self, workflow_id: str, task: str) -> AgentRegistration | None:
        """The registration for exactly this workflow and task."""
        return self._by_target.get((workflow_id, task))

    def standby_count(self) -> int:
        """Standby streams parked over every registration."""
        return sum(len(reg.standby) for reg in self._by_target.values())

    def replay_bytes(self) -> int:
        """Bytes the registered agents hold in replay buffers, as they last reported."""
        return sum(entry.replay_bytes for reg in self._by_target.values() for entry in reg.held)

    def registrations(self) -> list[AgentRegistration]:
        """A snapshot of every registration."""
        return list(self._by_target.values())

    def workflows(self) -> set[str]:
        """Workflows that have at least one agent."""
        return {wf for wf, _ in self._by_target}
