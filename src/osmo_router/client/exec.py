"""`osmo-net-client exec`: run a command in the container, wired to this terminal or these pipes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.client.notice import say
from osmo_router.client.resume_start import open_stream
from osmo_router.client.session import rpc_error
from osmo_router.client.signal_frames import SignalFrames
from osmo_router.client.stall import METER
from osmo_router.client.stdio import OutputWriter, StdinReader
from osmo_router.client.terminal import raw_mode, terminal_size
from osmo_router.transport import SessionStream, Transport
from osmo_router.transport.rollout import connect_transport
from osmo_router.wire.codec import BULK_PAYLOAD
from osmo_router.wire.errors import EXIT_CONNECTION_ERROR, RouterError, from_status_number
from osmo_router.wire.protocol import BULK_LINGER, pb

log = logging.getLogger(__name__)

#: Seconds between the signals that end a command whose output nobody reads any more.
PIPE_GRACE = 2.0
#: Longest the client reads on after an error frame (see _read_to_end).
ERROR_SETTLE = 2.0
#: Exit status when stdout could not be written (other than its reader gone: that is the command's 141).
EXIT_STDOUT_ERROR = 1


def exit_code_of(status: pb.ExitStatus) -> int:
    """The local exit code for a remote exit status: the code, or 128+N for signal N."""
    if status.WhichOneof("status") == "signal":
        return 128 + status.signal
    return status.code & 0xFF


async def run_exec(
    config: ClientConfig,
    command: list[str],
    tty: bool,
    detach: bool = False,
    env: dict[str, str] | None = None,
    workdir: str = "",
) -> int:
    """Run the session to its end and return the exit code to exit with.

    `detach`: start the session and detach at once (client/attach.py), printing its key. `env`: the
    command's environment beyond the agent's own; `workdir`: its working directory.
    """
    from osmo_router.client.attach import detach_now, detached_notice

    transport: Transport | None = None
    if config.legacy_backend:
        from osmo_router.client.legacy import EXIT_USAGE, LegacyUsageError, check_exec

        try:
            check_exec(command, env or {}, workdir)
        except LegacyUsageError as err:
            say(str(err), "exec", tty=False)
            return EXIT_USAGE
    try:
        transport = await connect_transport(config)
        rows, cols = terminal_size() if tty else (0, 0)
        init = pb.ExecInit(
            target=config.target(),
            command=command,
            tty=tty,
            size=pb.TerminalSize(rows=rows, cols=cols),
            term=os.environ.get("TERM", ""),
            env=env or {},
            workdir=workdir,
        )
        stream = await open_stream(transport, config, pb.OPERATION_EXEC, init)
        if detach:
            return await detach_now(config, stream, getattr(transport, "channel", None))
        with raw_mode(0) if tty else contextlib.nullcontext(False):
            return await relay_session(
                stream, tty, legacy=config.legacy_backend, detached=detached_notice(config, stream)
            )
    except RouterError as err:
        say(f"{err.message} [{err.code.name}]", "exec", tty=False)
        return EXIT_CONNECTION_ERROR
    finally:
        if transport is not None:
            await transport.aclose()


async def relay_session(
    stream: SessionStream,
    tty: bool,
    legacy: bool = False,
    detached: Callable[[], int] | None = None,
    attached: bool = False,
) -> int:
    """Relay this terminal (or these pipes) and the session until it ends; the exit code.

    `detached`: in a TTY session the escape key detaches (client/attach.py); once detached, its
    result is the exit code. `attached` (`attach`): a TTY client's SIGHUP or SIGTERM detaches, as
    closing a tmux window does, where `exec` hangs the session up as ssh does; either way the exit
    status is 128 + the signal.
    """
    # An old backend's terminal side decodes the size message with a buffering JSON decoder and
    # drops whatever came in the same read: its input waits for the first output (as OSMO's CLI
    # does) or LEGACY_INPUT_HOLD (client/legacy.py).
    first_output = asyncio.Event()
    hold = first_output if legacy else None
    escape = _escape(stream) if tty and detached is not None else None
    terminal = tty and os.isatty(0)
    sender = asyncio.create_task(
        _send_input(stream, legacy_eof=legacy and not tty, hold=hold, escape=escape, terminal=terminal)
    )
    signals = SignalFrames(stream, tty, detach_on_hang_up=attached)
    stdout = OutputWriter(1)
    unread = _UnreadOutput(stream, signals, stdout, tty)

    async def write_stdout(data: bytes) -> None:
        if legacy:
            first_output.set()
        await stdout.write(data)
        if stdout.reader_gone:
            unread.end_command()

    try:
        return unread.exit_code(await receive_output(stream, write_stdout))
    except (grpc.aio.AioRpcError, RouterError) as err:
        return _ended_early(err, stream, tty, signals, unread, detached, "attach" if attached else "exec")
    finally:
        unread.cancel()
        stdout.close()
        signals.remove()
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender


def _ended_early(
    err: grpc.aio.AioRpcError | RouterError,
    stream: SessionStream,
    tty: bool,
    signals: SignalFrames,
    unread: _UnreadOutput,
    detached: Callable[[], int] | None,
    command: str,
) -> int:
    """The exit code of a session that ended without an exit status: on purpose from here, or broken."""
    was_detached = detached is not None and getattr(stream, "detached", False)
    if signals.hung_up:  # this process was told to end: the session is ended or detached
        if was_detached and detached is not None:
            detached()  # says how to attach again
        return 128 + signals.hung_up
    if was_detached and detached is not None:
        return detached()
    if unread.gave_up:  # ended from here, not broken: 141 (1 after a failed stdout)
        return unread.exit_code(EXIT_CONNECTION_ERROR)
    if isinstance(err, grpc.aio.AioRpcError):
        log.debug("exec stream failed", exc_info=True)
    error = rpc_error(err) if isinstance(err, grpc.aio.AioRpcError) else err
    say(f"{error.message} [{error.code.name}]", command, tty=tty)
    return EXIT_CONNECTION_ERROR


class _UnreadOutput:
    """Ends the remote command once our stdout's reader exited (`osmo-net-client exec ... | head -1`) or
    stdout failed (`> /dev/full`), rather than letting it run on with its output dropped.

    The command gets the SIGPIPE a local producer would (its exit is then 141, as in a local
    pipeline); one that ignores it gets SIGTERM, then SIGKILL, PIPE_GRACE apart. Where signals do
    not reach the command (the old WebSocket protocol carries none) or it outlasts all three, the
    session is ended from here (`gave_up`).
    """

    def __init__(self, stream: SessionStream, signals: SignalFrames, stdout: OutputWriter, tty: bool) -> None:
        self._stream = stream
        self._signals = signals
        self._stdout = stdout
        self._tty = tty
        self._task: asyncio.Task[None] | None = None
        self.gave_up = False

    def end_command(self) -> None:
        """Start ending the command (once); a stdout that failed otherwise than by its reader going is said first."""
        if self._task is not None:
            return
        if (write_error := self._stdout.write_error) is not None:
            say(f"cannot write to stdout: {write_error.strerror or write_error}", "exec", tty=self._tty)
        self._task = asyncio.create_task(self._end())

    def exit_code(self, code: int) -> int:
        """The exit status to give for the session's `code`: 1 after a stdout that failed, as a local
        command that could not write its output (`echo hi > /dev/full`); 141 for a session ended here."""
        if self._stdout.write_error is not None:
            return EXIT_STDOUT_ERROR
        return 128 + signal.SIGPIPE if self.gave_up else code

    def cancel(self) -> None:
        """The session is over: stop ending it."""
        if self._task is not None:
            self._task.cancel()

    async def _end(self) -> None:
        if getattr(self._stream, "carries_signals", True):
            for sig in (signal.SIGPIPE, signal.SIGTERM, signal.SIGKILL):
                self._signals.send(sig)
                await asyncio.sleep(PIPE_GRACE)
        self.gave_up = True
        self._stream.abort()


async def receive_output(stream: SessionStream, write_stdout: Callable[[bytes], Awaitable[None]]) -> int:
    """Write the remote output out (stdout via `write_stdout`, stderr to fd 2) until the end; the exit code."""
    exit_code: int | None = None
    stderr = OutputWriter(2)
    try:
        while (frame := await stream.recv()) is not None:
            kind = frame.WhichOneof("kind")
            if kind == "data":
                started = time.monotonic()
                await write_stdout(frame.data)
                METER.note(time.monotonic() - started)  # stdout not read: the stream is not read either
            elif kind == "stderr":
                await stderr.write(frame.stderr)
            elif kind == "exit_status":
                exit_code = exit_code_of(frame.exit_status)
            elif kind == "error":
                await _read_to_end(stream)
                raise from_status_number(frame.error.code, frame.error.message)
    finally:
        stderr.close()
    if exit_code is None:
        raise RouterError("the session ended without an exit status")
    return exit_code


async def _read_to_end(stream: SessionStream) -> None:
    """After an error frame, take what the peer sent behind it (its half-close) until the end, bounded:
    a resumable session acknowledges it all, so the agent forgets the session at once rather than
    holding it for its resume grace in case the refusal never arrived."""
    with contextlib.suppress(TimeoutError, RouterError, grpc.aio.AioRpcError):
        async with asyncio.timeout(ERROR_SETTLE):
            while await stream.recv() is not None:
                pass


def _escape(stream: SessionStream) -> Callable[[bytes], Awaitable[tuple[bytes, bool]]]:
    """The escape key of a TTY session: the bytes to send, and True once the session detached."""
    from osmo_router.client.attach import EscapeFilter
    from osmo_router.client.resume import ResumingStream

    keys = EscapeFilter()

    async def escape(chunk: bytes) -> tuple[bytes, bool]:
        data, detach = keys.feed(chunk)
        if not detach:
            return data, False
        if data:
            await stream.send_data(data)
        if isinstance(stream, ResumingStream) and await stream.detach():
            return b"", True
        say("this session cannot be detached (it is not resumable); going on")
        return b"", False

    return escape


async def _send_input(
    stream: SessionStream,
    legacy_eof: bool = False,
    hold: asyncio.Event | None = None,
    escape: Callable[[bytes], Awaitable[tuple[bytes, bool]]] | None = None,
    terminal: bool = False,
) -> None:
    """stdin to the session, then its EOF: a half-close, or for an old backend's terminal ^D (client/legacy.py).

    `hold`: wait for it (at most LEGACY_INPUT_HOLD seconds) before the first input. `escape`:
    filters terminal input for the escape key; once it detached, the input ends without EOF.
    `terminal` (stdin is the local terminal, in raw mode): its end is the terminal hanging up, not
    an end of input (^D is a byte in raw mode), so no EOF is sent: the SIGHUP that comes with it
    ends or detaches the session (SignalFrames), and an attached session's shell must not read
    an EOF meanwhile.
    """
    if hold is not None:
        from osmo_router.client.legacy import LEGACY_INPUT_HOLD

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LEGACY_INPUT_HOLD):
                await hold.wait()
    reader = StdinReader(0, chunk_size=BULK_PAYLOAD, linger=BULK_LINGER)
    sent_any, last_byte = False, None
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        while chunk := await reader.read():
            sent_any, last_byte = True, chunk[-1]
            if escape is not None:
                chunk, detached = await escape(chunk)
                if detached:
                    return
                if not chunk:
                    continue
            await stream.send_data(chunk)
        if terminal:
            return
        if legacy_eof:
            from osmo_router.client.legacy import exec_eof

            # An old backend writes an empty message to its terminal as zero bytes: only ^D ends the input.
            await stream.send_data(exec_eof(sent_any, last_byte))
            return
        await stream.send(pb.Frame(half_close=pb.HalfClose()))
