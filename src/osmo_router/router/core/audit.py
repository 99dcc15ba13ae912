"""The audit trail: one structured log line per session start, end and refusal.

Logged on the `osmo_router.audit` logger with `fields`, so the JSON log format carries them as
keys: user, workflow, task, operation, session (the first 8 characters of its key), peer, and at the
end bytes each way, duration, the gRPC status and the remote exit status when the agent sent one.

The exit status is noticed without decoding the relayed stream: the relay hands over only small
agent messages whose third byte is the tag of Frame.exit_status (see `is_exit_status_frame`).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from osmo_router.router.auth.identity import Identity
from osmo_router.router.core.sessions import Session
from osmo_router.wire.errors import RouterError
from osmo_router.wire.protocol import FRAME_TAG, pb

log = logging.getLogger("osmo_router.audit")

#: Key byte of Frame field 6 (exit_status) with wire type LEN.
EXIT_STATUS_TAG: Final = 0x32
#: An encoded ConnectRequest(frame=Frame(exit_status=...)) is never longer than this: one-byte
#: lengths, so its third byte is the Frame's first key.
MAX_EXIT_STATUS_MESSAGE: Final = 32


def is_exit_status_frame(message: bytes) -> bool:
    """True for an encoded frame message carrying an ExitStatus (a byte check, no decoding)."""
    return 2 < len(message) <= MAX_EXIT_STATUS_MESSAGE and message[0] == FRAME_TAG and message[2] == EXIT_STATUS_TAG


def note_exit_status(session: Session, message: bytes) -> None:
    """Record the exit status an agent's frame message reports (ignored if it does not decode)."""
    try:
        status = pb.ConnectRequest.FromString(message).frame.exit_status
    except DecodeError:
        return
    which = status.WhichOneof("status")
    if which == "signal":
        session.exit_status = f"signal {status.signal}"
    elif which == "code":
        session.exit_status = f"code {status.code}"


def peer_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The peer address of a call, as gRPC reports it."""
    try:
        return str(context.peer())
    except Exception:
        return "unknown"


def session_event(
    event: str, session: Session, peer: str, duration: float | None = None, transport: str = "grpc"
) -> None:
    """Log the start (duration None) or the end of a session (`transport`: the client's, grpc or ws)."""
    fields: dict[str, object] = {
        "event": event,
        "user": session.user,
        "workflow": session.workflow_id,
        "task": session.task,
        "operation": session.operation_name,
        "session": session.key[:8],
        "peer": peer,
        "transport": transport,
    }
    if duration is not None:
        fields.update(end_fields(session, duration))
        if session.exit_status:
            fields["exit_status"] = session.exit_status
    log.info(event, extra={"fields": fields})


def end_fields(session: Session, duration: float) -> dict[str, object]:
    """What an end-of-session audit line adds: bytes each way, duration and status."""
    return {
        "bytes_to_agent": session.bytes_to_agent,
        "bytes_to_client": session.bytes_to_client,
        "duration_s": round(duration, 3),
        "status": session.error.code.name if session.error else "OK",
    }


def refused(
    operation: str, error: RouterError, peer: str, identity: Identity | None = None, transport: str = "grpc"
) -> None:
    """Log a stream the router refused before it became a session (bad token, no access, limits)."""
    fields: dict[str, object] = {
        "event": "session refused",
        "operation": operation,
        "code": error.code.name,
        "reason": error.message,
        "peer": peer,
        "transport": transport,
    }
    if identity is not None:
        fields["user"] = identity.subject
        fields["role"] = identity.role
    log.info("session refused", extra={"fields": fields})
