"""The audit trail: one structured log line per session start, end and refusal, and per resume.

Logged on the `osmo_router.audit` logger with `fields`, so the JSON log format carries them as
keys: user, workflow, task, operation, session (a fingerprint of its key, not the key), peer, and at the
end bytes each way, duration, the gRPC status and the remote exit status when the agent sent one.

The exit status is noticed without decoding the relayed stream: the relay hands over only small
agent messages whose third byte is the tag of Frame.exit_status (`wire/codec.py`).
"""

from __future__ import annotations

import logging

from osmo_router.cli.logs import MAX_QUOTED, cut, fingerprint
from osmo_router.router.auth.identity import Identity
from osmo_router.router.core.resumes import cause_of
from osmo_router.router.core.sessions import Session
from osmo_router.wire.errors import RouterError

log = logging.getLogger("osmo_router.audit")

#: Longest `reason` an audit line keeps. A refusal's reason may quote what the client sent (an
#: unknown operation or a `?timeout=` in a WebSocket URL: up to aiohttp's 8 KiB request line), and the
#: refusal is logged before any token is checked: unauthenticated requests made 7.3 KB lines each.
MAX_REASON = MAX_QUOTED


def _reason(text: str) -> str:
    """`text` cut to MAX_REASON characters (marked with an ellipsis)."""
    return cut(text, MAX_REASON)


def session_event(
    event: str, session: Session, peer: str, duration: float | None = None, transport: str = "grpc"
) -> None:
    """Log the start (duration None) or the end of a session (`transport`: the client's, grpc or ws)."""
    fields = _fields(event, session, session.operation_name, peer, duration)
    fields.update(session=fingerprint(session.key), transport=transport)
    if duration is not None and session.exit_status:
        fields["exit_status"] = session.exit_status
    log.info(event, extra={"fields": fields})


def attach_event(event: str, session: Session, peer: str = "") -> None:
    """Log a client detaching from a resumable session ("session detach", seen as its Detach frame in
    the relay) or attaching to one ("session attach", seen as the attach flag of its init)."""
    fields = _fields(event, session, session.operation_name, peer, None)
    fields["session"] = fingerprint(session.key)
    log.info(event, extra={"fields": fields})


def _fields(event: str, session: Session, operation: str, peer: str, duration: float | None) -> dict[str, object]:
    fields: dict[str, object] = {
        "event": event,
        "user": session.user,
        "workflow": session.workflow_id,
        "task": session.task,
        "operation": operation,
        "peer": peer,
    }
    if duration is not None:
        fields.update(end_fields(session, duration))
    return fields


def end_fields(session: Session, duration: float) -> dict[str, object]:
    """What an end-of-session audit line adds: bytes each way, duration, status (and why it failed)."""
    fields: dict[str, object] = {
        "bytes_to_agent": session.bytes_to_agent,
        "bytes_to_client": session.bytes_to_client,
        "duration_s": round(duration, 3),
        "status": session.error.code.name if session.error else "OK",
    }
    if session.error is not None:
        fields["reason"] = _reason(session.error.message)
    return fields


def refused(
    operation: str, error: RouterError, peer: str, identity: Identity | None = None, transport: str = "grpc"
) -> None:
    """Log a stream the router refused before it became a session (bad token, no access, limits)."""
    fields: dict[str, object] = {
        "event": "session refused",
        "operation": operation,
        "code": error.code.name,
        "reason": _reason(error.message),
        "peer": peer,
        "transport": transport,
    }
    if identity is not None:
        fields["user"] = identity.subject
        fields["role"] = identity.role
    log.info("session refused", extra={"fields": fields})


def relay_event(
    event: str, session: Session, operation: str, replica: str, peer: str, duration: float | None = None
) -> None:
    """Log the start or end of a stream relayed to replica `replica` (which logs the session itself)."""
    fields = _fields(event, session, operation, peer, duration)
    fields["replica"] = replica
    log.info(event, extra={"fields": fields})


def resume_event(session: Session) -> None:
    """Log a resume (or attach) the agent took ("session resumed") or refused ("resume refused")."""
    info = session.resume
    if info is None:
        return
    fields = _fields("", session, session.operation_name, "", None)
    del fields["peer"]
    fields["session"] = fingerprint(session.key)
    fields["attach"] = info.attach
    if info.refused is None:
        event = "session resumed"
        fields.update(replayed_to_agent=info.replayed_to_agent, replayed_to_client=info.replayed_to_client)
    else:
        event = "resume refused"
        fields.update(code=info.refused.name, cause=cause_of(info.refused, info.refusal), reason=_reason(info.refusal))
    fields["event"] = event
    log.info(event, extra={"fields": fields})


def resume_failed(operation: str, error: RouterError, identity: Identity | None, cause: str) -> None:
    """Log a resume the router could not pair (no agent registered, another user's session, ...)."""
    fields: dict[str, object] = {
        "event": "resume refused",
        "operation": operation,
        "code": error.code.name,
        "cause": cause,
        "reason": _reason(error.message),
    }
    if identity is not None:
        fields["user"] = identity.subject
    log.info("resume refused", extra={"fields": fields})
