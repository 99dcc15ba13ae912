"""Client settings shared by every operation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from osmo_router.client.notice import say
from osmo_router.dial.config import DialConfig

if TYPE_CHECKING:
    from osmo_router.wire.protocol import pb


class Notices:
    """Lines told to the user once per process, however many sessions bring them (port-forward's)."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def once(self, message: str) -> None:
        """Say `message` on stderr (client/notice.py) unless it was said already."""
        if message not in self._said:
            self._said.add(message)
            say(message, tty=False)


@dataclass(frozen=True)
class ClientConfig:
    """Where to go and who to reach."""

    dial: DialConfig
    workflow_id: str
    task: str = ""
    session_key: str = ""
    connect_timeout: float = 20.0
    #: "grpc" or "ws" when chosen explicitly (--transport / OSMO_TRANSPORT); None picks (see transport/rollout.py).
    transport: str | None = None
    #: Canary rollout: the percentage of users on gRPC (sticky per user); None means everyone.
    grpc_percent: int | None = None
    #: The router's WebSocket endpoint; None means the gRPC host, port 8000.
    ws_address: str | None = None
    #: The session key belongs to an old OSMO backend (osmo-ctrl): speak the old protocol to it (client/legacy.py).
    legacy_backend: bool = False
    #: Longest the client tries to resume a session after a break (0: no resume; client/resume.py).
    resume_grace: float = 300.0
    notices: Notices = field(default_factory=Notices, compare=False, repr=False)

    def target(self) -> pb.SessionTarget:
        """The SessionTarget every init carries."""
        from osmo_router.wire.protocol import pb  # here: `osmo-net-client rsync` starts without protobuf

        return pb.SessionTarget(workflow_id=self.workflow_id, task=self.task, session_key=self.session_key)
