"""`osmo-net-client rsync-shell`: the remote shell the local rsync runs, bridging its pipes to an Rsync session.

rsync starts its remote shell as `SHELL [-l USER] HOST rsync --server ...` and speaks its protocol
over the shell's stdin and stdout. This command opens an Rsync session whose init carries that
server command line, then copies stdin to data frames and data frames to stdout until the agent
reports how `rsync --server` ended. The router address, workflow and token come from the OSMO_*
environment set by `osmo-net-client rsync`, so the token never appears in a process listing.

When rsync exits on an error it sends its remote shell SIGUSR1 and does not wait for it (rsync's
cleanup.c: `kill_all(SIGUSR1)` once `exit_code` is set). ssh dies of it; this shell instead takes
what is still on its way for up to RSYNC_EXIT_SETTLE seconds: the remote rsync's last words on
stderr (`mkdir "/x" failed: No such file or directory`, often sent just before the protocol's
exit message that made rsync quit) and its exit status. `osmo-net-client rsync` waits for that
before it returns, so the message is printed before the prompt comes back.

Exit status: the remote rsync's; 127 when rsync is missing in the container (rsync itself then says
"remote command not found"); 255 when the session could not be made, or broke and could not be
resumed within --resume-grace (OSMO_RESUME_GRACE; like ssh).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shlex
import signal
import stat
from collections.abc import Awaitable, Callable

import grpc

from osmo_router.client.config import ClientConfig
from osmo_router.client.exec import receive_output
from osmo_router.client.notice import say
from osmo_router.client.resume import give_up
from osmo_router.client.resume_start import open_stream
from osmo_router.client.session import rpc_error
from osmo_router.client.stdio import OutputWriter, StdinReader
from osmo_router.io.pipe_writer import PipeWriter
from osmo_router.transport import WS, SessionStream
from osmo_router.transport.grpc_transport import GrpcTransport
from osmo_router.transport.rollout import ws_transport
from osmo_router.wire.codec import BULK_PAYLOAD
from osmo_router.wire.errors import EXIT_CONNECTION_ERROR, FailedPrecondition, RouterError
from osmo_router.wire.protocol import BULK_CHUNK_SIZE, pb

#: Exit status when rsync is missing in the container (rsync reports "remote command not found").
EXIT_COMMAND_NOT_FOUND = 127
#: Environment variable naming the file where the shell records a transport failure for `osmo-net-client rsync`.
STATUS_FILE_ENV = "OSMO_RSYNC_STATUS_FILE"
#: Bytes read from rsync per data frame: large frames keep the per-message cost of three hops small.
READ_SIZE = BULK_PAYLOAD
#: How long a bulk read waits for more of rsync's output to fill a frame (small reads never wait).
LINGER = 0.001
#: Signals that end the transfer from this side (the terminal closed, the command stopped, Ctrl-C): the
#: session is ended for the agent too (client/resume.py give_up), not left to its resume grace.
ENDING_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
#: Longest this shell goes on after rsync's SIGUSR1 (see the module docstring).
RSYNC_EXIT_SETTLE = 3.0


def parse_remote_command(args: list[str]) -> list[str]:
    """The server argv from what rsync gives its remote shell: `[-l USER] HOST WORD...`.

    rsync (3.2.4 and later) escapes the words for the remote login shell that ssh would run them
    with: ssh joins its arguments with spaces and that shell splits them again. Do the same split
    (quotes and backslashes only: no variables, globs or command substitution). Raises ValueError.
    """
    words = list(args)
    if len(words) >= 2 and words[0] == "-l":
        words = words[2:]
    if len(words) < 2:
        raise ValueError("expected HOST and a command (this is the remote shell of `osmo-net-client rsync`)")
    return shlex.split(" ".join(words[1:]))


async def run_rsync_shell(config: ClientConfig, args: list[str]) -> int:
    """Bridge stdin/stdout to an Rsync session; returns the exit status (see the module docstring)."""
    try:
        server_args = parse_remote_command(args)
        for arg in server_args:
            arg.encode("utf-8")  # the session carries the command as text
    except UnicodeEncodeError:
        say("the remote command is not UTF-8 text (a path?), which the session cannot carry", "rsync", tty=False)
        report_failure(EXIT_CONNECTION_ERROR)
        return EXIT_CONNECTION_ERROR
    except ValueError as err:
        say(f"cannot parse the remote command: {err}", "rsync", tty=False)
        report_failure(EXIT_CONNECTION_ERROR)
        return EXIT_CONNECTION_ERROR
    if config.legacy_backend:
        return await _run_legacy(config, server_args)
    if config.transport == WS:
        return await _run_over_websocket(config, server_args)
    # Its own channel (this is a process of its own), and a resumable session like exec's: a break
    # under rsync (router restarted, network cut) is repaired without rsync noticing (issue 17).
    transport = GrpcTransport(config)
    try:
        init = pb.RsyncInit(target=config.target(), server_args=server_args)
        stream = await open_stream(transport, config, pb.OPERATION_RSYNC, init)
        return await _bridge(stream)
    except grpc.aio.AioRpcError as err:
        return _fail(rpc_error(err))
    except RouterError as err:
        return _fail(err)
    finally:
        await transport.aclose()


async def _run_over_websocket(config: ClientConfig, server_args: list[str]) -> int:
    """The same bridge over the old router's WebSocket protocol (the `exit=1` extension keeps the exit status)."""
    transport = ws_transport(config)
    try:
        init = pb.RsyncInit(target=config.target(), server_args=server_args)
        stream = await transport.open(pb.OPERATION_RSYNC, init)
        return await _bridge(stream)
    except RouterError as err:
        return _fail(err)
    finally:
        await transport.aclose()


async def _run_legacy(config: ClientConfig, server_args: list[str]) -> int:
    """An old OSMO backend: rsync's daemon protocol through one of its port-forward connections (client/legacy.py)."""
    from osmo_router.client.legacy import LegacyUsageError, run_legacy_rsync_shell
    from osmo_router.transport.rollout import connect_transport

    transport = await connect_transport(config)
    try:
        return await run_legacy_rsync_shell(config, transport, server_args, _stdout_writer())
    except LegacyUsageError as err:
        say(str(err), "rsync", tty=False)
        report_failure(EXIT_CONNECTION_ERROR)
        return EXIT_CONNECTION_ERROR
    except RouterError as err:
        return _fail(err)
    finally:
        await transport.aclose()


def _fail(err: RouterError) -> int:
    say(f"{err.message} [{err.code.name}]", "rsync", tty=False)
    code = EXIT_COMMAND_NOT_FOUND if isinstance(err, FailedPrecondition) else EXIT_CONNECTION_ERROR
    report_failure(code)
    return code


def report_failure(code: int) -> None:
    """Tell `osmo-net-client rsync` why the transport failed (rsync may see the closed pipe before our exit
    status, and then reports a generic protocol error instead)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(f"{code}\n")


async def _bridge(stream: SessionStream) -> int:
    loop = asyncio.get_running_loop()
    sender = asyncio.create_task(_send_stdin(stream))
    receiver = asyncio.ensure_future(receive_output(stream, _stdout_writer()))
    cut_off: list[asyncio.TimerHandle] = []

    def rsync_exiting() -> None:
        # rsync quit on an error (its stdin, our stdout, is closed; ours reaches EOF and is half-closed):
        # take the remote rsync's stderr and exit status, bounded.
        if not cut_off:
            cut_off.append(loop.call_later(RSYNC_EXIT_SETTLE, receiver.cancel))

    ended_by: list[int] = []

    def told_to_end(sig: int) -> None:
        # The terminal closed (SIGHUP), the command was stopped (SIGTERM) or Ctrl-C (SIGINT to the
        # terminal's process group, rsync with it): the remote
        # rsync is ended now, not held by the agent for its resume grace as after a break.
        if not ended_by:
            ended_by.append(sig)
            receiver.cancel()

    loop.add_signal_handler(signal.SIGUSR1, rsync_exiting)
    for sig in ENDING_SIGNALS:
        loop.add_signal_handler(sig, told_to_end, int(sig))
    try:
        return await receiver
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this shell is being stopped, not just the wait after rsync's SIGUSR1
        if ended_by:
            await give_up(stream, "the client's rsync was stopped")
            return 128 + ended_by[0]
        return EXIT_CONNECTION_ERROR  # the remote side did not end within RSYNC_EXIT_SETTLE
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        for sig in ENDING_SIGNALS:
            loop.remove_signal_handler(sig)
        for handle in cut_off:
            handle.cancel()
        receiver.cancel()
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender


def _stdout_writer() -> Callable[[bytes], Awaitable[None]]:
    """Write stdout without blocking the event loop when it is rsync's pipe or socket.

    A blocking write while rsync is busy would stall the loop, and with it the copy of rsync's own
    output to the router: both sides would wait on each other. A pipe is enlarged to a bulk frame,
    and what does not fit at once is written by PipeWriter's thread (one wake-up per frame). A
    reader that went away is ignored: rsync reports its own errors.
    """
    mode = os.fstat(1).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return OutputWriter(1).write  # not rsync's own (a test's file or terminal): left blocking
    if stat.S_ISFIFO(mode):
        with contextlib.suppress(OSError):  # beyond the system's pipe-max-size the size stays
            fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, BULK_CHUNK_SIZE)
    writer = PipeWriter(1, name="stdout-writer")

    async def write(data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await writer.write(data)

    return write


async def _send_stdin(stream: SessionStream) -> None:
    # On a gRPC stream the reader thread hands over finished messages (one copy per frame).
    framed = stream.raw
    reader = StdinReader(0, depth=8, chunk_size=READ_SIZE, gather=True, linger=LINGER, framed=framed)
    send = stream.send_data_message if framed else stream.send_data
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        while chunk := await reader.read():
            await send(chunk)
        await stream.send(pb.Frame(half_close=pb.HalfClose()))
