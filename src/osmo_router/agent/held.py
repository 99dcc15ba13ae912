"""The agent's resumable sessions: kept across breaks for a grace period, re-attached by their owner.

A client that starts a session with a `ResumeToken` gets a `HeldStream`: the handler (exec,
port-forward, rsync) runs against it and never sees a break. When the stream under it breaks,
the session waits up to `grace` seconds for its client to come back: a new Connect stream whose
SessionOpen carries the same session key with `resuming` (and the secret) or `attach` (another
process of the same user). Anyone else is refused; after the grace the session ends (the exec
process is hung up, as when a client goes away today).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shlex
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from osmo_router.resume.stream import BREAKS, ResumableStream, SessionLost
from osmo_router.resume.window import SharedWindow
from osmo_router.transport import SessionStream
from osmo_router.wire.ops import BY_OPEN_FIELD
from osmo_router.wire.protocol import pb

log = logging.getLogger(__name__)

#: What a client that was attached hears when it tries to resume after another client attached.
ATTACHED_ELSEWHERE = "the session was attached from another client"
#: Longest the agent tries to tell the attached client that another one takes the session over.
TAKEOVER_NOTICE = 1.0


def target_of(open_msg: pb.SessionOpen) -> pb.SessionTarget:
    """The SessionTarget inside a SessionOpen's init (an empty one when there is no init)."""
    kind = open_msg.WhichOneof("init")
    if kind is None:
        return pb.SessionTarget()
    target: pb.SessionTarget = getattr(open_msg, kind).target
    return target


def summary_of(open_msg: pb.SessionOpen) -> str:
    """What a session runs, for `osmo-net-client sessions`."""
    kind = open_msg.WhichOneof("init")
    if kind == "exec":
        return shlex.join(open_msg.exec.command) or "(shell)"  # quoted: `sh -c 'a; b'` reads as it ran
    if kind == "port_forward":
        proto = "udp" if open_msg.port_forward.protocol == pb.PROTOCOL_UDP else "tcp"
        if proto == "tcp" and open_msg.port_forward.remote_port == 0:
            return "port-forward (its watch)"  # the forward's liveness session: no port behind it
        return f"port {open_msg.port_forward.remote_port}/{proto}"
    return kind or ""


@dataclass(eq=False)
class Attach:
    """A client's new stream for a held session, handed to the session's resume."""

    stream: SessionStream
    token: pb.ResumeToken
    released: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class HeldStream(ResumableStream):
    """The agent's side of a resumable session."""

    def __init__(
        self,
        inner: SessionStream,
        open_msg: pb.SessionOpen,
        *,
        grace: float,
        replay_bytes: int,
        shared: SharedWindow | None = None,
    ) -> None:
        super().__init__(inner, replay_bytes=replay_bytes, shared=shared)
        token = target_of(open_msg).resume
        self.key = open_msg.session_key
        self.user = open_msg.user
        self.secret = token.secret
        self.grace = grace
        self.operation = open_msg.WhichOneof("init") or ""
        self.summary = summary_of(open_msg)
        self.tty = self.operation == "exec" and open_msg.exec.tty
        self.started = time.time()
        self.detached_at = 0.0
        self.finishing = False
        #: Called when the session is attached or detached (HeldSessions reports the list to the router).
        self.changed: Callable[[], None] = lambda: None
        self._former_secrets: deque[str] = deque(maxlen=16)
        self._attaches: asyncio.Queue[Attach] = asyncio.Queue(maxsize=1)
        self._current: Attach | None = None
        self.set_peer_window(token.window_bytes)

    async def open(self) -> None:
        """Tell the client this session is resumable (the first frame of a new session)."""
        inner = self._inner
        if inner is not None:
            resume = pb.Resume(
                received=0,
                sending_from=0,
                grace_seconds=max(1, math.ceil(self.grace)),
                fresh=True,
                window_bytes=self.buffer.limit,
                tty=self.tty,
            )
            try:
                await inner.send(pb.Frame(resume=resume))
            except BREAKS as err:
                # The stream broke before the client heard of the agent (its link cut at the start): the
                # session is held all the same, for a resume (docs/resume.md, "A break before the agent
                # confirmed"). It used to fail here and stay in the table with no handler: a resume then
                # "resumed" a session nothing ran, and the client waited forever.
                self.start()
                self._broken(self._generation, err)
                return
        self.start()

    def _ended_cleanly(self) -> bool:
        return self.finishing and self.buffer.settled

    def _on_control(self, frame: pb.Frame) -> None:
        if frame.WhichOneof("kind") == "detach":
            log.info("session %s: client detached", self.key[:8], extra={"fields": {"event": "detach"}})

    def check(self, open_msg: pb.SessionOpen) -> None:
        """Refuse (SessionLost with the code to report) a resume or attach that is not this session's owner's."""
        token = target_of(open_msg).resume
        if open_msg.user != self.user:
            raise SessionLost("the session belongs to another user", grpc.StatusCode.PERMISSION_DENIED)
        if not token.attach and token.secret in self._former_secrets:
            raise SessionLost(ATTACHED_ELSEWHERE, grpc.StatusCode.PERMISSION_DENIED)
        if not token.attach and token.secret != self.secret:
            raise SessionLost("wrong resume secret for this session", grpc.StatusCode.PERMISSION_DENIED)
        if open_msg.WhichOneof("init") != self.operation:
            raise SessionLost(f"the session is a {self.operation} session", grpc.StatusCode.INVALID_ARGUMENT)
        if not token.attach and not self.buffer.holds(token.received):
            raise SessionLost(
                f"cannot resume from {token.received}: the agent holds {self.buffer.first_held()}-{self.buffer.end}",
                grpc.StatusCode.DATA_LOSS,
            )

    async def attach(self, stream: SessionStream, open_msg: pb.SessionOpen) -> None:
        """Hand a client's new stream to this session; returns once the session no longer uses it."""
        self.check(open_msg)
        attach = Attach(stream, target_of(open_msg).resume)
        if attach.token.attach and attach.token.secret:
            # From now on only the attaching client may resume; the one it replaces is told so.
            self._former_secrets.append(self.secret)
            self.secret = attach.token.secret
        while self._attaches.full():  # an older attach not taken yet loses to this one
            self._attaches.get_nowait().released.set_result(None)
        self._attaches.put_nowait(attach)
        if self._inner is not None:
            if attach.token.attach:
                await self._tell_taken_over()
            self._broken(self._generation, "superseded by the client's new stream")
        await attach.released

    @property
    def attached(self) -> bool:
        """True while a client is connected (or the session has not been detached yet)."""
        return self.detached_at == 0.0

    def describe(self) -> pb.HeldSession:
        """The session as `osmo-net-client sessions` lists it (the router fills in the task)."""
        op = BY_OPEN_FIELD.get(self.operation)
        return pb.HeldSession(
            session_key=self.key,
            user=self.user,
            operation=pb.Operation.ValueType(op.value if op is not None else 0),
            summary=self.summary[:200],
            attached=self.attached,
            started_unix=int(self.started),
            detached_unix=int(self.detached_at),
            replay_bytes=self.buffer.bytes,
        )

    async def _tell_taken_over(self) -> None:
        """Best effort: a Detach frame to the attached client (it then exits instead of resuming)."""
        inner = self._inner
        with contextlib.suppress(TimeoutError, *BREAKS):
            async with asyncio.timeout(TAKEOVER_NOTICE), self._write_lock:
                if inner is not None and self._inner is inner:
                    await inner.send(pb.Frame(detach=pb.Detach()))

    async def _reconnect(self, cause: str) -> tuple[SessionStream, int]:
        if self._current is not None and not self._current.released.done():
            self._current.released.set_result(None)
        self._current = None
        if self.finishing and self.buffer.settled:
            raise SessionLost("the session ended", grpc.StatusCode.OK)
        if self.remote_final:  # the client ended it with an Error frame (a forwarded connection reset)
            raise SessionLost("the client ended the session", grpc.StatusCode.CANCELLED)
        self.detached_at = time.time()
        self.changed()
        log.info(
            "session %s: client gone (%s); holding it for %gs",
            self.key[:8],
            cause,
            self.grace,
            extra={"fields": {"event": "held"}},
        )
        try:
            async with asyncio.timeout(self.grace):
                attach = await self._attaches.get()
        except TimeoutError:
            raise SessionLost(f"the client did not come back within the resume grace ({self.grace:g}s)") from None
        token = attach.token
        sending_from = self.buffer.first_held() if token.attach else token.received
        resume = pb.Resume(
            received=self.taken,
            sending_from=sending_from,
            grace_seconds=max(1, math.ceil(self.grace)),
            sent=self.buffer.end,
            window_bytes=self.buffer.limit,
            tty=self.tty,
        )
        self.set_peer_window(token.window_bytes)
        try:
            await attach.stream.send(pb.Frame(resume=resume))
        except Exception as err:
            attach.released.set_result(None)
            raise SessionLost(f"the resumed stream broke at once: {err}") from None
        self._current = attach
        self.detached_at = 0.0
        self.changed()
        log.info(
            "session %s: %s from %d",
            self.key[:8],
            "attached" if token.attach else "resumed",
            sending_from,
            extra={"fields": {"event": "attach" if token.attach else "resume"}},
        )
        return attach.stream, sending_from

    def _stop(self) -> None:
        super()._stop()
        if self._current is not None and not self._current.released.done():
            self._current.released.set_result(None)
