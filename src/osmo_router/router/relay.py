"""The relay: moves encoded frames between the two streams of a session, unchanged.

Each side of a session runs `relay_side` in its own RPC handler: a reader task feeds what its
stream receives into the other side's queue, and the handler writes what the other side queued
onto its own stream. Frames are forwarded as the bytes they arrived as; only the first byte is
checked, so a peer cannot smuggle an init or a foreign field into the other stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from osmo_router.errors import InvalidArgument, ResourceExhausted, Unavailable
from osmo_router.protocol import CLOSE_GRACE, ENCODED_HALF_CLOSE, ENCODED_SESSION_END, FRAME_TAG
from osmo_router.router.audit import MAX_EXIT_STATUS_MESSAGE, is_exit_status_frame, note_exit_status
from osmo_router.router.flow_control import FlowQueue
from osmo_router.router.sessions import Session


class Endpoint(Protocol):
    """One stream of a session, seen as encoded messages."""

    async def read(self) -> bytes | None:
        """The next encoded message, or None at the end of the stream."""
        ...

    async def write(self, message: bytes) -> None:
        """Send one encoded message."""
        ...


class RelayHooks(Protocol):
    """What the relay reports: bytes per chunk and flow-control timeouts."""

    def count_bytes(self, session: Session, direction: str, size: int) -> None:
        """Count `size` bytes moved in `direction` (client_to_agent or agent_to_client)."""
        ...

    def flow_control_timeout(self, session: Session) -> None:
        """A reader stopped reading for longer than the flow-control timeout."""
        ...


async def relay_side(
    session: Session,
    endpoint: Endpoint,
    *,
    is_client: bool,
    flow_control_timeout: float,
    hooks: RelayHooks,
) -> None:
    """Relay one side of a paired session until it ends; raises the session's RouterError on failure."""
    inbound, outbound = (session.to_agent, session.to_client) if is_client else (session.to_client, session.to_agent)
    direction = "client_to_agent" if is_client else "agent_to_client"
    on_eof: Callable[[], Awaitable[None]]
    if is_client:
        # The client finished sending: tell the agent, keep delivering the agent's output.
        async def on_eof() -> None:
            await inbound.put(ENCODED_HALF_CLOSE)
    else:
        # The agent ending its stream after a half-close ends the session once its output is
        # delivered; an end without one is a broken agent (killed, connection lost).
        async def on_eof() -> None:
            if session.agent_half_closed:
                inbound.end()
            else:
                raise Unavailable("the agent disconnected")

    reader = asyncio.create_task(_read_into(session, endpoint, inbound, direction, hooks, on_eof, not is_client))
    try:
        if is_client:
            await _write_from(session, endpoint, outbound, flow_control_timeout, hooks)
            await _end_client(endpoint, reader, flow_control_timeout)
        else:
            writer = asyncio.create_task(_write_from(session, endpoint, outbound, flow_control_timeout, hooks))
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                if reader in done:
                    # The agent is finished: whatever the client still sends has no reader.
                    outbound.end()
                    return
            finally:
                writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
            await reader
    finally:
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


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _read_into(
    session: Session,
    endpoint: Endpoint,
    queue: FlowQueue,
    direction: str,
    hooks: RelayHooks,
    on_eof: Callable[[], Awaitable[None]],
    is_agent: bool,
) -> None:
    try:
        while (message := await endpoint.read()) is not None:
            if not message or message[0] != FRAME_TAG:
                raise InvalidArgument("expected a frame after the init")
            session.touch()
            hooks.count_bytes(session, direction, len(message))
            if is_agent and len(message) <= MAX_EXIT_STATUS_MESSAGE:
                # Control frames are small: bulk data never pays for these checks.
                if message == ENCODED_HALF_CLOSE:
                    session.agent_half_closed = True
                elif is_exit_status_frame(message):
                    note_exit_status(session, message)
            await queue.put(message)
        await on_eof()
    except (InvalidArgument, Unavailable) as err:
        session.fail(err)
        raise


async def _write_from(
    session: Session,
    endpoint: Endpoint,
    queue: FlowQueue,
    timeout: float,
    hooks: RelayHooks,
) -> None:
    while (message := await queue.get()) is not None:
        try:
            async with asyncio.timeout(timeout):
                await endpoint.write(message)
        except TimeoutError:
            hooks.flow_control_timeout(session)
            err = ResourceExhausted(f"peer stopped reading for {timeout:g}s (flow-control timeout)")
            session.fail(err)
            raise err from None
