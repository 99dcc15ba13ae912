"""Who is calling: the seam between transport and authentication.

`NoAuth` serves the loopback development mode. The JWT authenticator lives beside it and
implements the same interface; the services only ever see an `Identity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from osmo_router.wire.errors import PermissionDenied

ROLE_AGENT = "agent"
ROLE_USER = "user"
#: The development identity of --auth=none (loopback only): may act as an agent and as a user.
ROLE_ANY = "any"
#: An OSMO backend (osmo-ctrl) holding its workflow's service token (`--ws-backend-role`, auth/jwt.py):
#: it may serve its one workflow on the old router's WebSocket backend endpoint, and nothing else.
ROLE_LEGACY_BACKEND = "legacy-backend"
#: An orchestrator (OSMO's service): may call RouterControlService, and nothing else.
ROLE_SERVICE = "service"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    subject: str
    role: str = ROLE_USER
    workflows: tuple[str, ...] = ("*",)
    claims: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    #: The one task an agent credential serves (its `task` claim; "" is the task-less agent); None: any.
    task: str | None = None
    #: The one agent instance (pod) a credential is for (its `agent_id` claim); None: any.
    instance: str | None = None
    #: When the credential stops being valid (Unix time, its `exp`); None: never (--auth=none, peers).
    expires: float | None = None

    def require_task(self, task: str) -> None:
        """Raise PermissionDenied unless this agent credential may serve `task` of its workflows."""
        if self.task is not None and task != self.task:
            raise PermissionDenied(f"{self.subject} may serve task {self.task!r} only, not {task!r}")

    def require_instance(self, agent_id: str) -> None:
        """Raise PermissionDenied unless this credential was issued for agent instance `agent_id`."""
        if self.instance is not None and agent_id != self.instance:
            raise PermissionDenied(f"{self.subject}'s token is for agent {self.instance!r}, not {agent_id!r}")

    def same_agent(self, other: Identity) -> bool:
        """True when `other` is the same agent credential holder (subject and bindings): it may replace us."""
        return (self.subject, self.task, self.instance) == (other.subject, other.task, other.instance)

    def may_reach(self, workflow_id: str) -> bool:
        """True when this identity may use (or, for an agent, serve) the workflow."""
        return "*" in self.workflows or workflow_id in self.workflows

    def require_workflow(self, workflow_id: str) -> None:
        """Raise PermissionDenied unless this identity may reach the workflow."""
        if not self.may_reach(workflow_id):
            raise PermissionDenied(f"{self.subject} has no access to workflow {workflow_id!r}")

    def require_agent(self) -> None:
        """Raise PermissionDenied unless this identity is an agent."""
        if self.role not in (ROLE_AGENT, ROLE_ANY):
            raise PermissionDenied(f"{self.subject} is not an agent (role {self.role!r}): only agent tokens may serve")

    def require_user(self) -> None:
        """Raise PermissionDenied for agent identities: an agent's token cannot open client sessions.

        A workload's token is readable inside its container; were it good for exec, code in one
        task could enter every other task of the workflow through the router. The same holds for
        an OSMO backend's workflow token.
        """
        if self.role == ROLE_AGENT:
            raise PermissionDenied(f"{self.subject} holds an agent token; agents cannot open client sessions")
        if self.role == ROLE_LEGACY_BACKEND:
            raise PermissionDenied(f"{self.subject} holds an OSMO backend token; it cannot open client sessions")
        if self.role == ROLE_SERVICE:
            raise PermissionDenied(f"{self.subject} holds a service token; it cannot open client sessions")

    def require_service(self) -> None:
        """Raise PermissionDenied unless this identity is an orchestrator's (role `service`)."""
        if self.role not in (ROLE_SERVICE, ROLE_ANY):
            raise PermissionDenied(
                f"{self.subject} is not a service (role {self.role!r}): only service tokens may manage sessions"
            )

    def as_legacy_backend(self, workflow_id: str) -> Identity:
        """The identity an old-protocol WebSocket backend serves `workflow_id` with.

        Only the WebSocket backend endpoint calls this. An OSMO backend token (ROLE_LEGACY_BACKEND)
        becomes an agent identity for its own workflow only (PermissionDenied for any other); every
        other identity is returned as it is (an agent token still serves, a user token is refused
        later by `require_agent`).
        """
        if self.role != ROLE_LEGACY_BACKEND:
            return self
        self.require_workflow(workflow_id)
        return replace(self, role=ROLE_AGENT, workflows=(workflow_id,))


class Authenticator(Protocol):
    """Turns the metadata of a call into an Identity, or raises Unauthenticated."""

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The identity behind the call's metadata."""
        ...

    async def revalidate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The identity again, verified afresh (no cache): long-lived streams are re-checked with it."""
        ...

    async def close(self) -> None:
        """Release background resources (key refresh tasks, HTTP sessions)."""
        ...


class NoAuth:
    """Development mode: everyone is an anonymous caller that may do anything (loopback only)."""

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """An all-powerful anonymous identity."""
        return Identity(subject="anonymous", role=ROLE_ANY, workflows=("*",))

    async def revalidate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The same all-powerful identity."""
        return await self.authenticate(metadata)

    async def close(self) -> None:
        """Nothing to release."""
