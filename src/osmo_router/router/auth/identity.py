"""Who is calling: the seam between transport and authentication.

`NoAuth` serves the loopback development mode. The JWT authenticator lives beside it and
implements the same interface; the services only ever see an `Identity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from osmo_router.wire.errors import PermissionDenied

ROLE_AGENT = "agent"
ROLE_USER = "user"
#: The development identity of --auth=none (loopback only): may act as an agent and as a user.
ROLE_ANY = "any"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    subject: str
    role: str = ROLE_USER
    workflows: tuple[str, ...] = ("*",)
    claims: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

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
        task could enter every other task of the workflow through the router.
        """
        if self.role == ROLE_AGENT:
            raise PermissionDenied(f"{self.subject} holds an agent token; agents cannot open client sessions")


class Authenticator(Protocol):
    """Turns the metadata of a call into an Identity, or raises Unauthenticated."""

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The identity behind the call's metadata."""
        ...

    async def close(self) -> None:
        """Release background resources (key refresh tasks, HTTP sessions)."""
        ...


class NoAuth:
    """Development mode: everyone is an anonymous caller that may do anything (loopback only)."""

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """An all-powerful anonymous identity."""
        return Identity(subject="anonymous", role=ROLE_ANY, workflows=("*",))

    async def close(self) -> None:
        """Nothing to release."""
