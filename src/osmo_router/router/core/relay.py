"""The relay: moves encoded frames between the two streams of a session, unchanged.

Each side of a session runs `relay_side` in its own RPC handler: a reader task feeds what its
stream receives into the other side's queue, and the handler writes what the other side queued
onto its own stream. Frames are forwarded as the bytes they arrived as; only the first byte is
checked, so a peer cannot smuggle an init or a foreign field into the other stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, Protocol

from osmo_router.router.core import audit
from osmo_router.router.core.coalesce import coalesce
from osmo_router.router.core.flow_control import FlowQueue, WriteInterrupted, WriteWatchdog
from osmo_router.router.core.sessions import Session
from osmo_router.wire.codec import (
    DATA_TAG,
    ENCODED_HALF_CLOSE,
    ENCODED_SESSION_END,
    FRAME_TAG,
    MAX_EXIT_STATUS_MESSAGE,
    exit_status_text,
    is_exit_status_frame,
)
from osmo_router.wire.errors import Cancelled, InvalidArgument, ResourceExhausted, RouterError, Unavailable
from osmo_router.wire.protocol import CLOSE_GRACE, pb

#: A client's Detach frame (exec --detach, the escape key), encoded: compared, never decoded.
ENCODED_DETACH = pb.ExecRequest(frame=pb.Frame(detach=pb.Detach())).SerializeToString()


class Endpoint(Protocol):
    """One stream of a session, seen as encoded messages."""

    async def read(self) -> bytes | None:
        """The next encoded message, or None at the end of the stream."""
        ...

    async def write(self, message: bytes) -> None:
        """Send one encoded message."""
        ...


class RelayHooks(Protocol):
    """What the relay reports: flow-control timeouts, a side's end (its counted bytes: the relay adds each
    message's size to the session's bytes_to_agent / bytes_to_client itself, no call per message)."""

    def flow_control_timeout(self, session: Session) -> None:
        """A reader stopped reading for longer than the flow-control timeout."""
        ...

    def settle(self, session: Session) -> None:
        """One side of the session ended: fold its counts into shared totals."""
        ...

    def agent_answered(self, session: Session, message: bytes) -> None:
        """The agent's first frame of a session whose client asked for resume (core/resumes.py)."""
        ...


async def relay_side(
    session: Session,
    endpoint: Endpoint,
    *,
    is_client: bool,
    flow_control_timeout: float,
    hooks: RelayHooks,
    merge: bool = True,
    min_drain_rate: float = 0.0,
) -> None:
    """Relay one side of a paired session until it ends; raises the session's RouterError on failure.

    With `merge`, queued data frames are written to this side as one message; a side whose
    protocol gives each message a meaning of its own (the old WebSocket protocol) passes False.
    A side that stops reading for `flow_control_timeout`, or that had data waiting for that long in
    all (waits for data between writes not counted) and took less than `min_drain_rate` bytes a
    second of it, ends the session.
    """
    inbound, outbound = (session.to_agent, session.to_client) if is_client else (session.to_client, session.to_agent)
    use_budgets = getattr(endpoint, "use_budgets", None)
    if use_budgets is not None:
        # The stream (native server) takes up its full window now, and what it holds unread and the
        # window its sender may still fill count in the budgets its queue counts in: the per-user and
        # total budgets bound the streams too. (A session relayed for another replica has none.)
        use_budgets(inbound.budgets)
    reader = asyncio.create_task(_read_into(session, endpoint, inbound, hooks, not is_client))
    watchdog = WriteWatchdog(flow_control_timeout, min_drain_rate)
    try:
        if is_client:
            await _write_from(session, endpoint, outbound, watchdog, hooks, merge)
            await _end_client(endpoint, reader, flow_control_timeout)
        else:
            # This handler writes the client's frames to the agent; once the agent's stream is
            # over (or broke), whatever the client still sends has no reader: the reader's end
            # drops the queue and interrupts a write in progress. No third task per session.
            reader.add_done_callback(functools.partial(_stop_writing, outbound, watchdog))
            with contextlib.suppress(WriteInterrupted):
                await _write_from(session, endpoint, outbound, watchdog, hooks, merge)
            if reader.done():
                reader.result()
    finally:
        hooks.settle(session)
        if reader.done():
            with contextlib.suppress(BaseException):
                reader.result()
        else:
            # Cancelling a task blocked in context.read() breaks the RPC's status ("Internal error
            # from Core"); the read ends by itself once this handler returns and gRPC closes the call.
            reader.add_done_callback(_retrieve)


async def _end_client(endpoint: Endpoint, reader: asyncio.Task[None], timeout: float) -> None:
    """Tell the client the session is over and give it a moment to end its side first."""
    try:
        async with asyncio.timeout(timeout):
            await endpoint.write(ENCODED_SESSION_END)
    except TimeoutError:
        return
    with contextlib.suppress(TimeoutError, Exception):
        async with asyncio.timeout(CLOSE_GRACE):
            await asyncio.shield(reader)


def _stall_reason(watchdog: WriteWatchdog) -> str:
    if watchdog.slow:
        rate = watchdog.min_bytes / watchdog.timeout
        return (
            f"peer reads too slowly: under {rate / 1024:g} KiB/s for {watchdog.timeout:g}s "
            "with data waiting (minimum drain rate)"
        )
    return f"peer stopped reading for {watchdog.timeout:g}s (flow-control timeout)"


def _stop_writing(queue: FlowQueue, watchdog: WriteWatchdog, _reader: object) -> None:
    queue.end(drop=True)
    watchdog.interrupt()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _read_into(session: Session, endpoint: Endpoint, queue: FlowQueue, hooks: RelayHooks, is_agent: bool) -> None:
    # No closures or per-side callables here: a router holds two of these per session.
    direction = "agent_to_client" if is_agent else "client_to_agent"
    to_agent = not is_agent
    client_half_closed = False
    # The agent's first frame tells whether a session that asked for resume got it (core/resumes.py).
    answer = is_agent and session.resume is not None
    # Whether more has arrived behind a message: only a message with nothing behind it may be
    # sent on directly (FlowQueue.set_sink); a burst is queued so the writer can merge it.
    more_queued = getattr(endpoint, "more_queued", None)
    set_listener = getattr(endpoint, "set_listener", None)
    passing = _Passing(session, queue, hooks, direction) if set_listener is not None else None
    if set_listener is not None:
        set_listener(passing)
    set_passthrough = getattr(endpoint, "set_passthrough", None)
    if set_passthrough is not None and passing is not None:
        set_passthrough(passing.through)
    try:
        while True:
            if passing is not None:
                passing.idle = not answer  # (the agent's answer is looked at here, never passed)
            message = await endpoint.read()
            if passing is not None:
                passing.idle = False
            if message is None:
                break
            if not message or message[0] != FRAME_TAG:
                raise InvalidArgument("expected a frame after the init")
            if answer:
                answer = False
                hooks.agent_answered(session, message)
            # Counted on the session (folded into the metrics by hooks.settle); its activity too
            # (Session.last_activity).
            if to_agent:
                session.bytes_to_agent += len(message)
            else:
                session.bytes_to_client += len(message)
            if len(message) <= MAX_EXIT_STATUS_MESSAGE:
                # Control frames are small: bulk data never pays for these checks.
                if message == ENCODED_HALF_CLOSE:
                    if is_agent:
                        session.agent_half_closed = True
                    else:
                        client_half_closed = True
                elif is_agent and is_exit_status_frame(message):
                    session.exit_status = exit_status_text(message) or session.exit_status
                elif message == ENCODED_DETACH and not is_agent:
                    audit.attach_event("session detach", session)
            await queue.put(message, more_queued is None or more_queued())
        if not is_agent:
            if not client_half_closed and not session.agent_half_closed:
                # The client's stream ended with neither side done: the client went away (killed,
                # cancelled), and the agent must not take it for a clean end of its input.
                raise Cancelled("the client went away")
            if not client_half_closed and session.resume is None:
                # The agent finished and the client's stream ended without its half-close: tell the
                # agent. Never otherwise: the client's own half-close went through already, and a
                # resumable session's frames are numbered end to end (an added one shifted the agent's
                # count, and after a resume the client's next frame, a Ctrl-C, was dropped as seen).
                await queue.put(ENCODED_HALF_CLOSE)
        elif session.agent_half_closed:
            # The agent ending its stream after a half-close ends the session once its output
            # is delivered.
            queue.end()
        else:
            # An end without a half-close is a broken agent (killed, connection lost).
            raise Unavailable("the agent disconnected")
    except RouterError as err:
        # Whatever ended this stream (a broken transport, a malformed frame) ends the session.
        session.fail(err)
        raise
    finally:
        if set_listener is not None:
            set_listener(None)
        if set_passthrough is not None:
            set_passthrough(None)


class _Passing:
    """The reading side's hand-over of a message to the other side's writer as it arrives (the
    stream's listener, Endpoint.set_listener): while the reader waits for its next message, a data
    frame the writer's sink sends at once (FlowQueue.offer) does what a read of it would have done,
    without waking the reader (issue 18). Control frames (half-close, exit status, detach), a
    malformed message and anything the sink cannot send now are left to the reader."""

    __slots__ = ("hooks", "idle", "queue", "session", "to_agent")

    def __init__(self, session: Session, queue: FlowQueue, hooks: RelayHooks, direction: str) -> None:
        self.session = session
        self.queue = queue
        self.hooks = hooks
        self.to_agent = direction == "client_to_agent"
        #: True while the reader waits in `read`: only then may a message pass it (order is kept).
        self.idle = False

    def __call__(self, message: bytes) -> bool:
        if not self.idle or not message or message[0] != FRAME_TAG:
            return False
        if (
            len(message) <= MAX_EXIT_STATUS_MESSAGE
            and (len(message) < 3 or message[2] != DATA_TAG)
            and _is_control(message)
        ):
            return False
        if not self.queue.offer(message):
            return False
        if self.to_agent:  # counted on the session, as a read of it is (_read_into)
            self.session.bytes_to_agent += len(message)
        else:
            self.session.bytes_to_client += len(message)
        return True

    def native_lane(self) -> tuple[FlowQueue, Any, Callable[[memoryview], bool]] | None:
        """(the queue, its sink, the sink's framed writer) for the router's native front (h2/front.py),
        which then does what `through` does from C; None without a framed writer."""
        sink = self.queue.sink
        framed = getattr(sink, "framed", None)
        return None if framed is None else (self.queue, sink, framed)

    def passed_natively(self, size: int) -> None:
        """The native front passed a message of `size` bytes on as `through` would: counted as it counts."""
        self.queue.passed_natively(size)
        if self.to_agent:
            self.session.bytes_to_agent += size
        else:
            self.session.bytes_to_client += size

    def through(self, framed: memoryview) -> bool:
        """The same for a message as it arrived, behind its 5-byte gRPC prefix (Endpoint.set_passthrough):
        sent on as it is, with no parsing or copy of it."""
        if not self.idle or framed[5] != FRAME_TAG:
            return False
        size = len(framed) - 5
        # A small frame whose first field is data is no control frame (their first keys differ: a byte
        # check, no copy of the message; see _is_control).
        if (
            size <= MAX_EXIT_STATUS_MESSAGE
            and (size < 3 or framed[7] != DATA_TAG)
            and _is_control(framed[5:].tobytes())
        ):
            return False
        if not self.queue.pass_through(framed, size):
            return False
        if self.to_agent:  # counted on the session, as a read of it is (_read_into)
            self.session.bytes_to_agent += size
        else:
            self.session.bytes_to_client += size
        return True


def _is_control(message: bytes) -> bool:
    """Whether a small frame message is one the reader must look at: a half-close, a detach, an exit status.

    Each of those has a one-byte length, so its third byte is the Frame's first key: never DATA_TAG
    (the callers skip this for a message whose third byte is)."""
    return message == ENCODED_HALF_CLOSE or message == ENCODED_DETACH or is_exit_status_frame(message)


async def _write_from(
    session: Session,
    endpoint: Endpoint,
    queue: FlowQueue,
    watchdog: WriteWatchdog,
    hooks: RelayHooks,
    merge: bool,
) -> None:
    # Per message: at most one merge and one write; the watchdog bounds each write without a
    # timer per message (see WriteWatchdog).
    write = endpoint.write
    try_write = getattr(endpoint, "try_write", None)
    if try_write is not None:
        # While this writer waits for data, the other side's reader sends what it reads straight
        # out (when the transport takes it at once) instead of waking this task for each message.
        queue.set_sink(_DirectWrite(try_write, watchdog, getattr(endpoint, "try_write_framed", None)))
    try:
        while (message := queue.poll()) is not None:
            if not message:  # nothing queued yet
                watchdog.idle()
                await queue.readable()
                continue
            if merge and len(queue):
                message = coalesce(message, queue)
            try:
                with watchdog:
                    await write(message)
                watchdog.moved += len(message)
            except TimeoutError:
                hooks.flow_control_timeout(session)
                err = ResourceExhausted(_stall_reason(watchdog))
                session.fail(err)
                raise err from None
    finally:
        queue.set_sink(None)
        watchdog.close()


class _DirectWrite:
    """A writer's direct hand-over (FlowQueue.set_sink): a message sent at once counts as written. A
    message still behind its gRPC prefix goes to `framed` (the endpoint's try_write_framed, or None),
    called by FlowQueue.pass_through itself, which adds its size to `watchdog.moved`."""

    __slots__ = ("_try_write", "framed", "watchdog")

    def __init__(
        self,
        try_write: Callable[[bytes], bool],
        watchdog: WriteWatchdog,
        try_write_framed: Callable[[memoryview], bool] | None = None,
    ) -> None:
        self._try_write = try_write
        self.watchdog = watchdog
        self.framed = try_write_framed

    def __call__(self, message: bytes) -> bool:
        if self._try_write(message):
            self.watchdog.moved += len(message)
            return True
        return False
