"""The agent's table of resumable sessions (HeldStream, agent/held.py), and what they may take together.

Every limit here is the agent's, shared by all its users' sessions, so each is split per user too: the
slots for held sessions, the replay buffers' total (`UserWindow`) and the clients' unread input
(`InputBudget`). A user past hers gets sessions without resume, or has a session end, never another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable

import grpc

from osmo_router.agent.held import HeldStream, summary_of, target_of
from osmo_router.resume.stream import BREAKS, SessionLost
from osmo_router.resume.window import DEFAULT_REPLAY_BYTES, InputBudget, SharedWindow, UserWindow
from osmo_router.transport import SessionStream
from osmo_router.wire.protocol import pb

log = logging.getLogger(__name__)

#: Default for `agent --resume-grace`: how long a session waits for its client after a break.
DEFAULT_RESUME_GRACE = 300.0
#: Default for `agent --replay-total-bytes`: the replay buffers of all sessions together.
DEFAULT_REPLAY_TOTAL = 256 * 1024 * 1024
#: Most resumable sessions one agent holds at once; more are served without resume.
MAX_HELD = 256
#: ...and one user's of them: her further sessions are served without resume, never another user's.
MAX_HELD_PER_USER = 64
#: What one user's resumable sessions may hold of their clients' frames that the commands have not
#: read yet (a client's window is 8 MiB: eight of her sessions stalled on input at once), and all
#: users' together. A session whose frame does not fit ends RESOURCE_EXHAUSTED (the client sent past
#: what the agent holds for it); before, each session held up to twice the window its client claimed
#: (129 MiB), so one user's 256 sessions could hold 32 GiB.
INPUT_USER_BYTES = 64 * 1024 * 1024
INPUT_TOTAL_BYTES = 256 * 1024 * 1024
#: What one user's held sessions' replay buffers may hold of the agent's total (--replay-total-bytes):
#: a quarter. Before, 17 sessions of one user that never acknowledged filled the whole total, and every
#: other user's session then sent one frame per acknowledgement (64 MB of output: 0.7 s -> over 120 s).
REPLAY_USER_SHARE = 4
#: How often the agent reports its held sessions while it holds any (their replay-buffer bytes change
#: without any attach or detach: the router's router_grpc_replay_buffer_bytes gauge reads them).
REPORT_EVERY = 5.0
#: How long the agent gathers changes of its held sessions before it reports them to the router.
REPORT_DELAY = 0.25
#: Longest a stopping agent waits, for all its sessions together, for their clients to take the
#: Error frame that says so (a detached session's client cannot: it finds out when it resumes).
SHUTDOWN_NOTICE = 2.0
#: What the clients of a stopping agent's sessions are told.
SHUTTING_DOWN = "the agent is shutting down; the session ended"
#: How many session keys the agent remembers having started, and having refused the unconfirmed resume
#: of before the session reached it (a few hundred KiB at most: keys are short ids).
REMEMBERED_KEYS = 4096
#: The answer to an unconfirmed resume of a session this agent never received: it is not started later.
NEVER_RECEIVED = "the agent never received the session: the command did not start and will not"
#: The same for a forwarded connection (or a forward's watch): nothing was connected in the container.
NEVER_RECEIVED_FORWARD = "the agent never received the session: the connection was not opened and will not be"
#: ...and of one it received but does not hold: it ran without resume (the agent held too many, or
#: --resume-grace 0) or has ended; either way nothing of it can be resumed.
NOT_HELD = "the agent received the session but does not hold it (it runs without resume, or it ended)"


class HeldSessions:
    """The resumable sessions of one agent, by session key."""

    def __init__(
        self,
        *,
        grace: float = DEFAULT_RESUME_GRACE,
        replay_bytes: int = DEFAULT_REPLAY_BYTES,
        total_bytes: int = DEFAULT_REPLAY_TOTAL,
    ) -> None:
        """`total_bytes`: what the replay buffers of all held sessions hold together at most."""
        self.grace = grace
        self.replay_bytes = replay_bytes
        self.window = SharedWindow(total_bytes)
        self._user_windows: dict[str, UserWindow] = {}
        #: The clients' frames the held sessions took and their handlers did not consume yet.
        self.inputs = InputBudget(INPUT_USER_BYTES, INPUT_TOTAL_BYTES)
        self._held: dict[str, HeldStream] = {}
        #: Called whenever the list changes (a session held, attached, detached or ended).
        self.on_change: Callable[[], None] = lambda: None
        #: Keys of the sessions this agent started lately, and of those whose client gave them up
        #: (an unconfirmed resume found nothing) before they reached it: those are never started.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._forgone: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def sessions(self) -> list[HeldStream]:
        """A snapshot of the held sessions."""
        return list(self._held.values())

    def report(self) -> pb.HeldSessions:
        """Every held session, as the agent reports them on its Register stream (at most MAX_HELD)."""
        return pb.HeldSessions(sessions=[held.describe() for held in list(self._held.values())[:MAX_HELD]])

    def _changed(self) -> None:
        users = {held.user for held in self._held.values()}
        for user in [u for u in self._user_windows if u not in users]:
            del self._user_windows[user]  # her buffers are closed: nothing of hers is counted any more
        self.on_change()

    def window_for(self, user: str) -> UserWindow:
        """The replay window a session of `user` takes from: her share (a quarter of the total, at least
        one session's buffer) of the agent's total, so one user's sessions never fill it for everyone."""
        window = self._user_windows.get(user)
        if window is None:
            share = max(self.replay_bytes, self.window.limit // REPLAY_USER_SHARE)
            window = self._user_windows[user] = UserWindow(share, self.window)
        return window

    def _full_for(self, user: str) -> str:
        """Why no further session of `user` can be held ("" if one can): the agent's cap or hers."""
        if len(self._held) >= MAX_HELD:
            return f"{MAX_HELD} resumable sessions"
        if sum(held.user == user for held in self._held.values()) >= MAX_HELD_PER_USER:
            return f"{MAX_HELD_PER_USER} resumable sessions of {user or 'this user'}"
        return ""

    def wants(self, open_msg: pb.SessionOpen) -> bool:
        """True if this SessionOpen asks for resume (`start` holds the session, or declines)."""
        token = target_of(open_msg).resume
        return bool(token.secret) and not token.resuming and not token.attach

    def is_resume(self, open_msg: pb.SessionOpen) -> bool:
        """True if this SessionOpen resumes or attaches to a session."""
        token = target_of(open_msg).resume
        return token.resuming or token.attach

    def begin(self, key: str) -> bool:
        """Note that a new session with this key reached the agent; False if it must not start.

        Synchronous (no await between the check and the note): an unconfirmed resume refused as never
        received, served in another task, then cannot race with the session's own SessionOpen.
        """
        if key in self._forgone:
            return False
        _remember(self._seen, key)
        return True

    async def start(self, inner: SessionStream, open_msg: pb.SessionOpen) -> SessionStream:
        """Wrap a new session's stream for resume (the plain stream when the agent holds too many)."""
        if open_msg.session_key in self._held:
            raise SessionLost("a session with this key is already held", grpc.StatusCode.ALREADY_EXISTS)
        full = self._full_for(open_msg.user)
        if self.grace <= 0 or full:
            if full:
                log.warning("holding %s already; this session ends at its first break", full)
            # A Resume with no grace declines: the client stops holding what it sends at once. It says
            # why when the agent is full (else the client blamed --resume-grace 0: e2e test_held_share).
            declined = f"the agent holds {full} already" if full else ""
            await inner.send(pb.Frame(resume=pb.Resume(fresh=True, grace_seconds=0, declined=declined)))
            return inner
        shared = self.window_for(open_msg.user)
        held = HeldStream(inner, open_msg, grace=self.grace, replay_bytes=self.replay_bytes, shared=shared)
        held.changed = self._changed
        held.input_budget, held.input_user = self.inputs, held.user
        self._held[held.key] = held
        self._changed()
        try:
            await held.open()
        except BaseException:
            self.forget(held)  # not served: it must not stay in the table (a resume would find it)
            raise
        return held

    async def attach(self, stream: SessionStream, open_msg: pb.SessionOpen) -> None:
        """Serve a resume or attach on `stream`; refuses with an Error frame what cannot be resumed."""
        held = self._held.get(open_msg.session_key)
        try:
            if held is None and target_of(open_msg).resume.unconfirmed:
                # The client's break came before it heard from the agent (docs/resume.md).
                if open_msg.session_key in self._seen:
                    raise SessionLost(NOT_HELD, grpc.StatusCode.NOT_FOUND)
                _remember(self._forgone, open_msg.session_key)
                forward = open_msg.WhichOneof("init") == "port_forward"
                raise SessionLost(NEVER_RECEIVED_FORWARD if forward else NEVER_RECEIVED, grpc.StatusCode.NOT_FOUND)
            if held is None:
                raise SessionLost(
                    "the agent holds no such session (it ended, its resume grace passed, or the agent restarted)",
                    grpc.StatusCode.NOT_FOUND,
                )
            await held.attach(stream, open_msg)
        except SessionLost as lost:
            log.info("resume of %s refused: %s", open_msg.session_key[:8], lost.message)
            await stream.send_error(lost.code, lost.message)
            await stream.send(pb.Frame(half_close=pb.HalfClose()))
            await stream.close()

    async def finish(self, stream: SessionStream) -> None:
        """After the handler returned: let the client acknowledge the last frames, then forget the session."""
        if not isinstance(stream, HeldStream):
            return
        stream.finishing = True
        try:
            await stream.finish(self.grace)
        finally:
            if self._held.pop(stream.key, None) is not None:
                self._changed()

    async def end_all(self, timeout: float = SHUTDOWN_NOTICE) -> None:
        """The agent stops: tell every held session's client so (an Error frame), waiting at most
        `timeout` s in all for them to take it. Without it a client took the stop for a break and
        tried to resume, for its whole grace, a session that went with the agent."""

        async def tell(held: HeldStream) -> None:
            with contextlib.suppress(SessionLost, *BREAKS):
                await held.send_error(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                await held.finish(timeout)

        sessions = self.sessions()
        if sessions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(tell(held) for held in sessions), return_exceptions=True)

    def forget(self, stream: SessionStream) -> None:
        """Drop a session whose handler failed."""
        if isinstance(stream, HeldStream):
            if self._held.pop(stream.key, None) is not None:
                self._changed()
            stream.abort()


def _remember(keys: OrderedDict[str, None], key: str) -> None:
    """Add `key` to a bounded record of keys, forgetting the oldest past REMEMBERED_KEYS."""
    keys[key] = None
    keys.move_to_end(key)
    while len(keys) > REMEMBERED_KEYS:
        keys.popitem(last=False)


__all__ = ["DEFAULT_RESUME_GRACE", "REPORT_DELAY", "HeldSessions", "HeldStream", "summary_of", "target_of"]
