"""Registered agents: which agent serves which workflow/task, and how to reach it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from osmo_router.protocol import pb

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AgentRegistration:
    """One live Register stream: an agent and the queue of messages pushed down to it."""

    agent_id: str
    workflow_id: str
    task: str
    operations: tuple[int, ...]
    outbox: asyncio.Queue[pb.RegisterResponse] = field(default_factory=asyncio.Queue)
    replaced: asyncio.Event = field(default_factory=asyncio.Event)

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

    def register(self, reg: AgentRegistration) -> None:
        """Add an agent; an older registration for the same workflow and task is told it was replaced."""
        old = self._by_target.get((reg.workflow_id, reg.task))
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

    def registrations(self) -> list[AgentRegistration]:
        """A snapshot of every registration."""
        return list(self._by_target.values())

    def workflows(self) -> set[str]:
        """Workflows that have at least one agent."""
        return {wf for wf, _ in self._by_target}
