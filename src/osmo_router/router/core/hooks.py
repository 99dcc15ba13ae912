"""The relay's hooks (core/relay.py RelayHooks): what a session served here and a relayed stream report."""

from __future__ import annotations

from osmo_router.router.core import audit
from osmo_router.router.core.resumes import note_agent_answer
from osmo_router.router.core.sessions import Session
from osmo_router.router.ops.metrics import RouterMetrics


class RelayedHooks:
    """Relay hooks of a stream relayed to another replica: bytes are counted by the owner, stalls here."""

    def __init__(self, metrics: RouterMetrics) -> None:
        #: (The relay counts bytes on the session, for the relay's audit line, as for a local session.)
        self._metrics = metrics

    def flow_control_timeout(self, session: Session) -> None:
        """A reader stopped reading: counted like a local session's."""
        self._metrics.flow_control_timeouts_total.inc()

    def settle(self, session: Session) -> None:
        """Nothing to fold: the owner counts these bytes into router_grpc_bytes_total."""

    def agent_answered(self, session: Session, message: bytes) -> None:
        """Note whether the agent took the resume (a draining replica moves the stream); the owner counts it."""
        if session.resume is not None:
            note_agent_answer(session.resume, message)


class LocalHooks:
    """Relay hooks of a session served here: the metrics, and the agent's answer to a resume."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self.flow_control_timeout = metrics.flow_control_timeout
        self.settle = metrics.settle

    def agent_answered(self, session: Session, message: bytes) -> None:
        """Note whether the agent took the session's resume; count and audit a resume (core/resumes.py)."""
        if session.resume is None:
            return
        note_agent_answer(session.resume, message)
        self._metrics.resume_answered(session)
        if session.resume.resuming:
            audit.resume_event(session)
