"""Streams relayed to the replica that owns their session (scale-out), one stand-in session each.

A client (or agent) whose session is held by another replica is served here by a relay: its stream
and one to the owner's peer service (`Placer.open_stream`), with the same identity, and the relay
between them (`relay_side` on both, never merging frames: either end may be an old WebSocket side).
The stand-in session holds only the relay's queues, counted in the user's and the process's budgets
as the owner counts its own; the owner holds the session itself (rendezvous, metrics, resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from osmo_router.io import memtune
from osmo_router.router.config import RouterConfig
from osmo_router.router.core import audit
from osmo_router.router.core.hooks import RelayedHooks
from osmo_router.router.core.placement import FarStream, Owner, Placer
from osmo_router.router.core.relay import relay_side
from osmo_router.router.core.resumes import Moved, resume_info, resume_info_of_open
from osmo_router.router.core.sessions import Session, SessionStore
from osmo_router.router.core.side import CONNECT, AgentJoin, ClientJoin, Side
from osmo_router.wire.codec import INIT_TAG
from osmo_router.wire.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, RouterError, Unavailable
from osmo_router.wire.protocol import CLOSE_GRACE


class OwnerRelays:
    """The streams this replica relays to the owners of their sessions (see the module docstring)."""

    def __init__(
        self, config: RouterConfig, sessions: SessionStore, placer: Placer | None, hooks: RelayedHooks
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._placer = placer
        self._hooks = hooks
        #: The stand-in sessions of the streams relayed now.
        self.relays: set[Session] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream is relayed, at most `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def relay_client(self, side: Side, owner: Owner, join: ClientJoin) -> None:
        """Relay a client's stream to the owner of its session (RESOURCE_EXHAUSTED when its init does not fit)."""
        # Its init, parsed and encoded, lives here as long as the relay (in the join).
        init_bytes = len(join.raw_init) + join.open_msg.ByteSize()
        self._check_init(join.identity.subject, init_bytes)
        session = self._stub(join.target.workflow_id, join.target.task, join.identity.subject, init_bytes)
        session.operation = join.operation.value
        session.resume = resume_info(join.target)
        await self._relay_to_owner(side, owner, join.operation.method, session, join, near_is_client=True)

    async def relay_agent(self, side: Side, owner: Owner, join: AgentJoin) -> None:
        """Relay an agent's stream to the owner of its session."""
        init_bytes = len(join.raw_init) + join.init.ByteSize()
        self._check_init(join.identity.subject, init_bytes)
        session = self._stub(join.init.workflow_id, join.init.task, join.identity.subject, init_bytes)
        await self._relay_to_owner(side, owner, "Connect", session, join, near_is_client=False)

    def _check_init(self, user: str, size: int) -> None:
        """Refuse a relayed stream whose init does not fit the user's (or the process's) budget of opening
        messages, as the owner refuses a session's (SessionStore): a relay keeps its init too, and before
        (2026-12-02) 20 relayed sessions of one user with 2.9 MiB inits held 116 MiB here in no budget."""
        budgets = self._sessions.budgets
        if budgets is not None and not budgets.init_fits(user, size):
            raise ResourceExhausted(
                f"the sessions of {user} keep their maximum of {budgets.per_user} bytes of opening messages"
                f" (--user-buffer-bytes); this one has {size}"
            )

    def _stub(self, workflow_id: str, task: str, user: str, init_bytes: int) -> Session:
        """A session object for a relayed stream: its queues and counts only (the owner holds the session);
        its init (`init_bytes`) is counted as held in the user's and the process's budgets meanwhile."""
        config = self._config
        session = Session(
            key="",
            workflow_id=workflow_id,
            task=task,
            buffer=config.flow_control_buffer,
            buffer_bytes=config.flow_control_bytes,
        )
        session.user = user
        budgets = self._sessions.budgets
        if budgets is not None:
            # What this replica queues for the owner's session is in its memory too: count it in the
            # user's and the process's budgets here, as the owner does (released in _relay_to_owner).
            shares = budgets.acquire(user)
            session.to_agent.use_budgets(shares)
            session.to_client.use_budgets(shares)
            session.init_bytes = init_bytes
            budgets.hold_init(user, init_bytes)
        return session

    async def _relay_to_owner(
        self,
        side: Side,
        owner: Owner,
        method: str,
        session: Session,
        join: ClientJoin | AgentJoin,
        *,
        near_is_client: bool,
    ) -> None:
        """Relay the side's stream to `method` of the owner's peer service, for the same identity; then end
        the side (cleanly, or with the error) and let go of the stand-in session and its budgets."""
        assert self._placer is not None
        placer = self._placer
        label = session.operation_name if near_is_client else CONNECT
        self.relays.add(session)
        self._idle.clear()
        failure: RouterError | None = None
        try:
            await self._relay_hop(side, owner, method, session, join, label, near_is_client)
        except RouterError as err:
            failure = err
        finally:
            self.relays.discard(session)
            if not self.relays:
                self._idle.set()
            if self._sessions.budgets is not None:
                self._sessions.budgets.unhold_init(session.user, session.init_bytes)
                self._sessions.budgets.release(session.user)
            memtune.trim_when_idle()
        if failure is None:
            await side.finish()
            return
        session.fail(failure)
        if not isinstance(failure, Moved):  # a drain's move is no relay error
            placer.relay_failed(label, failure.code.name)
        await side.refuse(failure)

    async def _relay_hop(
        self,
        side: Side,
        owner: Owner,
        method: str,
        session: Session,
        join: ClientJoin | AgentJoin,
        label: str,
        near_is_client: bool,
    ) -> None:
        """The hop itself: accept the side, open the stream to the owner, pass the owner's first answer on,
        relay the two to their end (counted and audited as a relay). The far stream is cancelled on every path."""
        assert self._placer is not None
        placer = self._placer
        started = time.monotonic()
        far: FarStream | None = None
        try:
            await side.accept()
            via = f"{self._config.router_id} {side.peer}"
            far = await placer.open_stream(owner, method, join.identity, via)
            first = await self._open_far(far, owner, join.raw_init)
            if not near_is_client:
                session.resume = resume_info_of_open(first)  # the agent's stream of a resumable session
            await side.send_first(first)
            del join, first
            placer.relay_started(label)
            try:
                audit.relay_event("relay start", session, label, owner.replica, side.peer)
                await self._pipe(session, side, far, near_is_client)
            finally:
                placer.relay_ended(label)
                duration = time.monotonic() - started
                audit.relay_event("relay end", session, label, owner.replica, side.peer, duration)
        finally:
            if far is not None:
                far.cancel()

    async def _open_far(self, far: FarStream, owner: Owner, raw_init: bytes) -> bytes:
        """Send the init to the owner and return its first answer (the client's ready, the agent's open)."""
        assert self._placer is not None
        try:
            async with asyncio.timeout(self._placer.answer_timeout):
                await far.write(raw_init)
                first = await far.read()
        except TimeoutError:
            raise DeadlineExceeded(f"router replica {owner.replica} did not answer in time") from None
        if first is None:
            raise Unavailable(f"router replica {owner.replica} ended the stream before the session started")
        if first[0] != INIT_TAG:
            raise InvalidArgument(f"router replica {owner.replica} answered with something other than its ready")
        return first

    async def _pipe(self, session: Session, near: Side, far: FarStream, near_is_client: bool) -> None:
        """Relay both streams; the near side plays its own role, the owner the other one.

        Frames are never merged on a relayed hop: either end may be an old WebSocket side whose
        messages each mean something.
        """
        far_side = asyncio.create_task(self._far_side(session, far, is_client=not near_is_client))
        timeout = self._config.flow_control_timeout
        try:
            await relay_side(
                session,
                near,
                is_client=near_is_client,
                flow_control_timeout=timeout,
                hooks=self._hooks,
                merge=False,
                min_drain_rate=self._config.min_drain_rate,
            )
            # The agent's last frames may still be on their way to the owner.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout + CLOSE_GRACE):
                    await asyncio.shield(far_side)
            if far_side.done():
                far_side.result()
        finally:
            if not far_side.done():
                far.cancel()
                far_side.cancel()
            with contextlib.suppress(BaseException):
                await far_side

    async def _far_side(self, session: Session, far: FarStream, *, is_client: bool) -> None:
        try:
            await relay_side(
                session,
                far,
                is_client=is_client,
                flow_control_timeout=self._config.flow_control_timeout,
                hooks=self._hooks,
                merge=False,
                min_drain_rate=self._config.min_drain_rate,
            )
        except RouterError as err:
            session.fail(err)
            raise
