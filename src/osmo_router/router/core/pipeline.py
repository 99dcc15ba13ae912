"""The session pipeline: the one code path from a parsed, authenticated stream to its end.

Every entry point (gRPC client and agent services, the WebSocket endpoints, the peer service that
other replicas relay through) builds a `Side` and hands it here with a `ClientJoin` or an
`AgentJoin`. The pipeline then places the stream (here, or relayed to the replica that holds its
other side), joins the rendezvous, waits for the other side, sends the first message, counts the
metrics, writes the audit lines, relays, and ends or refuses the stream. Nothing in here knows
which transport carries a side.

Decisions kept on purpose:
- A client that goes away is not an error of the router: it is counted in no error counter, on
  either transport (the audit's end line says CANCELLED). Refusals and failures the router sees
  are counted by operation, code and the client's transport.
- An agent side that fails is not counted as an error either (its client's side counts the
  session's failure once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from osmo_router.io import memtune
from osmo_router.router.auth.identity import Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core import audit
from osmo_router.router.core.budget import ByteBudget
from osmo_router.router.core.hooks import LocalHooks, RelayedHooks
from osmo_router.router.core.owner_relays import OwnerRelays
from osmo_router.router.core.placement import Placer
from osmo_router.router.core.relay import relay_side
from osmo_router.router.core.resumes import Moved, cause_of, is_resuming
from osmo_router.router.core.sessions import Session, SessionStore
from osmo_router.router.core.side import CONNECT, AgentJoin, ClientJoin, Side
from osmo_router.router.ops.metrics import RouterMetrics
from osmo_router.wire.errors import Cancelled, DeadlineExceeded, RouterError, Unavailable
from osmo_router.wire.protocol import pb


class SessionPipeline:
    """Places, pairs, relays and ends every session stream of one router."""

    def __init__(
        self, config: RouterConfig, sessions: SessionStore, metrics: RouterMetrics, placer: Placer | None = None
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._metrics = metrics
        self._placer = placer
        self._hooks = LocalHooks(metrics)
        #: The streams relayed to the replica that owns their session (scale-out).
        self._owners = OwnerRelays(config, sessions, placer, RelayedHooks(metrics))

    async def refuse(self, side: Side, label: str, error: RouterError, identity: Identity | None = None) -> None:
        """Refuse a stream before it became a session: count it, audit it, end the stream with the error."""
        self._metrics.error(label, error.code, side.transport)
        audit.refused(label, error, side.peer, identity, transport=side.transport)
        await side.refuse(error)

    async def serve_client(self, side: Side, join: ClientJoin) -> None:
        """Serve a client stream from placement to its end."""
        label = join.operation.label
        try:
            key, defaulted = None, None
            # A created session's key: the workflow the client named (maybe an alias) is the session's.
            created = self._sessions.created.lookup(join.target.session_key, join.target.workflow_id)
            if created is not None:
                join.target.workflow_id = created.workflow_id
            if self._placer is not None:
                place = await self._placer.place_client(join.identity, join.target, from_peer=join.from_peer)
                if place.owner is not None:
                    await self._owners.relay_client(side, place.owner, join)
                    return
                key, defaulted = place.key, place.defaulted
            session = self._sessions.join_client(
                join.identity, join.operation.value, join.target, join.open_msg, key=key, defaulted=defaulted
            )
        except RouterError as err:
            if is_resuming(join.target):
                self._resume_failed(label, err, join.identity)
            await self.refuse(side, label, err, join.identity)
            return
        if join.target.resume.attach:
            audit.attach_event("session attach", session, side.peer)
        timeout = join.rendezvous_timeout
        # This frame lives as long as the session: keep only what the session needs (with thousands
        # of idle sessions, the parsed init and the identity's claims add up).
        del join
        await self._accept(side, session)
        await self._run_client(session, side, timeout)

    async def serve_agent(self, side: Side, join: AgentJoin) -> None:
        """Serve an agent's (or an old backend's) session stream from placement to its end."""
        try:
            if self._placer is not None:
                place = await self._placer.place_agent(join.identity, join.init, from_peer=join.from_peer)
                if place.owner is not None:
                    await self._owners.relay_agent(side, place.owner, join)
                    return
            session = self._sessions.join_agent(join.identity, join.init)
        except RouterError as err:
            await self.refuse(side, CONNECT, err, join.identity)
            return
        timeout = join.rendezvous_timeout
        del join
        await self._accept(side, session)
        await self.run_agent(session, side, timeout)

    async def run_agent(self, session: Session, side: Side, timeout: float) -> None:
        """The agent's side of a joined session: wait for the client, send SessionOpen, relay, end."""
        clean = False
        failure: RouterError | None = None
        try:
            if not session.paired.is_set():
                await self._wait_paired(session, side, timeout, "agent")
            self._metrics.agent_sessions_by_transport.labels(session.operation_name, side.transport).inc()
            await side.send_first(session.open_message)
            await self._relay(session, side, is_client=False)
            clean = True
        except RouterError as err:
            failure = err
        finally:
            if not clean:
                session.fail(failure or Unavailable("the agent disconnected"))
                self._sessions.remove(session)
        await (side.refuse(failure) if failure is not None else side.finish())

    def move_resumable(self, reason: str) -> int:
        """End every resumable session served or relayed here with `Moved`: both ends resume elsewhere.

        Returns how many were ended. Sessions that cannot resume (no resume asked, an agent without
        resume, the WebSocket transport) are left to end by themselves.
        """
        moved = 0
        for session in [*self._sessions.sessions(), *self._owners.relays]:
            if session.resume is not None and session.resume.confirmed and session.error is None:
                session.fail(Moved(reason))
                if session.key:  # a relayed stream's owner counts the session
                    self._metrics.sessions_moved_total.labels(session.operation_name).inc()
                moved += 1
        return moved

    def end_all(self, reason: str) -> int:
        """End every session served or relayed here that has not ended yet with UNAVAILABLE `reason`.

        For the drain's end: without it the server's stop cancels their calls, and the relay
        takes that for the client leaving ("the client went away" in the audit, CANCELLED).
        Returns how many were ended.
        """
        ended = 0
        for session in [*self._sessions.sessions(), *self._owners.relays]:
            if session.error is None:
                session.fail(Unavailable(reason))
                ended += 1
        return ended

    def _resume_failed(self, label: str, err: RouterError, identity: Identity | None) -> None:
        cause = "timeout" if isinstance(err, DeadlineExceeded) else cause_of(err.code, err.message)
        self._metrics.resume_failed(label, cause)
        audit.resume_failed(label, err, identity, cause)

    async def wait_relays_idle(self, timeout: float) -> bool:
        """Wait until no stream is relayed to another replica, at most `timeout` seconds."""
        return await self._owners.wait_idle(timeout)

    async def _wait_paired(self, session: Session, side: Side, timeout: float, role: str) -> None:
        """Wait for the other side; a peer that leaves meanwhile ends the pending session at once."""
        gone = side.watch_gone(self._waiting_budgets(session, role))
        if gone is None:
            await self._sessions.wait_paired(session, timeout)
            return
        watcher = asyncio.ensure_future(gone)
        waiter = asyncio.ensure_future(self._sessions.wait_paired(session, timeout))
        try:
            await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watcher, waiter):
                task.cancel()
            await asyncio.gather(watcher, waiter, return_exceptions=True)
        if waiter.done() and not waiter.cancelled():
            waiter.result()  # paired, or DeadlineExceeded
            return
        error = Cancelled(f"the {role} went away before the other side joined")
        session.fail(error)
        self._sessions.remove(session)
        raise error

    def _waiting_budgets(self, session: Session, role: str) -> tuple[ByteBudget, ...]:
        """Where what a waiting side keeps of its peer's messages counts: the queue it will go to
        (the client's: her budgets, known since she joined), else the process's budget alone."""
        queue = session.to_agent if role == "client" else session.to_client
        if queue.budgets:
            return queue.budgets
        budgets = self._sessions.budgets
        return (budgets.total,) if budgets is not None else ()

    async def _accept(self, side: Side, session: Session) -> None:
        try:
            await side.accept()
        except BaseException:
            session.fail(Unavailable("the stream went away before it was accepted"))
            self._sessions.remove(session)
            raise

    async def _run_client(self, session: Session, side: Side, timeout: float) -> None:
        op_name = session.operation_name
        started, clean, active = time.monotonic(), False, False
        failure: RouterError | None = None
        try:
            if not session.paired.is_set():
                await self._wait_paired(session, side, timeout, "client")
            if session.paired_at is not None:
                self._metrics.rendezvous_duration.labels(op_name).observe(session.paired_at - session.created)
            await side.send_first(_ready(session))
            self._metrics.session_started(op_name, side.transport)
            active = True
            audit.session_event("session start", session, side.peer, transport=side.transport)
            await self._relay(session, side, is_client=True)
            clean = True
        except RouterError as err:
            failure = err
        finally:
            if not clean:
                session.fail(failure or Cancelled("the client went away"))
            self._sessions.remove(session)
            # Bulk sessions leave freed 1 MiB buffers in the heap: give them back once quiet.
            memtune.trim_when_idle()
            if active:
                self._metrics.sessions_active.labels(op_name).dec()
                duration = time.monotonic() - started
                audit.session_event("session end", session, side.peer, duration, transport=side.transport)
        if failure is None:
            await side.finish()
            return
        resume = session.resume
        if resume is not None and resume.resuming and not session.paired.is_set():
            if not isinstance(failure, Cancelled):  # a resume the client gave up is not a failure
                self._resume_failed(op_name, failure, None)
        if not isinstance(failure, Cancelled | Moved):
            self._metrics.error(op_name, failure.code, side.transport)
        await side.refuse(failure)

    def _relay(self, session: Session, side: Side, *, is_client: bool) -> Coroutine[Any, Any, None]:
        """The relay of one side, as a coroutine for the caller to await.

        A plain function, not a coroutine: awaiting a helper coroutine would keep one more frame
        alive for the session's whole life, and a router holds thousands of idle sessions.
        """
        config = self._config
        return relay_side(
            session,
            side,
            is_client=is_client,
            flow_control_timeout=config.flow_control_timeout,
            hooks=self._hooks,
            merge=side.merge_frames,
            min_drain_rate=config.min_drain_rate,
        )


def _ready(session: Session) -> bytes:
    """The client's encoded SessionReady (the same bytes for every operation's response type).

    The agent's id stays inside the router: users have no use for it, and an id that once granted
    something (parking standby streams) should not travel.
    """
    ready = pb.SessionReady(session_key=session.key, agent_resumes=session.agent_resumes)
    if session.defaulted is not None:
        session.defaulted.into(ready)
    return bytes(pb.ExecResponse(ready=ready).SerializeToString())
