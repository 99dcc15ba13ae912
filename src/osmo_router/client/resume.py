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
import logging
import random
import secrets
import sys
from collections.abc import Awaitable, Callable

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.resume.stream import ResumableStream, SessionLost
from osmo_router.resume.window import DEFAULT_REPLAY_BYTES, ack_every
from osmo_router.transport import GRPC, SessionInit, SessionStream, Transport
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
#: First and longest wait between two resume attempts. The first is short: the first attempt often
#: meets the old connection before gRPC has noticed it is gone ("Stream removed"), and the second
#: one, on a new connection, succeeds.
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 2.0

Reopen = Callable[[pb.ResumeToken], Awaitable[SessionStream]]


def say(message: str) -> None:
    """One line on stderr (at the start of a line, raw terminal or not)."""
    sys.stderr.write(f"\r\nosmo-net-client: {message}\r\n" if sys.stderr.isatty() else f"osmo-net-client: {message}\n")
    sys.stderr.flush()


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

    def _take(self, frame: pb.Frame) -> None:
        if not self.confirmed and self.resumable and frame.WhichOneof("kind") != "resume":
            # An agent without resume: what was held is sent already; no numbering from here on.
            self.resumable = False
            self.buffer.ack(self.buffer.end)
        super()._take(frame)

    def _on_control(self, frame: pb.Frame) -> None:
        if frame.WhichOneof("kind") == "resume" and not self.confirmed:
            self.confirmed = True
            self.ack_every = ack_every(frame.resume.window)
            if frame.resume.grace_seconds:
                self._grace = min(self._grace, float(frame.resume.grace_seconds))

    async def _reconnect(self, cause: str) -> tuple[SessionStream, int]:
        if not self.confirmed:
            raise SessionLost(f"the session broke before it started: {cause}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        self._tell(f"connection lost ({cause}); resuming the session (for up to {self._grace:g}s)")
        backoff, last = BACKOFF_INITIAL, cause
        while (remaining := deadline - loop.time()) > 0:
            token = pb.ResumeToken(
                secret=self._secret, resuming=True, received=self.taken, sent=self.buffer.end, window=self.buffer.limit
            )
            try:
                async with asyncio.timeout(remaining):
                    return await self._try_resume(token)
            except TimeoutError:
                break
            except RouterError as err:
                if err.code in FATAL:
                    raise SessionLost(f"cannot resume the session: {err.message}", err.code) from None
                last = f"{err.code.name}: {err.message}"
            except grpc.aio.AioRpcError as err:
                last = f"{err.code().name}: {err.details()}"
            log.debug("resume attempt failed: %s", last)
            # Jittered: the clients of a restarted router do not all come back in the same instant.
            await asyncio.sleep(min(backoff * (0.5 + random.random() / 2), max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, BACKOFF_MAX)
        raise SessionLost(f"the session could not be resumed within {self._grace:g}s (last attempt: {last})")

    async def _try_resume(self, token: pb.ResumeToken) -> tuple[SessionStream, int]:
        stream = await self._reopen(token)
        first = await stream.recv()
        kind = first.WhichOneof("kind") if first is not None else None
        if kind == "resume" and first is not None:
            self._tell("session resumed")
            return stream, first.resume.received
        stream.abort()
        if kind == "error" and first is not None:
            code = _status(first.error.code)
            if code in FATAL:
                raise SessionLost(f"cannot resume the session: {first.error.message}", code)
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


async def open_stream(
    transport: Transport, config: ClientConfig, operation: int, init: SessionInit, *, notify: bool = True
) -> SessionStream:
    """`transport.open`, resumable when the transport and the agent can (see the module docstring)."""
    if transport.name != GRPC or config.resume_grace <= 0:
        return await transport.open(operation, init)
    secret = secrets.token_hex(16)
    init.target.resume.CopyFrom(pb.ResumeToken(secret=secret, window=DEFAULT_REPLAY_BYTES))
    inner = await transport.open(operation, init)
    key = getattr(inner, "session_key", "")
    if not key:
        return inner

    async def reopen(token: pb.ResumeToken) -> SessionStream:
        again = type(init).FromString(init.SerializeToString())
        again.target.session_key = key
        again.target.resume.CopyFrom(token)
        return await transport.open(operation, again)

    stream = ResumingStream(
        inner, reopen=reopen, secret=secret, grace=config.resume_grace, notify=say if notify else None
    )
    stream.start()
    return stream


__all__ = ["FATAL", "ResumingStream", "open_stream", "say"]
