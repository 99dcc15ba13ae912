"""How a client opens a resumable session: `open_stream` (the init with a resume secret, then the
router's ready; `reopener` opens it again for a resume), and the start/wait form of it for sessions
that send before the agent joined.

A forwarded TCP connection sends its first bytes with the init and waits for the router's ready
only when it reads (client/forward_tcp.py): that saves a round trip per connection.
`start_resumable` keeps that: it sends the init (with a resume secret), returns a
`PendingResumingStream` at once, and the frames sent before the ready are numbered and held like
any other. `PendingResumingStream.ready` waits for the router's ready (it names the session key a
resume presents) and only then starts taking the agent's frames. A break after it is repaired like
an exec's (client/resume.py); so is a break before it: the session is named after its resume secret
(ResumeToken.key_from_secret), so the client knows its key without the ready and resumes it as one
the agent has not confirmed (the agent resumes it, or says it never received it: docs/resume.md).

The same two steps back to back (`open_resumable`) serve the port-forward's watch and UDP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable

from osmo_router.client.config import ClientConfig
from osmo_router.client.resume import Reopen, ResumingStream, say
from osmo_router.client.session import BrokeBeforeReady, wait_ready
from osmo_router.resume.window import DEFAULT_REPLAY_BYTES
from osmo_router.transport import GRPC, SessionInit, SessionStream, Transport
from osmo_router.wire.errors import from_status_number
from osmo_router.wire.keys import key_of_secret
from osmo_router.wire.protocol import pb
from osmo_router.wire.streams import FrameStream

#: Sends an init and returns the started (not yet ready) stream: `client.session.start_session`.
Starter = Callable[[SessionInit], Awaitable[FrameStream]]
#: Where a session says it lost its connection and resumed (None: only the log).
Notify = Callable[[str], None] | None


def named_after_secret(stream: FrameStream, secret: str) -> None:
    """A stream that broke before its ready: give it the key its session was asked to be named by.

    The router may have started the session: it is resumed by that key as one that broke before the
    agent's first Resume frame (unconfirmed: the router pairs that only with an agent that recognises
    resumes, which resumes it or says it never received it).
    """
    stream.session_key = key_of_secret(secret)
    stream.key_known = True


class PendingResumingStream(ResumingStream):
    """A `ResumingStream` whose first stream is started but whose ready has not arrived yet."""

    first: FrameStream  # (start_resumable's: a gRPC call's stream)
    #: The session is named after the resume secret (key_from_secret): a break before the ready resumes it.
    named_by_secret = False

    async def ready(self, config: ClientConfig, *, confirm: bool = False) -> None:
        """Wait for the router's ready, then take the agent's frames; raises RouterError on refusal.

        `confirm`: also wait (bounded) for the agent's first frame, which says whether the session
        resumes: a break before it cannot be resumed (an agent without resume would take a
        resume for a new session). An Error frame first is a refusal: raised here.
        """
        try:
            await wait_ready(config, self.first)
        except BrokeBeforeReady:
            if not self.named_by_secret:
                self.abort()
                raise
            named_after_secret(self.first, self._secret)  # resumed as open_stream's is
        except BaseException:
            self.abort()
            raise
        if not self.first.session_key:
            self.resumable = False  # a router that names no key: nothing to resume with
            self.answered.set()
        self.start()
        if confirm:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.connect_timeout):
                    await self.answered.wait()
            if (refusal := self.refusal) is not None:  # refused before it was held (agent/forward.py)
                self.abort()
                raise from_status_number(refusal.code, refusal.message)


async def start_resumable(
    transport: Transport,
    config: ClientConfig,
    operation: int,
    init: SessionInit,
    start: Starter,
    *,
    notify: Notify = None,
    replay_bytes: int = DEFAULT_REPLAY_BYTES,
) -> SessionStream:
    """Send `init` with `start` and return the stream without waiting for the agent (then `ready_resumable`).

    Without resume (see `can_resume`) this is `start(init)` itself: a plain stream.
    """
    if not can_resume(transport, config):
        return await start(init)
    secret = secrets.token_hex(16)
    named = not init.target.session_key
    # The window announced is the one kept: the agent's overrun check and ack pace follow it.
    init.target.resume.CopyFrom(pb.ResumeToken(secret=secret, window_bytes=replay_bytes, key_from_secret=named))
    first = await start(init)
    # The key is read from the first stream when the session resumes: the ready names it, or a break
    # before the ready sets it (PendingResumingStream.ready).
    reopen = reopener(transport, operation, init, lambda: first)
    stream = PendingResumingStream(
        first, reopen=reopen, secret=secret, grace=config.resume_grace, notify=notify, replay_bytes=replay_bytes
    )
    stream.named_by_secret = named
    return stream


async def ready_resumable(config: ClientConfig, stream: SessionStream, *, confirm: bool = False) -> None:
    """Wait until the agent of a started stream joined (either kind); raises RouterError on refusal.

    `confirm`: for a resumable one, also until the agent said it resumes (PendingResumingStream.ready).
    """
    if isinstance(stream, PendingResumingStream):
        await stream.ready(config, confirm=confirm)
    elif isinstance(stream, FrameStream):
        await wait_ready(config, stream)


async def open_resumable(
    transport: Transport,
    config: ClientConfig,
    operation: int,
    init: SessionInit,
    start: Starter,
    *,
    notify: Notify = None,
) -> SessionStream:
    """`start_resumable` and `ready_resumable` in one: a session whose agent has joined and said it resumes."""
    stream = await start_resumable(transport, config, operation, init, start, notify=notify)
    await ready_resumable(config, stream, confirm=True)
    return stream


def can_resume(transport: Transport, config: ClientConfig) -> bool:
    """True when sessions over `transport` ask for resume (gRPC, and --resume-grace above 0)."""
    return transport.name == GRPC and config.resume_grace > 0


def reopener(transport: Transport, operation: int, init: SessionInit, first: Callable[[], object]) -> Reopen:
    """How a session opens its stream again: `init` with a resume token and what the router's ready named on
    the session's `first` stream (read when it resumes): its key (else the one `init` brought, an attach's),
    and, when the client named no task and the router chose one among several agents, that task: the
    router's choice may differ by then (agents re-register in any order after a router restart) and the
    other agents hold nothing.
    """

    async def reopen(token: pb.ResumeToken) -> SessionStream:
        stream = first()
        again = type(init).FromString(init.SerializeToString())
        again.target.session_key = getattr(stream, "session_key", "") or init.target.session_key
        if not again.target.task:
            again.target.task = getattr(stream, "chosen_task", "")
        again.target.resume.CopyFrom(token)
        return await transport.open(operation, again)

    return reopen


async def open_stream(
    transport: Transport, config: ClientConfig, operation: int, init: SessionInit, *, notify: bool = True
) -> SessionStream:
    """`transport.open`, resumable when the transport and the agent can (client/resume.py's docstring)."""
    if not can_resume(transport, config):
        return await transport.open(operation, init)
    secret = secrets.token_hex(16)
    # Named after the secret (key_from_secret): the key is known here before the router's ready says it.
    init.target.resume.CopyFrom(
        pb.ResumeToken(secret=secret, window_bytes=DEFAULT_REPLAY_BYTES, key_from_secret=not init.target.session_key)
    )
    try:
        inner: SessionStream = await transport.open(operation, init)
    except BrokeBeforeReady as err:
        if init.target.session_key:
            raise
        named_after_secret(err.stream, secret)
        inner = err.stream
    key = getattr(inner, "session_key", "")
    if not key:
        return inner
    stream = ResumingStream(
        inner,
        reopen=reopener(transport, operation, init, lambda: inner),
        secret=secret,
        grace=config.resume_grace,
        notify=say if notify else None,
    )
    stream.start()
    return stream


__all__ = [
    "PendingResumingStream",
    "can_resume",
    "named_after_secret",
    "open_resumable",
    "open_stream",
    "ready_resumable",
    "reopener",
    "start_resumable",
]
