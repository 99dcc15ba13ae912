"""One error hierarchy, mapped once to gRPC status codes and once to CLI exit codes.

RouterError                      (any failure; carries a grpc.StatusCode)
 +-- InvalidArgument             INVALID_ARGUMENT   malformed or out-of-order message
 +-- Unauthenticated             UNAUTHENTICATED    no or invalid credentials
 +-- PermissionDenied            PERMISSION_DENIED  workflow mismatch, no access, refused port/path
 +-- NotFound                    NOT_FOUND          unknown session key
 +-- Unavailable                 UNAVAILABLE        no agent, agent gone, router draining
 +-- AlreadyExists               ALREADY_EXISTS     same party twice in one session
 +-- DeadlineExceeded            DEADLINE_EXCEEDED  rendezvous or init timeout, idle expiry
 +-- ResourceExhausted           RESOURCE_EXHAUSTED flow-control timeout, limits
 +-- Cancelled                   CANCELLED          the other side went away
 +-- FailedPrecondition          FAILED_PRECONDITION the container lacks what the operation needs (rsync)
"""

from __future__ import annotations

import copy
from typing import ClassVar, Final, TypeVar

import grpc

E = TypeVar("E", bound=BaseException)

#: Exit status of the CLI when the session could not be made or broke (like ssh).
EXIT_CONNECTION_ERROR: Final = 255


class RouterError(Exception):
    """A failure with the gRPC status code that reports it."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def detached(error: E) -> E:
    """A twin of `error` with no traceback, context or cause, to keep or to raise again.

    An exception kept past the failure (a session's error, a queue's) and raised more than once
    gathers every raising frame in its traceback, and with them their locals: a relay's frames hold
    the message they were moving (up to 4 MiB each), so one ended session kept several alive for as
    long as anything referred to it (+52 MiB idle RSS after the stall attack test, 2026-12-01).
    """
    try:
        twin = copy.copy(error)
    except Exception:  # an exception whose arguments do not rebuild it: keep the instance, bare
        return error.with_traceback(None)
    twin.__traceback__ = twin.__context__ = twin.__cause__ = None
    return twin


class InvalidArgument(RouterError):
    """A malformed or out-of-order message."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(RouterError):
    """No or invalid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RouterError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(RouterError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(RouterError):
    """The service or its peer cannot be reached now."""

    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(RouterError):
    """The same party joined a session twice."""

    code = grpc.StatusCode.ALREADY_EXISTS


class DeadlineExceeded(RouterError):
    """A timeout ran out."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(RouterError):
    """A limit was hit, or a reader stopped reading."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(RouterError):
    """The other side went away."""

    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(RouterError):
    """The container lacks something the operation needs (e.g. rsync)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RouterError):
    """The session goes on elsewhere: another client of its owner attached to it."""

    code = grpc.StatusCode.ABORTED


_BY_CODE: Final[dict[grpc.StatusCode, type[RouterError]]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        Unavailable,
        AlreadyExists,
        DeadlineExceeded,
        ResourceExhausted,
        Cancelled,
        FailedPrecondition,
        Aborted,
    )
}


def from_status(code: grpc.StatusCode, message: str) -> RouterError:
    """The RouterError for a gRPC status code."""
    return _BY_CODE.get(code, RouterError)(message)


def from_status_number(number: int, message: str) -> RouterError:
    """The RouterError for a status code number as carried in an Error frame."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return from_status(code, message)
    return RouterError(message)


def describe_rpc_error(err: grpc.RpcError) -> str:
    """One clear line for a failed RPC, as the CLI prints it."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    hints = {
        grpc.StatusCode.UNAVAILABLE: "router or agent unreachable",
        grpc.StatusCode.UNAUTHENTICATED: "check --token / OSMO_TOKEN",
        grpc.StatusCode.DEADLINE_EXCEEDED: "no agent joined in time",
    }
    name = code.name if code is not None else "ERROR"
    hint = hints.get(code) if code is not None else None
    text = f"{name}: {details}" if details else name
    return f"{text} ({hint})" if hint and hint not in (details or "") else text
