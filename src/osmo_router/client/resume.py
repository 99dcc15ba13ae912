"""Resumable sessions on the client: after a break, dial again and go on where the agent left off.

`open_stream` starts a session the way every command does (`Transport.open`) and, on the gRPC
transport, asks for resume: a random secret goes with the init, and an agent that holds resumable
sessions answers with a Resume frame first. From then on a break (router restarted or killed, a
network cut, the replica in the path lost) is repaired by `ResumingStream._reconnect`: it opens a
new stream on the same session key, with the secret and how much it received, on any router the
address reaches, with backoff, for at most the grace (the agent's, or --resume-grace if shorter).
An agent without resume answers with something else first: the session then ends at the first
break, as before. The WebSocket transport has no resume (the old protocol cannot carry it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from osmo_router.client.backoff import attempts
from osmo_router.client.notice import say
from osmo_router.resume.stream import BREAKS, ResumableStream, SessionLost
from osmo_router.resume.window import DEFAULT_REPLAY_BYTES
from osmo_router.transport import SessionStream
from osmo_router.wire.errors import RouterError
from osmo_router.wire.protocol import pb

log = logging.getLogger(__name__)

#: Refusals a retry cannot change: the session is over (or never was this caller's).
FATAL = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
#: Longest a client holds its sent frames for an agent that has not said it resumes (an agent that
#: does answers with its first frame, one round trip after the session started).
CONFIRM_WAIT = 5.0
#: Longest a session ended on this side waits for the agent to take its Error frame.
GIVE_UP_WAIT = 2.0

Reopen = Callable[[pb.ResumeToken], Awaitable[SessionStream]]


#: What a client is told when another client of the session's owner attached to it.
TAKEN_OVER = "the session was attached from another client; detached here"
#: Longest a detach waits for the agent to acknowledge what this side sent.
DETACH_SETTLE = 2.0


class ResumingStream(ResumableStream):
    """The client's side of a resumable session."""

    def __init__(
        self,
        inner: SessionStream,
        *,
        reopen: Reopen,
        secret: str,
        grace: float,
        replay_bytes: int = DEFAULT_REPLAY_BYTES,
        notify: Callable[[str], None] | None = say,
    ) -> None:
        super().__init__(inner, replay_bytes=replay_bytes)
        self._reopen = reopen
        self._secret = secret
        self._grace = grace
        self._notify = notify
        self.confirmed = False
        self._data_lane = False  # data frames go through `_take` until the agent answered (ResumableStream)
        self._room_by_buffer = False  # `_room_now` asks whether the agent answered (until it did: see there)
        self.acking = False  # until the agent's Resume says it numbers what it sends
        #: The session's key (what `attach` takes), once the router gave it.
        self.session_key = getattr(inner, "session_key", "")
        #: Detached while the connection was down (nothing could be said to the agent), and whether what
        #: this side had sent was not all acknowledged then (it is lost: the agent never had it).
        self.detached_offline = False
        self.detached_unsent = False
        #: Whether the session's command runs on a terminal, as the agent said on an attach (None: not said).
        self.remote_tty: bool | None = None
        #: The session's first stream: what the router's ready named (its key, the task it chose).
        self.first = inner
        self.detached = False
        #: Set once the agent answered (Resume or anything else) or the session was lost.
        self.answered = asyncio.Event()
        #: The agent's Error frame when that was its first answer (it refused the session outright).
        self.refusal: pb.Error | None = None
        #: Why the session is served without resume, once it is (what `exec --detach` tells the user).
        self.not_resumable = ""
        #: Whether an agent's declined resume is warned about (`exec --detach` says why it cannot detach instead).
        self.warn_declined = True
        #: The break that came before the agent's first Resume frame, while that session is resumed.
        self._unconfirmed_cause: str | None = None

    @property
    def chosen_task(self) -> str:
        """The task of the agent the router chose for the session, when the client named none and it told."""
        return str(getattr(self.first, "chosen_task", ""))

    @property
    def agent_resumes(self) -> bool:
        """The router's ready said the session's agent recognises resumes (SessionReady.agent_resumes).

        Then a break before the agent's first Resume frame arrived is resumed too (docs/resume.md). So is
        one before the ready itself, when the session was named after its secret (`key_known`): the
        router pairs such an unconfirmed resume only with an agent that recognises resumes.
        """
        return bool(getattr(self.first, "agent_resumes", False) or getattr(self.first, "key_known", False))

    @classmethod
    def attached(cls, inner: SessionStream, resume: pb.Resume, *, secret: str, **kwargs: Any) -> ResumingStream:
        """The stream of an attach: this process has no state, so it adopts the agent's numbering.

        What it receives is numbered from the agent's `sending_from` (the agent resends what it still
        holds), and what it sends from the agent's `received`.
        """
        stream = cls(inner, secret=secret, **kwargs)
        stream.confirmed = True
        stream.acking = True
        stream.set_peer_window(resume.window_bytes)
        stream.answered.set()
        stream._data_lane = True
        stream._acks.received = stream._acks.acked = resume.sending_from
        stream.buffer.base = stream.buffer.end = resume.received
        if resume.grace_seconds:
            stream._grace = min(stream._grace, float(resume.grace_seconds))
        return stream

    async def detach(self, settle: float = DETACH_SETTLE) -> bool:
        """Leave the session running on the agent: a Detach frame, then the end of this stream.

        Waits (at most `settle` s) until the agent acknowledged what this side sent, and acknowledges
        what this side received first, so an attach resends only what nobody saw. False when the
        session cannot be detached (not resumable, or lost).
        """
        if not (self.confirmed and self.resumable) or self._lost is not None:
            return False
        try:
            async with asyncio.timeout(settle):
                await self._connected.wait()  # a resume in progress
                await self.buffer.wait_settled()
        except TimeoutError:
            log.info("detaching with input the agent has not acknowledged")
        async with self._write_lock:
            inner = self._inner
            if self._lost is not None:
                return False
            self.detached = True
            if inner is None:
                # A resume in progress (the router or the network is down): the agent holds the session
                # meanwhile, as it would a detached one; this side stops resuming and leaves it there.
                self.detached_offline = True
                self.detached_unsent = not self.buffer.settled
                self._lose(SessionLost("detached", grpc.StatusCode.OK))
                return True
            try:
                if self._acks.owed:
                    await inner.send(self._acks.frame())
                await inner.send(pb.Frame(detach=pb.Detach()))
                await inner.close()
            except BREAKS as err:
                log.info("the stream broke while detaching: %s", err)
        await _until_ended(inner, settle)
        self._lose(SessionLost("detached", grpc.StatusCode.OK))
        return True

    async def recv(self) -> pb.Frame | None:
        """As ResumableStream.recv; None once this client detached."""
        frame = None if self.detached else await super().recv()
        return None if self.detached else frame

    def _broken(self, generation: int, cause: object) -> None:
        if isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.ABORTED:
            # The router ended this stream because another client of the owner attached.
            if generation == self._generation and self._lost is None:
                self._lose(SessionLost(f"{cause.details()}; detached here", grpc.StatusCode.ABORTED))
            return
        super()._broken(generation, cause)

    def _take(self, frame: pb.Frame) -> None:
        if not self.confirmed and self.resumable and frame.WhichOneof("kind") != "resume":
            if frame.WhichOneof("kind") == "error" and not self.answered.is_set():
                self.refusal = frame.error
            self._fall_back("the agent does not resume sessions")
        super()._take(frame)
        self.answered.set()
        if not self._data_lane:  # (confirmed never unsets, resumable never sets again: open for good)
            self._data_lane = self.confirmed or not self.resumable

    def _stop(self) -> None:
        super()._stop()
        self.answered.set()  # lost or ended before the agent answered: nothing more to wait for

    def _fall_back(self, why: str, warn: bool = False) -> None:
        """No resume for this session: what was held is sent already; a break ends the session. `warn`:
        tell the user (a warning on stderr), not only the log at info."""
        (log.warning if warn and self.warn_declined else log.info)("%s: this session ends at the first break", why)
        self.not_resumable = why
        self.resumable = False
        self.buffer.ack(self.buffer.end)

    def _room_now(self, size: int) -> bool:
        # Before the agent confirmed, `_room` waits with a deadline for the answer: never at once.
        if not (self.confirmed or not self.resumable or self.agent_resumes):
            return False
        # Each of the three only ever turns true: from now on the replay buffer alone answers.
        self._room_by_buffer = True
        return super()._room_now(size)

    async def _room(self, size: int) -> None:
        # An agent known to recognise resumes answers (a Resume, or a refusal): no deadline, and no
        # falling back while a break before its answer is being resumed (what is held is resent).
        if self.confirmed or not self.resumable or self.agent_resumes:
            await super()._room(size)
            return
        try:
            async with asyncio.timeout(CONFIRM_WAIT):
                await super()._room(size)
        except TimeoutError:
            if self.resumable and self.agent_resumes and not self.confirmed:
                # Learnt while waiting: a break before the ready is being resumed by the key named after
                # the secret (PendingResumingStream.ready). Falling back now would drop what is held
                # and this message with it (no stream to send it on until the resume is done).
                await super()._room(size)
            elif not self.confirmed:
                self._fall_back(f"the agent did not answer the resume request within {CONFIRM_WAIT:g}s")

    def _on_control(self, frame: pb.Frame) -> None:
        if frame.WhichOneof("kind") == "detach":
            # The agent gave the session to another client of its owner (an attach).
            self._lose(SessionLost(TAKEN_OVER, grpc.StatusCode.ABORTED))
            return
        if frame.WhichOneof("kind") == "resume" and not self.confirmed:
            self._confirm(frame.resume)

    def _confirm(self, resume: pb.Resume) -> None:
        """The agent's first Resume frame (on the first stream, or on a resume of an unconfirmed session)."""
        self.confirmed = True
        # An answer too (a resume's Resume frame is read by `_try_resume`, never `_take`n): a watch that
        # confirms its start (PendingResumingStream.ready) waited its connect timeout for an answer already in.
        self.answered.set()
        if not resume.grace_seconds:
            # A full agent says why; the user is told (else the session she expects to resume ends
            # at the first break without a word before).
            declined = resume.declined
            self._fall_back(
                declined or "the agent holds no sessions across breaks (agent --resume-grace 0)", bool(declined)
            )
            return
        # Acknowledge from now on even if resume was given up meanwhile: the agent counts on it.
        self.acking = True
        self.set_peer_window(resume.window_bytes)
        self._grace = min(self._grace, float(resume.grace_seconds))

    def _refused(self, message: str) -> str:
        """Why a resume cannot be: the agent's or the router's refusal, said for a session never confirmed too."""
        if self._unconfirmed_cause is not None:
            return f"the session broke before it started ({self._unconfirmed_cause}): {message}"
        return f"cannot resume the session: {message}"

    async def _reconnect(self, cause: str) -> tuple[SessionStream, int]:
        if not self.confirmed:
            if not self.agent_resumes:
                # The agent may not recognise a resume and would run the command a second time.
                raise SessionLost(f"the session broke before it started: {cause}")
            # It does (its router said so): it resumes the session if it got it, or says it never did.
            self._unconfirmed_cause = self._unconfirmed_cause or cause
        self._tell(f"connection lost ({cause}); resuming the session (for up to {self._grace:g}s)")
        last = cause
        async for remaining in attempts(self._grace, jitter=True):
            token = pb.ResumeToken(
                secret=self._secret,
                resuming=True,
                received=self.taken,
                sent=self.buffer.end,
                window_bytes=self.buffer.limit,
                unconfirmed=not self.confirmed,
            )
            try:
                async with asyncio.timeout(remaining):
                    return await self._try_resume(token)
            except TimeoutError:
                break
            except RouterError as err:
                if err.code in FATAL:
                    raise SessionLost(self._refused(err.message), err.code) from None
                last = f"{err.code.name}: {err.message}"
            except grpc.aio.AioRpcError as err:
                last = f"{err.code().name}: {err.details()}"
            log.debug("resume attempt failed: %s", last)
        raise SessionLost(f"the session could not be resumed within {self._grace:g}s (last attempt: {last})")

    async def _try_resume(self, token: pb.ResumeToken) -> tuple[SessionStream, int]:
        stream = await self._reopen(token)
        first = await stream.recv()
        kind = first.WhichOneof("kind") if first is not None else None
        if kind == "resume" and first is not None:
            if not self.confirmed:
                self._confirm(first.resume)
                self._unconfirmed_cause = None
            self._tell("session resumed")
            return stream, first.resume.received
        stream.abort()
        if kind == "error" and first is not None:
            code = _status(first.error.code)
            if code in FATAL:
                raise SessionLost(self._refused(first.error.message), code)
            raise RouterError(first.error.message)
        raise RouterError("the agent answered the resume without a Resume frame")

    def _tell(self, message: str) -> None:
        log.info("%s", message)
        if self._notify is not None:
            self._notify(message)


def _status(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


async def _until_ended(inner: SessionStream, timeout: float) -> None:
    """Wait (bounded) until the router ended a call whose last frames were a Detach and our end.

    Cancelling it at once would reset the stream, and a server drops what it received and has
    not read yet: the Detach would be lost and the session taken for a broken one.
    """
    call = getattr(inner, "call", None)
    if call is None:
        return
    try:
        async with asyncio.timeout(timeout):
            await call.code()
    except (TimeoutError, *BREAKS):
        pass


__all__ = ["FATAL", "TAKEN_OVER", "ResumingStream", "give_up", "say"]


async def give_up(stream: SessionStream, why: str) -> None:
    """End a session from this side, for the agent too (a forwarded connection reset, a hung-up terminal).

    A resumable session's agent would otherwise hold it (the connection to the target, the command)
    for its resume grace, waiting for a resume that never comes: it is told with an Error frame
    first (and given GIVE_UP_WAIT to acknowledge it), then the stream is cancelled.

    The stream is not half-closed before it is cancelled (`finish` would): a call whose END_STREAM
    went out is not reset by its cancel (the server is left to end it), and a server with data
    for this client that it no longer reads (a forwarded connection reset while downloading) then
    held the session, its connection slot and the data, until the whole command ended.
    """
    if isinstance(stream, ResumableStream) and not stream.remote_final:  # (else the agent ended it already)
        with contextlib.suppress(TimeoutError, *BREAKS):
            async with asyncio.timeout(GIVE_UP_WAIT):
                await stream.send_error(grpc.StatusCode.CANCELLED, why)
                while not stream.buffer.settled and not stream.buffer.closed:
                    await stream.buffer.wait_settled()
    stream.abort()
