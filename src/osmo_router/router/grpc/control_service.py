"""RouterControlService: an orchestrator creates, reads and terminates sessions ahead of time.

Callers must hold a service credential (`role: service` under --auth=jwt; anybody under --auth=none,
which is loopback only) that reaches the session's workflow. The sessions live in the router's
session store (`SessionStore.created`, core/created.py); what they are for is in docs/migration.md.
"""

from __future__ import annotations

import logging

import grpc

from osmo.router.v1 import control_pb2 as cpb
from osmo.router.v1 import control_pb2_grpc as cpb_grpc
from osmo_router.cli.logs import fingerprint
from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.router.core.created import CreatedSession
from osmo_router.router.core.sessions import Session, SessionStore
from osmo_router.router.grpc.calls import ServicerContext
from osmo_router.wire.errors import NotFound, RouterError

log = logging.getLogger(__name__)

CONTROL_SERVICE = "osmo.router.v1.RouterControlService"


class ControlService(cpb_grpc.RouterControlServiceServicer):
    """The handlers of RouterControlService."""

    def __init__(self, auth: Authenticator, sessions: SessionStore) -> None:
        self._auth = auth
        self._sessions = sessions

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve the service on `server`."""
        cpb_grpc.add_RouterControlServiceServicer_to_server(self, server)

    async def _service(self, context: ServicerContext) -> Identity:
        identity = await self._auth.authenticate(context.invocation_metadata() or ())
        identity.require_service()
        return identity

    def _owned(self, identity: Identity, key: str) -> CreatedSession:
        """The live created session of `key` that `identity` may manage (NotFound otherwise, whatever the reason)."""
        session = self._sessions.created.get(key) if key else None
        if session is None or session.key != key or not identity.may_reach(session.workflow_id):
            raise NotFound("no such created session")
        return session

    async def CreateSession(
        self, request: cpb.CreateSessionRequest, context: ServicerContext
    ) -> cpb.CreateSessionResponse:
        """Hold a new created session."""
        try:
            identity = await self._service(context)
            identity.require_workflow(request.session.workflow_id)
            session = self._sessions.created.create(identity.subject, request.session)
        except RouterError as err:
            await context.abort(err.code, err.message)
        log.info(
            "session %s created by %s for workflow %s",
            fingerprint(session.key),
            identity.subject,
            session.workflow_id,
            extra={"fields": {"event": "session created", "operation": session.operation}},
        )
        return cpb.CreateSessionResponse(session=session.message, expires_in_seconds=int(session.expires_in()))

    async def GetSession(self, request: cpb.GetSessionRequest, context: ServicerContext) -> cpb.GetSessionResponse:
        """What the router holds for a created session."""
        try:
            session = self._owned(await self._service(context), request.session_key)
        except RouterError as err:
            await context.abort(err.code, err.message)
        return cpb.GetSessionResponse(
            session=session.message,
            expires_in_seconds=int(session.expires_in()),
            used=session.used,
            active=len(self._running(session)),
        )

    async def TerminateSession(
        self, request: cpb.TerminateSessionRequest, context: ServicerContext
    ) -> cpb.TerminateSessionResponse:
        """Forget a created session and end every session under way on its key or its connection keys."""
        try:
            session = self._owned(await self._service(context), request.session_key)
        except RouterError as err:
            await context.abort(err.code, err.message)
        running = self._running(session)
        self._sessions.created.remove(session)
        for live in running:
            live.fail(NotFound("the session was terminated by its orchestrator"))
        log.info("session %s terminated (%d running ended)", fingerprint(session.key), len(running))
        return cpb.TerminateSessionResponse(ended=len(running))

    def _running(self, session: CreatedSession) -> list[Session]:
        keys = {session.key, *session.children}
        found = (self._sessions.get(session.workflow_id, key) for key in keys)
        return [live for live in found if live is not None and live.error is None]
