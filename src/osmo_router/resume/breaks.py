"""What breaks a session stream, what ends a session on purpose, and how a lost session is reported."""

from __future__ import annotations

import asyncio

import grpc

from osmo_router.wire.errors import RouterError

#: What a broken stream under a session raises.
BREAKS = (grpc.aio.AioRpcError, RouterError, asyncio.InvalidStateError, grpc.aio.UsageError, ConnectionError)


#: Statuses with which the router ends a session on purpose: the session is over, not broken.
#: DEADLINE_EXCEEDED: idle past --session-ttl; PERMISSION_DENIED / UNAUTHENTICATED: access or
#: credentials gone. (A flow-control timeout, RESOURCE_EXHAUSTED, is resumed: a laptop that slept.)
ENDS = frozenset(
    {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
)


class SessionLost(Exception):
    """The session cannot go on: `message` says why (shown to the user, logged by the agent)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def being_cancelled() -> bool:
    """True if the current task was asked to stop (a CancelledError that is not just a call's)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def describe(cause: object) -> str:
    """What broke a stream, for the log and the user."""
    if isinstance(cause, grpc.aio.AioRpcError):
        return f"{cause.code().name}: {cause.details()}"
    if isinstance(cause, RouterError):
        return f"{cause.code.name}: {cause.message}"
    return str(cause) or type(cause).__name__


__all__ = ["BREAKS", "ENDS", "SessionLost", "being_cancelled", "describe"]
