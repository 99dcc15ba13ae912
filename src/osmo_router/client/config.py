"""Client settings shared by every operation."""

from __future__ import annotations

from dataclasses import dataclass

from osmo_router.channel import DialConfig
from osmo_router.protocol import pb


@dataclass(frozen=True)
class ClientConfig:
    """Where to go and who to reach."""

    dial: DialConfig
    workflow_id: str
    task: str = ""
    session_key: str = ""
    connect_timeout: float = 20.0

    def target(self) -> pb.SessionTarget:
        """The SessionTarget every init carries."""
        return pb.SessionTarget(workflow_id=self.workflow_id, task=self.task, session_key=self.session_key)
