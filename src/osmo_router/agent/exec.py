"""Exec sessions: run a command in the container, in a PTY or with pipes, and report how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil

import grpc

from osmo_router.agent import pty as ptys
from osmo_router.agent.fdio import gather_more, open_pipe, read_fd, read_now, wait_readable, write_fd
from osmo_router.agent.process import SpawnError, finish, hang_up, killpg, pump_input, relay_until_exit, spawn
from osmo_router.cli.logs import cut
from osmo_router.io.pipe_writer import PipeWriter
from osmo_router.transport import SessionStream
from osmo_router.wire.codec import BULK_PAYLOAD
from osmo_router.wire.protocol import BULK_CHUNK_SIZE, BULK_LINGER, CHUNK_SIZE, pb

log = logging.getLogger(__name__)

#: How long a terminal keeps the passing size that makes its program redraw (see _redraw).
REDRAW_PAUSE = 0.05


def default_shell() -> str:
    """The container's shell: /bin/bash, else /bin/sh."""
    return "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


def request_error(init: pb.ExecInit) -> str | None:
    """Why an exec request cannot be run as asked (the client gets INVALID_ARGUMENT), or None.

    Checked before anything is opened: a TTY's rows and columns must fit the kernel's 16-bit
    window size (0 means the default 24x80); environment names must be non-empty and hold neither
    `=` nor NUL; values, the command's arguments and TERM must not hold NUL (execve cannot pass it).
    """
    if init.tty and (problem := ptys.size_error(init.size.rows, init.size.cols)) is not None:
        return problem
    for name, value in init.env.items():
        if not name or "=" in name or "\0" in name:
            return f"environment variable name {name[:64]!r} is invalid: it must be non-empty, without '=' or NUL"
        if "\0" in value:
            return f"environment variable {name[:64]} holds a NUL character"
    if any("\0" in arg for arg in init.command):
        return "the command holds a NUL character"
    if "\0" in init.term:
        return "TERM holds a NUL character"
    if "\0" in init.workdir:
        return "the working directory holds a NUL character"
    return None


async def run_exec(
    stream: SessionStream, init: pb.ExecInit, *, shell: str | None = None, workdir: str | None = None
) -> None:
    """Serve one exec session to its end: output, exit status, half-close.

    A request that cannot be run (request_error) is refused with INVALID_ARGUMENT before any
    descriptor is opened; a `--workdir` that cannot be entered is FAILED_PRECONDITION. A command
    that does not exist exits 127 and one that cannot be executed 126, with the reason on stderr,
    as in a shell. Every descriptor opened for the session (PTY pair, pipes) is closed on every
    path, the failed ones included.
    """
    if (problem := request_error(init)) is not None:
        await _refuse(stream, grpc.StatusCode.INVALID_ARGUMENT, problem)
        return
    argv = list(init.command) or [shell or default_shell()]
    # The client's --workdir, relative to the agent's own (an absolute one stands alone).
    flag = "exec --workdir" if init.workdir else "agent --workdir"
    workdir = os.path.join(workdir or os.getcwd(), init.workdir) if init.workdir else workdir
    env = dict(os.environ)
    env.update(init.env)
    if init.tty:
        env["TERM"] = init.term or env.get("TERM") or "xterm-256color"
    if workdir and not os.path.isdir(workdir):
        reason = "not a directory" if os.path.exists(workdir) else "no such directory"
        await _refuse(stream, grpc.StatusCode.FAILED_PRECONDITION, _workdir_message(workdir, reason, flag))
        return
    if shutil.which(argv[0], path=env.get("PATH")) is None and not os.path.exists(argv[0]):
        end = "\r\n" if init.tty else "\n"  # on the client's raw terminal a bare "\n" does not return the line
        await stream.send(pb.Frame(stderr=f"osmo-router agent: {argv[0]}: command not found{end}".encode()))
        await finish(stream, 127)
        return
    try:
        if init.tty:
            await _run_tty(stream, argv, env, init, workdir)
        else:
            # Piped exec carries bulk data too (`tar c | osmo exec -- tar x`): large pipes and frames (a
            # small write, a keystroke or a prompt, still goes at once). run_piped keeps stdout and
            # stderr in the order they were written.
            await run_piped(
                stream, argv, env, workdir, chunk_size=BULK_PAYLOAD, pipe_size=BULK_CHUNK_SIZE, linger=BULK_LINGER
            )
    except SpawnError as err:
        reason = err.strerror or str(err)
        if workdir and err.filename == workdir:
            await _refuse(stream, grpc.StatusCode.FAILED_PRECONDITION, _workdir_message(workdir, reason, flag))
            return
        log.info("exec %s: %s", argv[0], reason)
        await stream.send(pb.Frame(stderr=f"osmo-router agent: {argv[0]}: {reason}\n".encode()))
        await finish(stream, 127 if err.errno == errno.ENOENT else 126)


def _workdir_message(workdir: str, reason: str, flag: str) -> str:
    whose = "the" if flag.startswith("exec") else "the agent's"
    return f"{whose} working directory {workdir} cannot be entered: {reason} ({flag})"


async def _refuse(stream: SessionStream, code: grpc.StatusCode, message: str) -> None:
    """Report an error, then end our direction (a half-close before the end)."""
    log.info("exec refused: %s", message)
    await stream.send_error(code, message)
    await stream.send(pb.Frame(half_close=pb.HalfClose()))
    await stream.close()


class IgnoredResizes:
    """The log of a session's resizes the terminal refused: the first one, cut; the rest only counted.

    A client sends as many resizes as it likes, each with sizes of its choosing: one log line per
    refused resize let it write the agent's log at its own rate.
    """

    def __init__(self) -> None:
        self.count = 0

    def note(self, rows: int, cols: int, err: Exception) -> None:
        """A resize to rows x cols was refused with `err`: log it if it is the session's first."""
        self.count += 1
        if self.count == 1:
            log.info(
                "resize to %dx%d ignored: %s (later ones of this session are not logged)", rows, cols, cut(str(err))
            )


async def _no_terminal(_request: pb.Resize) -> None:
    """A piped session has no terminal to resize."""


async def _redraw(master: int, rows: int, cols: int) -> None:
    """Make the program on the terminal draw its screen again (an attached client sees nothing until it
    does), by changing the terminal's size for REDRAW_PAUSE and back.

    A SIGWINCH alone is not enough: bash's line editor, for one, redraws only when the size it reads
    differs from the last. So the size changes by one column for long enough for the program to read
    it (it draws twice, the second time at the right size).
    """
    ptys.set_size(master, rows, cols - 1 if cols == ptys.MAX_SIZE else cols + 1)
    await asyncio.sleep(REDRAW_PAUSE)
    ptys.set_size(master, rows, cols)


async def run_piped(
    stream: SessionStream,
    argv: list[str],
    env: dict[str, str] | None,
    workdir: str | None,
    *,
    chunk_size: int = CHUNK_SIZE,
    pipe_size: int | None = None,
    linger: float = 0.0,
) -> None:
    """Run argv with pipes: stdin from data frames, stdout and stderr as data and stderr frames, then the exit
    status and half-close (exec without a TTY, and rsync --server). Raises OSError if argv cannot be started.

    stdin and stdout are plain pipes driven with non-blocking writes and reads of up to `chunk_size`
    (no stream buffers in between: a frame's payload goes to the pipe without a copy). For bulk
    transfers (rsync), `pipe_size` enlarges the pipes and `linger` lets a streaming output fill
    larger frames (see fdio.gather_more): fewer wake-ups and messages.

    Every descriptor opened here is closed on every path (failed spawn, cancellation, errors).
    """
    owned: list[int] = []  # opened here and not yet closed or handed over
    try:
        stdin_r, stdin_w, stdout_r, stdout_w = _open_pipes(pipe_size, owned)
        try:
            proc = await spawn(
                argv,
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=workdir,
                start_new_session=True,
                limit=CHUNK_SIZE,
            )
        finally:
            # The child has its own copies of its ends.
            for fd in (stdin_r, stdout_w):
                owned.remove(fd)
                os.close(fd)
        try:
            stdin = PipeWriter(stdin_w, name="stdin-writer")  # owns stdin_w from here on
        except BaseException:
            await hang_up(proc)
            raise
        owned.remove(stdin_w)
        await _relay_piped(stream, proc, stdin, stdout_r, chunk_size, linger)
    finally:
        for fd in owned:
            os.close(fd)


def _open_pipes(pipe_size: int | None, owned: list[int]) -> tuple[int, int, int, int]:
    """run_piped's stdin and stdout pipes (read end, write end of each), added to `owned` as each opens;
    stdout's read end does not block. Raises SpawnError if one cannot be opened."""
    try:
        stdin_r, stdin_w = open_pipe(pipe_size)
        owned.extend((stdin_r, stdin_w))
        stdout_r, stdout_w = open_pipe(pipe_size)
        owned.extend((stdout_r, stdout_w))
        os.set_blocking(stdout_r, False)
    except OSError as err:  # out of descriptors, say
        raise SpawnError(err.errno, f"cannot open a pipe: {err.strerror}") from err
    return stdin_r, stdin_w, stdout_r, stdout_w


async def _relay_piped(
    stream: SessionStream,
    proc: asyncio.subprocess.Process,
    stdin: PipeWriter,
    stdout_r: int,
    chunk_size: int,
    linger: float,
) -> None:
    """run_piped's relay; closes stdin (the writer) at its end, stdout_r is the caller's."""
    assert proc.stderr is not None

    async def write(data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stdin.write(data)

    async def close_input() -> None:
        stdin.close()

    # stdout and stderr are two pipes. What the process wrote to stdout before it wrote to stderr
    # is in the stdout pipe by the time stderr is read, so stdout is drained before each stderr
    # chunk is sent: the order survives where the two are merged (the old WebSocket protocol).
    output_order = asyncio.Lock()

    async def pump_stdout() -> None:
        while True:
            await wait_readable(stdout_r)
            async with output_order:
                chunk = read_now(stdout_r, chunk_size)
                if chunk is None:
                    continue  # the stderr pump sent it
                if not chunk:
                    return
                await stream.send_data(await gather_more(stdout_r, chunk, chunk_size, linger))

    async def pump_stderr(reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(CHUNK_SIZE):
            async with output_order:
                while pending := read_now(stdout_r, chunk_size):
                    await stream.send_data(pending)
                await stream.send(pb.Frame(stderr=chunk))

    try:
        await relay_until_exit(
            stream,
            proc,
            [pump_stdout(), pump_stderr(proc.stderr)],
            pump_input(stream, write, close_input, lambda n: killpg(proc.pid, n), _no_terminal),
        )
    finally:
        await close_input()


async def _run_tty(
    stream: SessionStream, argv: list[str], env: dict[str, str], init: pb.ExecInit, workdir: str | None
) -> None:
    try:
        master, slave = ptys.open_pty(init.size.rows, init.size.cols)  # both closed again if it fails
    except OSError as err:  # out of descriptors or terminals, say
        raise SpawnError(err.errno, f"cannot open a terminal: {err.strerror}") from err
    try:
        await _serve_tty(stream, master, slave, argv, env, workdir)
    finally:
        os.close(master)


async def _serve_tty(
    stream: SessionStream, master: int, slave: int, argv: list[str], env: dict[str, str], workdir: str | None
) -> None:
    """_run_tty's spawn and relay; closes the slave, the master is the caller's."""
    try:
        proc = await spawn(
            ptys.with_controlling_tty(argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=workdir,
        )
    finally:
        os.close(slave)

    async def write(data: bytes) -> None:
        with contextlib.suppress(OSError):
            await write_fd(master, data)

    async def close_input() -> None:
        await write(ptys.eof_char(master))

    def signal_group(number: int) -> None:
        try:
            pgid = os.tcgetpgrp(master)
        except OSError:
            pgid = proc.pid
        killpg(pgid, number)

    ignored = IgnoredResizes()

    async def resize(request: pb.Resize) -> None:
        rows, cols = request.size.rows, request.size.cols
        try:
            changed = ptys.set_size(master, rows, cols)
            if request.redraw and not changed and rows and cols:
                await _redraw(master, rows, cols)
        except (OSError, ValueError) as err:  # a size out of range is ignored, the session goes on
            ignored.note(rows, cols, err)

    async def pump_output() -> None:
        while chunk := await read_fd(master, CHUNK_SIZE):
            await stream.send(pb.Frame(data=chunk))

    await relay_until_exit(stream, proc, [pump_output()], pump_input(stream, write, close_input, signal_group, resize))


__all__ = ["SpawnError", "default_shell", "request_error", "run_exec", "run_piped"]
