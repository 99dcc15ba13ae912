"""What the router knows of resumable sessions (docs/resume.md): a relay, plus one look at one frame.

The numbering is end to end; the router keeps no replay buffer. It learns what it needs from two
messages it already relays:

- the client's init: `SessionTarget.resume` says the client asks for resume (a secret), or that
  this stream resumes or attaches to a session the agent holds (with the units the client sent);
- the agent's first frame on the session: a `Resume` frame means the agent holds the session
  (new, or resumed: then it carries where each side resends from and how far each numbered),
  an `Error` frame on a resume is the agent's refusal (no such session, not the owner, data lost).

A session whose client asked and whose agent answered with a Resume frame is *resumable*: a
draining router ends it with `Moved` (UNAVAILABLE), which both ends take as a break and resume on
another replica, instead of waiting for it to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from osmo_router.wire.codec import FRAME_TAG
from osmo_router.wire.errors import InvalidArgument, Unavailable
from osmo_router.wire.keys import key_of_secret
from osmo_router.wire.protocol import pb

#: The agent's first frame is decoded only when it is this small (Resume and Error frames are).
MAX_ANSWER_MESSAGE = 4096

#: Failed resumes by cause, from the agent's refusal (its Error frame's code) or the router's own.
CAUSES = {
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.PERMISSION_DENIED: "denied",
    grpc.StatusCode.DATA_LOSS: "data_loss",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
}


class Moved(Unavailable):
    """A draining router ends a resumable session so that its ends resume on another replica."""


@dataclass(slots=True)
class ResumeInfo:
    """The resume side of a session whose client asked for it (None on every other session)."""

    #: This stream resumes (or attaches to) a session the agent holds; False for a new one.
    resuming: bool
    #: An attach from another process of the owner (no secret, nothing to resend of its own).
    attach: bool = False
    #: Units the resuming client numbered so far (ResumeToken.sent).
    client_sent: int = 0
    #: The agent answered with a Resume frame: both ends resume after a break.
    confirmed: bool = False
    #: Units each side resends, as the two ends declared at the resume (0 on a new session).
    replayed_to_agent: int = 0
    replayed_to_client: int = 0
    #: The agent's refusal of a resume: its gRPC status code and message.
    refused: grpc.StatusCode | None = None
    refusal: str = ""


def resume_info(target: pb.SessionTarget) -> ResumeInfo | None:
    """The ResumeInfo of a client's init, or None when the client did not ask for resume."""
    if not target.HasField("resume"):
        return None
    token = target.resume
    if not (token.secret or token.resuming or token.attach):
        return None
    return ResumeInfo(resuming=token.resuming or token.attach, attach=token.attach, client_sent=token.sent)


def resume_info_of_open(message: bytes) -> ResumeInfo | None:
    """The ResumeInfo of an encoded ConnectResponse carrying the SessionOpen (an agent's stream relayed here)."""
    try:
        open_msg = pb.ConnectResponse.FromString(message).open
    except Exception:  # the agent's end judges it
        return None
    kind = open_msg.WhichOneof("init")
    return resume_info(getattr(open_msg, kind).target) if kind is not None else None


#: Shortest resume secret a session may be named after (ResumeToken.key_from_secret): 128 bits in hex.
MIN_KEYED_SECRET = 32


def proposed_key(target: pb.SessionTarget) -> str:
    """The key a new session's client asked for, named after its resume secret (key_from_secret), or "".

    The client then knows the key before the router's SessionReady and can resume a session that broke
    before it (docs/resume.md). Only for a new session that names no key itself.
    """
    if target.session_key or not target.HasField("resume") or is_resuming(target):
        return ""
    token = target.resume
    if not token.key_from_secret:
        return ""
    if len(token.secret) < MIN_KEYED_SECRET:
        raise InvalidArgument("a session named after its resume secret needs a secret of at least 128 bits")
    return key_of_secret(token.secret)


def is_resuming(target: pb.SessionTarget) -> bool:
    """True when a client's init resumes or attaches to a held session."""
    return target.HasField("resume") and (target.resume.resuming or target.resume.attach)


def note_agent_answer(info: ResumeInfo, message: bytes) -> None:
    """Read the agent's first frame of a session whose client asked for resume (see the module docstring)."""
    if len(message) > MAX_ANSWER_MESSAGE or len(message) < 2 or message[0] != FRAME_TAG:
        return
    try:
        frame = pb.ConnectRequest.FromString(message).frame
    except Exception:  # not ours to judge: the far end decodes it
        return
    kind = frame.WhichOneof("kind")
    if kind == "resume":
        info.confirmed = True
        if info.resuming:
            resume = frame.resume
            info.replayed_to_client = max(0, resume.sent - resume.sending_from)
            info.replayed_to_agent = 0 if info.attach else max(0, info.client_sent - resume.received)
    elif kind == "error" and info.resuming:
        info.refused = _code(frame.error.code)
        info.refusal = frame.error.message


def cause_of(code: grpc.StatusCode | None, message: str = "") -> str:
    """The `cause` label of a failed resume."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return "no_agent" if "no agent" in message else "unavailable"
    return CAUSES.get(code, "other") if code is not None else "other"


def _code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


__all__ = [
    "CAUSES",
    "Moved",
    "ResumeInfo",
    "cause_of",
    "is_resuming",
    "note_agent_answer",
    "proposed_key",
    "resume_info",
    "resume_info_of_open",
]
