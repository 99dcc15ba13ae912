"""RouterClientService.ListSessions: the caller's resumable sessions on a workflow (`osmo-net-client sessions`).

Agents report the sessions they hold on their Register stream (`RegisterRequest.held`: the whole
list, on change); the registry keeps the latest list with each registration. A caller sees only
their own sessions (user = the authenticated subject), on workflows their identity may reach.

Scale-out: when no agent of the workflow is registered on this replica, the call is relayed to
the replica the directory names for the workflow's agent (RouterPeerService.ListSessions, with
the caller's identity), as a client stream would be; the holding replica answers from its
registry. A replica that cannot reach the directory answers from what it holds itself. With no
agent of the workflow anywhere it can learn of, the answer is UNAVAILABLE "no agent is registered",
as for a session (an empty list would claim the caller has none).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.router.core.registry import AgentRegistry
from osmo_router.router.core.sessions import check_id
from osmo_router.router.grpc.calls import ServicerContext, abort
from osmo_router.wire.errors import RouterError, Unavailable
from osmo_router.wire.protocol import pb

log = logging.getLogger(__name__)

#: Asks the replica holding the workflow's agent (scale-out); None when this replica is the one to answer.
Relay = Callable[[Identity, pb.ListSessionsRequest], Awaitable[pb.ListSessionsResponse | None]]


class ListSessions:
    """The unary ListSessions handler, on the client service (and, with the peer authenticator, the peer one)."""

    def __init__(self, auth: Authenticator, registry: AgentRegistry, relay: Relay | None = None) -> None:
        self._auth = auth
        self._registry = registry
        self._relay = relay

    def method(self, peer: Authenticator | None = None) -> grpc.RpcMethodHandler:
        """The method handler; with `peer`, for calls another replica relays (never relayed again)."""

        async def list_sessions(request: pb.ListSessionsRequest, context: ServicerContext) -> pb.ListSessionsResponse:
            try:
                identity = await (peer or self._auth).authenticate(context.invocation_metadata() or ())
                return await self.answer(identity, request, relay=peer is None)
            except RouterError as err:
                await abort(context, err.code, err.message)
                raise AssertionError("unreachable") from None

        return grpc.unary_unary_rpc_method_handler(
            list_sessions,
            request_deserializer=pb.ListSessionsRequest.FromString,
            response_serializer=pb.ListSessionsResponse.SerializeToString,
        )

    async def answer(
        self, identity: Identity, request: pb.ListSessionsRequest, *, relay: bool = True
    ) -> pb.ListSessionsResponse:
        """The caller's sessions on the request's workflow (and task); RouterError on refusal."""
        target = request.target
        check_id("workflow_id", target.workflow_id, required=True)
        check_id("task", target.task, required=False)
        identity.require_user()
        identity.require_workflow(target.workflow_id)
        regs = [
            reg
            for reg in self._registry.registrations()
            if reg.workflow_id == target.workflow_id and (not target.task or reg.task == target.task)
        ]
        if not regs and relay and self._relay is not None:
            try:
                relayed = await self._relay(identity, request)
            except RouterError as err:
                log.info("ListSessions not relayed: %s", err.message)
                relayed = None
            if relayed is not None:
                return relayed
        if not regs:
            # Not "no sessions": with no agent to ask, nobody knows (a mistyped workflow, an agent restarting).
            where = f"workflow {target.workflow_id!r}" + (f" task {target.task!r}" if target.task else "")
            raise Unavailable(f"no agent is registered for {where}")
        sessions = [entry for reg in regs for entry in reg.held_by(identity.subject)]
        sessions.sort(key=lambda entry: entry.started_unix)
        return pb.ListSessionsResponse(sessions=sessions)


__all__ = ["ListSessions", "Relay"]
