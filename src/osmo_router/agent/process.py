"""A session's process: spawn it, relay its pumps until it exits, hang it up, report how it ended.

Shared by the agent's exec (PTY or pipes) and rsync sessions (through exec's run_piped).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from osmo_router.resume.stream import ResumableStream
from osmo_router.transport import SessionStream
from osmo_router.wire.protocol import pb

log = logging.getLogger(__name__)

#: How long a hung-up process gets before SIGKILL.
HANGUP_GRACE = 2.0
#: How long output may keep flowing after the process exited (a background child holding stdout).
OUTPUT_GRACE = 2.0


#: What a terminal's user sends a command (Ctrl-C, Ctrl-\, the hang-up), and what `nohup` or a
#: script's background job leaves ignored.
USER_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing: the agent goes on as if the signal were still ignored."""


def default_signals_for_commands() -> None:
    """Let the commands the agent starts take SIGINT, SIGQUIT and SIGHUP by default, as a fresh
    process in the container would, even when the agent itself was started with them ignored.

    exec(2) keeps an ignored signal ignored and resets a handled one to its default, so an agent run
    under `nohup` or as a script's background job would start shells that Ctrl-C cannot stop and
    that outlive their terminal's hang-up. Each such signal gets a handler that does nothing: the
    agent still shrugs it off, its children do not inherit it. (A preexec_fn would reset it in the
    child, but the agent runs no Python between fork and exec: see pty.with_controlling_tty.)
    Call from the main thread before the first spawn.
    """
    for sig in USER_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, _ignore)


def exit_frame(returncode: int) -> pb.Frame:
    """The ExitStatus frame for a subprocess return code (negative means killed by a signal)."""
    if returncode < 0:
        return pb.Frame(exit_status=pb.ExitStatus(signal=-returncode))
    return pb.Frame(exit_status=pb.ExitStatus(code=returncode))


class SpawnError(OSError):
    """The command could not be started: the OSError (or the ValueError, as EINVAL) of the spawn."""


async def spawn(argv: list[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """create_subprocess_exec; raises SpawnError if the command could not be started."""
    try:
        return await asyncio.create_subprocess_exec(*argv, **kwargs)
    except OSError as err:
        raise SpawnError(err.errno, err.strerror, err.filename) from err
    except ValueError as err:  # NUL or a bad environment name that got past request_error
        raise SpawnError(errno.EINVAL, str(err)) from err


async def finish(stream: SessionStream, returncode: int) -> None:
    """End a session whose process exited: its exit status, then a half-close, then the end of the stream."""
    await stream.send(exit_frame(returncode))
    await stream.send(pb.Frame(half_close=pb.HalfClose()))
    await stream.close()


async def hang_up(proc: asyncio.subprocess.Process) -> None:
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


async def pump_input(
    stream: SessionStream,
    write: Callable[[bytes], Awaitable[None]],
    close_input: Callable[[], Awaitable[None]],
    signal_group: Callable[[int], None],
    resize: Callable[[pb.Resize], Awaitable[None]],
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
            await resize(frame.resize)


async def relay_until_exit(
    stream: SessionStream, proc: asyncio.subprocess.Process, outputs: list[Awaitable[None]], input_pump: Awaitable[None]
) -> None:
    """Run the pumps until the process exits and its output is sent; hang up if the client goes away."""
    output_tasks = [asyncio.ensure_future(o) for o in outputs]
    input_task = asyncio.ensure_future(input_pump)
    exited = asyncio.ensure_future(proc.wait())
    # A resumable session lost (its grace passed) ends the process even while the input pump is stuck
    # writing to a process that does not read its input: the pump would never see the loss.
    lost = asyncio.ensure_future(stream.wait_lost()) if isinstance(stream, ResumableStream) else None
    try:
        waiting = {exited, input_task} if lost is None else {exited, input_task, lost}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if (input_task in done or lost in done) and not exited.done():
            # The router ended the stream (client gone, or session failed): hang up the process.
            if input_task.done() and not input_task.cancelled() and (err := input_task.exception()) is not None:
                log.info("session input failed: %r; hanging up", err)
            elif lost in done:
                log.info("the session was lost; hanging up")
            else:
                log.info("the router ended the session; hanging up")
            await hang_up(proc)
            return
        try:
            async with asyncio.timeout(OUTPUT_GRACE):
                await asyncio.gather(*output_tasks)
        except TimeoutError:
            log.info("output still open %.0fs after the process exited; closing it", OUTPUT_GRACE)
        assert proc.returncode is not None
        await finish(stream, proc.returncode)
        if not isinstance(stream, ResumableStream):
            # Keep reading until the router ends the call: cancelling a pending read would cancel the
            # RPC and could drop our last frames in flight. (A resumable stream keeps its call open
            # for acknowledgements until its `finish` (agent/held.py) saw everything acknowledged:
            # waiting here for the call's end only waited out OUTPUT_GRACE, 2 s on every exec.)
            with contextlib.suppress(TimeoutError, Exception):
                async with asyncio.timeout(OUTPUT_GRACE):
                    await input_task
    finally:
        tasks = [*output_tasks, input_task] if lost is None else [*output_tasks, input_task, lost]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await hang_up(proc)


def killpg(pgid: int, number: int) -> None:
    """Send the client's signal `number` to a process group; one that cannot be sent is logged, not raised."""
    try:
        os.killpg(pgid, signal.Signals(number))
    except (ValueError, ProcessLookupError, PermissionError) as err:
        log.info("signal %d to group %d: %s", number, pgid, err)


__all__ = [
    "HANGUP_GRACE",
    "OUTPUT_GRACE",
    "SpawnError",
    "exit_frame",
    "finish",
    "hang_up",
    "killpg",
    "pump_input",
    "relay_until_exit",
    "spawn",
]
