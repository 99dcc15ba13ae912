"""Detach, attach and list resumable exec sessions (tmux-like; issue 17, docs/resume.md).

- `exec --detach` starts the session and detaches as soon as the agent confirmed it holds it;
  in a TTY session the escape key `Ctrl-]` then `d` detaches (`Ctrl-]` twice sends one `Ctrl-]`).
  Detaching sends a Detach frame and ends the stream; the agent keeps the session for its grace.
- `attach SESSION_KEY` opens an exec stream on that key with `ResumeToken(attach=True)` and then
  behaves as exec (raw terminal, resize, exit code); its first resize asks the program to draw
  its screen again (`Resize.redraw`). Only the session's owner may; a client that
  was attached is told (and exits 255, see TAKEN_OVER).
- `sessions` lists the caller's live resumable sessions on a workflow (RouterClientService.ListSessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from osmo_router.client.backoff import attempts
from osmo_router.client.config import ClientConfig
from osmo_router.client.notice import say
from osmo_router.client.resume import FATAL, ResumingStream
from osmo_router.client.resume_start import reopener
from osmo_router.client.terminal import raw_mode, terminal_size
from osmo_router.client.words import printable
from osmo_router.dial.channel import open_channel
from osmo_router.transport import GRPC, SessionInit, SessionStream, Transport
from osmo_router.transport.rollout import connect_transport
from osmo_router.wire.errors import (
    EXIT_CONNECTION_ERROR,
    FailedPrecondition,
    RouterError,
    from_status,
    from_status_number,
)
from osmo_router.wire.protocol import CLIENT_SERVICE, pb

log = logging.getLogger(__name__)

#: Longest `exec --detach` waits for the router to list the session, and how often it asks meanwhile.
LISTED_WAIT, LISTED_POLL = 2.0, 0.02
#: The escape key of TTY sessions: Ctrl-] (as telnet), then `d` to detach.
ESCAPE = 0x1D
#: The key after ESCAPE that detaches.
DETACH_KEY = ord("d")
#: Exit status of a client that detached on purpose (--detach, the escape key).
EXIT_DETACHED = 0
#: How the escape key is documented (exec --help, attach --help).
ESCAPE_HELP = "In a TTY session, Ctrl-] then d detaches (the session keeps running); Ctrl-] twice sends one Ctrl-]."


class EscapeFilter:
    """Finds the escape sequence in terminal input: `Ctrl-] d` detaches, `Ctrl-] Ctrl-]` is one literal `Ctrl-]`.

    `Ctrl-]` followed by any other byte sends both, as typed. A `Ctrl-]` at the end of a read waits
    for the next one.
    """

    def __init__(self) -> None:
        self._pending = False

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        """The bytes to send, and True when the user asked to detach (what follows is dropped)."""
        if not self._pending and ESCAPE not in chunk:
            return chunk, False
        out = bytearray()
        for byte in chunk:
            if self._pending:
                self._pending = False
                if byte == DETACH_KEY:
                    return bytes(out), True
                out.append(ESCAPE)
                if byte != ESCAPE:
                    out.append(byte)
            elif byte == ESCAPE:
                self._pending = True
            else:
                out.append(byte)
        return bytes(out), False


def attach_hint(config: ClientConfig, key: str) -> str:
    """The command that attaches to `key` again, as it can be pasted: with this client's connection
    flags (the router, TLS, a token file; never a token itself: it comes from OSMO_TOKEN or --token)."""
    dial = config.dial
    words = ["osmo-net-client", "attach", key, "--workflow-id", config.workflow_id, "--router-address", dial.address]
    if config.task:
        words += ["--task", config.task]
    if not dial.tls:
        words.append("--tls=false")
    for flag, value in (
        ("--tls-ca", dial.tls_ca),
        ("--tls-server-name", dial.tls_server_name),
        ("--token-file", dial.token_file),
    ):
        if value:
            words += [flag, value]
    return shlex.join(words)


def detached_notice(config: ClientConfig, stream: SessionStream) -> Callable[[], int]:
    """What a client that detached says (on stderr) before it exits with EXIT_DETACHED."""

    def notice() -> int:
        key = getattr(stream, "session_key", "")
        say(f"detached from session {key}; attach again with: {attach_hint(config, key)}")
        if getattr(stream, "detached_offline", False):
            lost = (
                "; input the agent had not acknowledged was dropped"
                if getattr(stream, "detached_unsent", False)
                else ""
            )
            say(f"(the connection was down: the agent holds the session for its resume grace if it still runs{lost})")
        return EXIT_DETACHED

    return notice


async def detach_now(config: ClientConfig, stream: SessionStream, channel: Any = None) -> int:
    """`exec --detach`: wait until the agent confirmed it holds the session, detach, print the key (once
    the router lists it, when `channel` is given)."""
    if not isinstance(stream, ResumingStream):
        stream.abort()
        say("cannot detach: the session is not resumable (the WebSocket transport, or --resume-grace 0)")
        return EXIT_CONNECTION_ERROR
    # A full agent's reason is said once, below, as why the session cannot detach. (Set before the first
    # await: the stream has not taken the agent's answer yet, its reading task has not run.)
    stream.warn_declined = False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(config.connect_timeout):
            await stream.answered.wait()
    if not await stream.detach():
        stream.abort()
        why = (
            stream.not_resumable
            or "the agent does not hold resumable sessions (agent --resume-grace 0, or an older agent)"
        )
        say(f"cannot detach: {why}")
        return EXIT_CONNECTION_ERROR
    if channel is not None:
        await _until_listed(config, channel, stream.session_key)
    print(stream.session_key, flush=True)
    say(f"detached; the session runs on. Attach with: {attach_hint(config, stream.session_key)}")
    return EXIT_DETACHED


async def open_attach(transport: Transport, config: ClientConfig, operation: int, init: SessionInit) -> ResumingStream:
    """Attach to the held session `init.target.session_key`; RouterError when the agent refuses.

    The attach brings a secret of its own: the agent takes it for the session's later resumes, and
    the client that was attached can no longer resume it. A break before the agent's answer (the
    connection cut, the router restarting, its agent re-registering: any status a resume would retry)
    is tried again, with the same secret, for at most --connect-timeout: the agent still holds the
    session, and an attach that already took it is taken over again by the same secret.
    """
    if transport.name != GRPC:
        raise FailedPrecondition("attach needs the gRPC transport (the WebSocket transport has no resume)")
    secret = secrets.token_hex(16)
    init.target.resume.CopyFrom(pb.ResumeToken(secret=secret, attach=True))
    last: RouterError | None = None
    async for _ in attempts(config.connect_timeout):
        try:
            return await _attach_once(transport, config, operation, init, secret)
        except RouterError as err:
            if err.code in FATAL:
                raise
            log.debug("attach attempt failed: %s [%s]", err.message, err.code.name)
            last = err
    assert last is not None  # (attempts yields at least once)
    raise last


async def _attach_once(
    transport: Transport, config: ClientConfig, operation: int, init: SessionInit, secret: str
) -> ResumingStream:
    """One attach attempt: the stream, once the agent's first frame (a Resume) took it."""
    try:
        inner = await transport.open(operation, init)
    except grpc.aio.AioRpcError as err:
        raise from_status(err.code(), err.details() or "") from None
    try:
        first = await inner.recv()
    except grpc.aio.AioRpcError as err:
        inner.abort()
        raise from_status(err.code(), err.details() or "") from None
    kind = first.WhichOneof("kind") if first is not None else None
    if first is None or kind != "resume":
        inner.abort()
        if first is not None and kind == "error":
            raise from_status_number(first.error.code, first.error.message)
        raise FailedPrecondition("the agent does not hold resumable sessions (it answered the attach without Resume)")
    stream = ResumingStream.attached(
        inner,
        first.resume,
        reopen=reopener(transport, operation, init, lambda: inner),
        secret=secret,
        grace=config.resume_grace,
    )
    stream.session_key = init.target.session_key
    stream.remote_tty = first.resume.tty if first.resume.HasField("tty") else None
    stream.start()
    return stream


async def run_attach(config: ClientConfig, key: str, tty: bool | None) -> int:
    """`osmo-net-client attach KEY`: attach, then relay as exec does; the exit code to exit with."""
    from osmo_router.client.exec import relay_session

    chosen = tty
    if tty is None:
        tty = os.isatty(0)
    transport: Transport | None = None
    try:
        transport = await connect_transport(config)
        rows, cols = terminal_size() if tty else (0, 0)
        target = config.target()
        target.session_key = key
        init = pb.ExecInit(target=target, tty=tty, size=pb.TerminalSize(rows=rows, cols=cols))
        try:
            stream = await open_attach(transport, config, pb.OPERATION_EXEC, init)
        except RouterError as err:
            say(f"cannot attach to session {key}: {err.message} [{err.code.name}]", "attach", tty=False)
            return EXIT_CONNECTION_ERROR
        if chosen is None and stream.remote_tty is not None:
            # As docker attach follows the container's TTY: a session without a terminal is attached in this
            # terminal's own (cooked) mode, where Enter, Ctrl-D and Ctrl-C work as for `exec` without --tty.
            tty = tty and stream.remote_tty
        with raw_mode(0) if tty else contextlib.nullcontext(False):
            if tty:  # the remote terminal takes this terminal's size
                await stream.send(pb.Frame(resize=pb.Resize(size=pb.TerminalSize(rows=rows, cols=cols), redraw=True)))
            return await relay_session(stream, tty, detached=detached_notice(config, stream), attached=True)
    except RouterError as err:
        say(f"{err.message} [{err.code.name}]", "attach", tty=False)
        return EXIT_CONNECTION_ERROR
    finally:
        if transport is not None:
            await transport.aclose()


async def list_sessions(config: ClientConfig, channel: Any = None) -> list[pb.HeldSession]:
    """The caller's resumable sessions on the configured workflow (and task), over `channel` if given (else
    over a channel of its own)."""
    if channel is not None:
        return await _ask_sessions(config, channel)
    channel = open_channel(config.dial)
    try:
        return await _ask_sessions(config, channel)
    finally:
        await channel.close(grace=None)


async def _ask_sessions(config: ClientConfig, channel: Any) -> list[pb.HeldSession]:
    call: Callable[..., Awaitable[pb.ListSessionsResponse]] = channel.unary_unary(
        f"/{CLIENT_SERVICE}/ListSessions",
        request_serializer=pb.ListSessionsRequest.SerializeToString,
        response_deserializer=pb.ListSessionsResponse.FromString,
    )
    request = pb.ListSessionsRequest(target=pb.SessionTarget(workflow_id=config.workflow_id, task=config.task))
    try:
        response = await call(request, metadata=config.dial.metadata(), timeout=config.connect_timeout)
    except grpc.aio.AioRpcError as err:
        raise from_status(err.code(), err.details() or "") from None
    return list(response.sessions)


async def _until_listed(config: ClientConfig, channel: Any, key: str) -> None:
    """Wait (at most LISTED_WAIT s) until the router lists the detached session, so a `sessions` run right
    after `exec --detach` finds it: the agent reports its sessions to the router on a stream of its own."""
    with contextlib.suppress(TimeoutError, RouterError):
        async with asyncio.timeout(LISTED_WAIT):
            while True:  # (the router's list is another process's state: asked again, there is no event to await)
                listed = await list_sessions(config, channel)
                if any(entry.session_key == key and not entry.attached for entry in listed):
                    return
                await asyncio.sleep(LISTED_POLL)


def _ago(unix: int, now: float) -> str:
    seconds = max(0, int(now - unix))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def format_sessions(sessions: list[pb.HeldSession], now: float | None = None) -> list[str]:
    """A table: KEY, TASK, COMMAND, STATE, SINCE (when it started, or when it was detached)."""
    now = time.time() if now is None else now
    rows = [("SESSION", "TASK", "COMMAND", "STATE", "SINCE")]
    for entry in sessions:
        state = "attached" if entry.attached else "detached"
        since = entry.started_unix if entry.attached else entry.detached_unix
        # The command is the user's, but shown raw its newlines break the table and its escapes drive the terminal.
        summary, task = printable(entry.summary), printable(entry.task)
        rows.append((entry.session_key, task or "-", summary or "-", state, _ago(since, now)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]]) for row in rows]


async def run_sessions(config: ClientConfig, json_output: bool) -> int:
    """`osmo-net-client sessions`: print the caller's live sessions; 255 when the router refuses."""
    try:
        sessions = await list_sessions(config)
    except RouterError as err:
        say(f"{err.message} [{err.code.name}]", "sessions", tty=False)
        return EXIT_CONNECTION_ERROR
    if json_output:
        for entry in sessions:
            record = {
                "session_key": entry.session_key,
                "task": entry.task,
                "command": entry.summary,
                "attached": entry.attached,
                "started_unix": entry.started_unix,
                "detached_unix": entry.detached_unix,
            }
            print(json.dumps(record))
    elif sessions:
        print("\n".join(format_sessions(sessions)))
    else:
        print(f"no resumable sessions of yours on workflow {config.workflow_id}", file=sys.stderr)
    return 0


__all__ = [
    "ESCAPE",
    "ESCAPE_HELP",
    "EXIT_DETACHED",
    "EscapeFilter",
    "attach_hint",
    "detach_now",
    "detached_notice",
    "format_sessions",
    "list_sessions",
    "open_attach",
    "run_attach",
    "run_sessions",
]
