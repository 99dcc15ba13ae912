"""Sessions and the rendezvous that pairs a client stream with an agent stream.

A session is created by whichever side arrives first and is keyed by an unguessable key
(128 random bits) bound to workflow, task, user and operation. The key is single use: once both
sides have joined, a third party presenting it gets ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from osmo_router.router.auth.identity import ROLE_ANY, Identity
from osmo_router.router.core.abandoned import AbandonedKeys
from osmo_router.router.core.budget import Budgets
from osmo_router.router.core.created import CreatedSessions

# (re-exported: ids were checked here before they had a module of their own)
from osmo_router.router.core.ids import MAX_ID_LENGTH as MAX_ID_LENGTH
from osmo_router.router.core.ids import check_id as check_id
from osmo_router.router.core.ids import new_session_key as new_session_key
from osmo_router.router.core.limits import UserSessions
from osmo_router.router.core.registry import AgentRegistration, AgentRegistry
from osmo_router.router.core.resumes import proposed_key, resume_info
from osmo_router.router.core.session import DefaultedTask

# (re-exported: they were defined here before they had a module of their own)
from osmo_router.router.core.session import Latch as Latch
from osmo_router.router.core.session import RendezvousTimeout as RendezvousTimeout
from osmo_router.router.core.session import Session as Session
from osmo_router.router.core.session import scoped_key as scoped_key
from osmo_router.wire.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from osmo_router.wire.protocol import pb

log = logging.getLogger(__name__)


class SessionStore:
    """In-memory sessions of one router process, with rendezvous on top of an AgentRegistry."""

    def __init__(
        self,
        registry: AgentRegistry,
        *,
        buffer: int,
        buffer_bytes: int = 4 * 1024 * 1024,
        max_pending: int,
        max_sessions: int,
        max_per_user: int,
        max_per_forward: int = 4096,
        max_pending_per_identity: int = 0,
        budgets: Budgets | None = None,
        on_remove: Callable[[Session], None] | None = None,
        created: CreatedSessions | None = None,
        rendezvous_timeout: float = 60.0,
    ) -> None:
        """`on_remove` is called with each session once it is forgotten (the shared directory withdraws it).

        `max_pending_per_identity` (0: no such limit) bounds the sessions one caller's identity keeps
        waiting for their second side, so that one token cannot fill `max_pending` for everybody.
        The development identity of --auth=none is not limited by it. `rendezvous_timeout` is how long
        a key whose client left before its agent joined is remembered (core/abandoned.py).
        """
        self._registry = registry
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._max_pending = max_pending
        self._max_sessions = max_sessions
        self._users = UserSessions(max_per_user, max_per_forward)
        self._budgets = budgets
        self._sessions: dict[str, Session] = {}
        self._pending = 0
        self._max_pending_per_identity = max_pending_per_identity
        #: Sessions waiting for their second side, by the subject of the side that created them.
        self._pending_by: dict[str, int] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self.accepting = True
        self._on_remove = on_remove
        #: Sessions an orchestrator created ahead of time (RouterControlService), by key.
        self.created = created if created is not None else CreatedSessions()
        #: Keys whose client left before the agent joined: their agent's Connect is refused.
        self._abandoned = AbandonedKeys(rendezvous_timeout)

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        """A snapshot of every session."""
        return list(self._sessions.values())

    @property
    def budgets(self) -> Budgets | None:
        """The byte budgets (per user, in all) that sessions' queues count against, if any."""
        return self._budgets

    @property
    def pending(self) -> int:
        """Sessions waiting for their second side."""
        return self._pending

    def get(self, workflow_id: str, key: str) -> Session | None:
        """The session with this key in this workflow, if any."""
        return self._sessions.get(scoped_key(workflow_id, key))

    def get_scoped(self, scoped: str) -> Session | None:
        """The session with this scoped key (`scoped_key`), if any."""
        return self._sessions.get(scoped)

    def join_client(
        self,
        identity: Identity,
        operation: int,
        target: pb.SessionTarget,
        open_msg: pb.SessionOpen,
        key: str | None = None,
        defaulted: DefaultedTask | None = None,
    ) -> Session:
        """Create or take the session for a client; signal the agent. Raises a RouterError on refusal.

        `key` is the key to give a new session when the client brings none (default: a fresh one);
        `defaulted`, the agent the replicas chose among all of theirs for a client naming no task (scale-out).
        """
        self._check_client(identity, target)
        self._check_init_room(identity, target, open_msg)
        agent = None if defaulted is None else self._registry.exact(target.workflow_id, defaulted.task)
        agent = agent or self._registry.pick(target.workflow_id, target.task)
        if target.resume.unconfirmed and target.resume.resuming and agent is not None and not agent.resumes:
            # The client does not know the session ever reached an agent: one without resume would run
            # the command again as a new session (docs/resume.md, "A break before the agent confirmed").
            raise FailedPrecondition("the workflow's agent does not recognise resumes; the session cannot be resumed")
        forward_id = open_msg.port_forward.forward_id if open_msg.WhichOneof("init") == "port_forward" else ""
        session = self._client_session(identity, target, agent, forward_id, key)
        self._bind_client(session, identity, operation, target, open_msg, forward_id)
        if agent is not None and not target.task and not session.agent_joined:
            if defaulted is not None and defaulted.task == agent.task:
                session.defaulted = defaulted if max(defaulted.count, len(defaulted.tasks)) > 1 else None
            elif len(tasks := self._registry.tasks(target.workflow_id)) > 1:
                session.defaulted = DefaultedTask(agent.task, tuple(tasks))
        if session.agent_joined:
            self._pair(session)
        elif agent is not None:
            if agent.take_standby(session):
                # The agent's stream is already here: no SessionRequest round trip.
                self._pair(session)
            else:
                session.expected_agent = agent.identity
                agent.request_session(session.key, operation)
        return session

    def _check_init_room(self, identity: Identity, target: pb.SessionTarget, open_msg: pb.SessionOpen) -> None:
        """Refuse an opening message that does not fit what the user's sessions may keep of theirs.

        It is kept for the session's life (sent to the agent, again at a resume), up to
        --max-message-size each: 100 waiting sessions with 2.9 MiB of env each grew the router by 287
        MiB, in no budget. Each is counted as held in the user's and the process's budgets. A resume
        of a session still held here replaces it (`_client_session`): its opening message is given back.
        """
        if self._budgets is None:
            return
        size = open_msg.ByteSize()
        replaced = self.get(target.workflow_id, target.session_key) if target.session_key else None
        if (
            replaced is not None
            and (target.resume.resuming or target.resume.attach)
            and replaced.user == identity.subject
        ):
            size -= replaced.init_bytes
        if not self._budgets.init_fits(identity.subject, size):
            raise ResourceExhausted(
                f"the sessions of {identity.subject} keep their maximum of {self._budgets.per_user} bytes"
                f" of opening messages (--user-buffer-bytes); this one has {open_msg.ByteSize()}"
            )

    def _check_client(self, identity: Identity, target: pb.SessionTarget) -> None:
        """Refuse a client while draining, with malformed ids, or without the right to the workflow."""
        if not self.accepting:
            raise Unavailable("router is draining; retry on another replica")
        check_id("workflow_id", target.workflow_id, required=True)
        check_id("task", target.task, required=False)
        check_id("session_key", target.session_key, required=False)
        identity.require_user()
        identity.require_workflow(target.workflow_id)

    def _client_session(
        self,
        identity: Identity,
        target: pb.SessionTarget,
        agent: AgentRegistration | None,
        forward_id: str,
        key: str | None,
    ) -> Session:
        """The session the client joins: the one its key names, or a new one (a resume supersedes)."""
        session = self.get(target.workflow_id, target.session_key) if target.session_key else None
        resuming = target.resume.resuming or target.resume.attach
        if session is not None and resuming:
            if target.resume.attach and session.user == identity.subject:
                # Another process of the owner takes it over: the attached client is told, and exits.
                session.fail(Aborted("the session was attached from another client"))
            self._supersede(session, identity)
            session = None
        if session is None:
            if agent is None and (not target.session_key or resuming):
                raise Unavailable(
                    f"no agent is registered for workflow {target.workflow_id!r}"
                    + (f" task {target.task!r}" if target.task else "")
                )
            self._check_pending(identity)
            self._users.check(identity.subject, forward_id)
            key = target.session_key or key or self._proposed(target) or new_session_key()
            return self._create(key, target.workflow_id, target.task, identity.subject)
        if session.client_joined:
            raise AlreadyExists("a client already joined this session")
        if target.task and session.task not in ("", target.task):
            raise PermissionDenied("the session key belongs to another task")
        self._users.check(identity.subject, forward_id)
        return session

    def _proposed(self, target: pb.SessionTarget) -> str:
        """The key the client asked for (named after its resume secret), refused when a session has it: a
        client never draws the same secret twice, so that is a replay, and the session is not its."""
        key = proposed_key(target)
        if key and self.get(target.workflow_id, key) is not None:
            raise AlreadyExists("the session key is taken")
        return key

    def _bind_client(
        self,
        session: Session,
        identity: Identity,
        operation: int,
        target: pb.SessionTarget,
        open_msg: pb.SessionOpen,
        forward_id: str,
    ) -> None:
        """Record the client on the session: its user (and budgets), operation, resume token, open message."""
        session.client_joined = True
        session.forward_id = forward_id
        if self._budgets is not None:
            # Known from here on: the user whose budget the session's queued bytes count against.
            budgets = self._budgets.acquire(identity.subject)
            session.to_agent.use_budgets(budgets)
            session.to_client.use_budgets(budgets)
        session.operation = operation
        session.user = identity.subject
        session.resume = resume_info(target)
        open_msg.session_key = session.key
        open_msg.user = identity.subject
        session.open_message = pb.ConnectResponse(open=open_msg).SerializeToString()
        if self._budgets is not None:
            session.init_bytes = len(session.open_message)
            self._budgets.hold_init(identity.subject, session.init_bytes)
        self._users.add(identity.subject, forward_id)

    def join_agent(self, identity: Identity, init: pb.ConnectInit) -> Session:
        """Create or take the session for an agent's Connect stream. Raises a RouterError on refusal."""
        check_id("session_key", init.session_key, required=True)
        check_id("workflow_id", init.workflow_id, required=True)
        check_id("task", init.task, required=False)
        check_id("agent_id", init.agent_id, required=False)
        identity.require_agent()
        identity.require_workflow(init.workflow_id)
        identity.require_task(init.task)
        if init.agent_id:
            identity.require_instance(init.agent_id)
        session = self.get(init.workflow_id, init.session_key)
        if session is None:
            if not self.accepting:
                raise Unavailable("router is draining")
            if scoped_key(init.workflow_id, init.session_key) in self._abandoned:
                raise Cancelled("the client left before the agent joined")
            self._check_pending(identity)
            session = self._create(init.session_key, init.workflow_id, init.task, identity.subject)
        elif (
            session.agent_joined
            or (session.task and session.task != init.task)
            or (session.expected_agent is not None and not session.expected_agent.same_agent(identity))
        ):
            # One answer for every reason, so that it tells an agent nothing about whose session it is.
            raise AlreadyExists("the session key is taken")
        session.agent_joined = True
        session.agent_id = init.agent_id
        reg = self._registry.exact(init.workflow_id, init.task)
        # Only the registration of this very agent process (its random id) vouches for its resumes.
        session.agent_resumes = (
            reg is not None and bool(init.agent_id) and reg.agent_id == init.agent_id and reg.resumes
        )
        if session.client_joined:
            self._pair(session)
        return session

    async def wait_paired(self, session: Session, timeout: float) -> None:
        """Wait for the other side; on timeout the session is removed and DeadlineExceeded raised."""
        try:
            async with asyncio.timeout(timeout):
                await session.paired.wait()
        except TimeoutError:
            err = RendezvousTimeout(f"no {'agent' if session.client_joined else 'client'} joined within {timeout:g}s")
            session.fail(err)
            self.remove(session)
            raise err from None

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no session is left, at most `timeout` seconds; True if none is left."""
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    def remove(self, session: Session) -> None:
        """Forget a session (idempotent)."""
        scoped = session.scoped_key
        if self._sessions.get(scoped) is session:
            del self._sessions[scoped]
            if not session.paired.is_set():
                self._unpend(session)
                if self._requested_in_vain(session):
                    self._abandoned.add(scoped)
            if not self._sessions:
                self._empty.set()
            if session.client_joined and session.user:
                self._users.remove(session.user, session.forward_id)
                if self._budgets is not None:
                    self._budgets.unhold_init(session.user, session.init_bytes)
                    self._budgets.release(session.user)
            if self._on_remove is not None:
                self._on_remove(session)

    def _requested_in_vain(self, session: Session) -> bool:
        """Whether the router asked an agent for this session (SessionRequest) and it is removed unjoined:
        that agent's Connect is still to come. Not for a key an orchestrator created, nor for one an
        old OSMO backend was told by OSMO's service: their backend may yet come for a retrying client."""
        return session.expected_agent is not None and not session.agent_joined and self.created.get(session.key) is None

    def supersede(self, workflow_id: str, key: str, identity: Identity) -> None:
        """End the session with this key, if held here, for its owner's resume served elsewhere."""
        session = self.get(workflow_id, key)
        if session is not None:
            self._supersede(session, identity)

    def _supersede(self, session: Session, identity: Identity) -> None:
        """A resume or attach of a session this router still holds: its owner's new stream replaces it.

        The old streams may not have noticed the break yet (a cut with no reset): the session is
        ended here so that the key can pair again. Only its user may; anyone else is refused.
        """
        if session.user and session.user != identity.subject:
            raise PermissionDenied("the session belongs to another user")
        session.fail(Unavailable("the client resumed the session on a new stream"))
        self.remove(session)

    def _create(self, key: str, workflow_id: str, task: str, creator: str) -> Session:
        session = Session(
            key=key, workflow_id=workflow_id, task=task, buffer=self._buffer, buffer_bytes=self._buffer_bytes
        )
        session.creator = creator
        self._sessions[session.scoped_key] = session
        self._abandoned.discard(session.scoped_key)
        self._empty.clear()
        self._pending += 1
        self._pending_by[creator] = self._pending_by.get(creator, 0) + 1
        return session

    def _pair(self, session: Session) -> None:
        session.paired_at = time.monotonic()
        session.paired.set()
        self._unpend(session)

    def _unpend(self, session: Session) -> None:
        self._pending -= 1
        left = self._pending_by.get(session.creator, 1) - 1
        if left > 0:
            self._pending_by[session.creator] = left
        else:
            self._pending_by.pop(session.creator, None)

    def _check_pending(self, identity: Identity) -> None:
        limit = self._max_pending_per_identity
        if limit and identity.role != ROLE_ANY and self._pending_by.get(identity.subject, 0) >= limit:
            raise ResourceExhausted(f"{identity.subject} keeps its maximum of {limit} sessions waiting for rendezvous")
        if self.pending >= self._max_pending:
            raise ResourceExhausted(f"too many sessions waiting for rendezvous (limit {self._max_pending})")
        if len(self._sessions) >= self._max_sessions:
            raise ResourceExhausted(f"router holds its maximum of {self._max_sessions} sessions")
