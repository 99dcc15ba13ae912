"""Exec sessions: run a command in the container, in a PTY or with pipes, and report how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable

from osmo_router.agent import pty as ptys
from osmo_router.agent.fdio import read_fd, write_fd
from osmo_router.protocol import CHUNK_SIZE, pb
from osmo_router.transport import SessionStream

log = logging.getLogger(__name__)

#: How long a hung-up process gets before SIGKILL.
HANGUP_GRACE = 2.0
#: How long output may keep flowing after the process exited (a background child holding stdout).
OUTPUT_GRACE = 2.0


def default_shell() -> str:
    """The container's shell: /bin/bash, else /bin/sh."""
    return "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


def exit_frame(returncode: int) -> pb.Frame:
    """The ExitStatus frame for a subprocess return code (negative means killed by a signal)."""
    if returncode < 0:
        return pb.Frame(exit_status=pb.ExitStatus(signal=-returncode))
    return pb.Frame(exit_status=pb.ExitStatus(code=returncode))


async def run_exec(
    stream: SessionStream, init: pb.ExecInit, *, shell: str | None = None, workdir: str | None = None
) -> None:
    """Serve one exec session to its end: output, exit status, half-close."""
    argv = list(init.command) or [shell or default_shell()]
    env = dict(os.environ)
    env.update(init.env)
    if init.tty:
        env["TERM"] = init.term or env.get("TERM") or "xterm-256color"
    if shutil.which(argv[0], path=env.get("PATH")) is None and not os.path.exists(argv[0]):
        await stream.send(pb.Frame(stderr=f"osmo-router agent: {argv[0]}: command not found\n".encode()))
        await _finish(stream, 127)
        return
    runner = _run_tty if init.tty else _run_pipes
    await runner(stream, argv, env, init, workdir)


async def _finish(stream: SessionStream, returncode: int) -> None:
    await stream.send(exit_frame(returncode))
    await stream.send(pb.Frame(half_close=pb.HalfClose()))
    await stream.close()


async def _hang_up(proc: asyncio.subprocess.Process) -> None:
    """SIGHUP the process group, then SIGKILL it if it lingers."""
    if proc.returncode is not None:
        return
    for sig in (signal.SIGHUP, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
    try:
        async with asyncio.timeout(HANGUP_GRACE):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _pump_input(
    stream: SessionStream,
    write: Callable[[bytes], Awaitable[None]],
    close_input: Callable[[], Awaitable[None]],
    signal_group: Callable[[int], None],
    resize: Callable[[int, int], None],
) -> None:
    """Apply the client's frames; returns when the client's stream ends."""
    input_open = True
    while (frame := await stream.recv()) is not None:
        kind = frame.WhichOneof("kind")
        if kind == "data" and input_open:
            await write(frame.data)
        elif kind == "half_close" and input_open:
            input_open = False
            await close_input()
        elif kind == "signal":
            signal_group(frame.signal.number)
        elif kind == "resize":
            resize(frame.resize.size.rows, frame.resize.size.cols)


async def _relay_until_exit(
    stream: SessionStream, proc: asyncio.subprocess.Process, outputs: list[Awaitable[None]], input_pump: Awaitable[None]
) -> None:
    """Run the pumps until the process exits and its output is sent; hang up if the client goes away."""
    output_tasks = [asyncio.ensure_future(o) for o in outputs]
    input_task = asyncio.ensure_future(input_pump)
    exited = asyncio.ensure_future(proc.wait())
    try:
        done, _ = await asyncio.wait({exited, input_task}, return_when=asyncio.FIRST_COMPLETED)
        if input_task in done and not exited.done():
            # The router ended the stream (client gone, or session failed): hang up the process.
            if not input_task.cancelled() and (err := input_task.exception()) is not None:
                log.info("session input failed: %r; hanging up", err)
            else:
                log.info("the router ended the session; hanging up")
            await _hang_up(proc)
            return
        try:
            async with asyncio.timeout(OUTPUT_GRACE):
                await asyncio.gather(*output_tasks)
        except TimeoutError:
            log.info("output still open %.0fs after the process exited; closing it", OUTPUT_GRACE)
        assert proc.returncode is not None
        await _finish(stream, proc.returncode)
        # Keep reading until the router ends the call: cancelling a pending read would cancel the
        # RPC and could drop our last frames in flight.
        with contextlib.suppress(TimeoutError, Exception):
            async with asyncio.timeout(OUTPUT_GRACE):
                await input_task
    finally:
        for task in [*output_tasks, input_task]:
            task.cancel()
        await asyncio.gather(*output_tasks, input_task, return_exceptions=True)
        await _hang_up(proc)


def _killpg(pgid: int, number: int) -> None:
    try:
        os.killpg(pgid, signal.Signals(number))
    except (ValueError, ProcessLookupError, PermissionError) as err:
        log.info("signal %d to group %d: %s", number, pgid, err)


async def _run_pipes(
    stream: SessionStream, argv: list[str], env: dict[str, str], init: pb.ExecInit, workdir: str | None
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=workdir,
        start_new_session=True,
        limit=CHUNK_SIZE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    async def write(data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(data)
            await stdin.drain()

    async def close_input() -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.close()

    async def pump_output(reader: asyncio.StreamReader, is_stderr: bool) -> None:
        while chunk := await reader.read(CHUNK_SIZE):
            await stream.send(pb.Frame(stderr=chunk) if is_stderr else pb.Frame(data=chunk))

    await _relay_until_exit(
        stream,
        proc,
        [pump_output(proc.stdout, False), pump_output(proc.stderr, True)],
        _pump_input(stream, write, close_input, lambda n: _killpg(proc.pid, n), lambda r, c: None),
    )


async def _run_tty(
    stream: SessionStream, argv: list[str], env: dict[str, str], init: pb.ExecInit, workdir: str | None
) -> None:
    master, slave = ptys.open_pty(init.size.rows, init.size.cols)
    try:
        proc = await asyncio.create_subprocess_exec(
            *ptys.with_controlling_tty(argv),
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
        _killpg(pgid, number)

    def resize(rows: int, cols: int) -> None:
        with contextlib.suppress(OSError):
            ptys.set_size(master, rows, cols)

    async def pump_output() -> None:
        while chunk := await read_fd(master, CHUNK_SIZE):
            await stream.send(pb.Frame(data=chunk))

    try:
        await _relay_until_exit(
            stream, proc, [pump_output()], _pump_input(stream, write, close_input, signal_group, resize)
        )
    finally:
        os.close(master)


__all__ = ["default_shell", "exit_frame", "run_exec"]
