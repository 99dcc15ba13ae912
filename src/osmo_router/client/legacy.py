"""`--legacy-backend`: the session key belongs to an old OSMO backend (osmo-ctrl), not to an agent of ours.

An old backend learned from the OSMO service, out of band, what to run or reach: the entry command,
the task port, the rsync modules. It speaks the old router protocol only (docs/migration.md), so a
new client reaching it with the orchestrator's key (`--session-key`) has to speak that protocol too:

- exec: the backend always runs its command in a terminal (user.go userExec); an empty message is
  written to it as zero bytes, so the only end of input it understands is the terminal's EOF
  character. In pipe mode, stdin EOF is sent as ^D (twice when the input did not end a line, as a
  terminal user would type it). Input waits for the first output, or LEGACY_INPUT_HOLD, since
  osmo-user loses bytes that come right behind the size message. The output is the terminal's
  (echo, CRLF) and the exit status is 0 when the backend ends (the old protocol has none). A
  command on the command line cannot be carried: refused.
- port-forward: one control session on the key; each local TCP connection is announced on it as
  one JSON message `{"key": "PORTFORWARD-<hex>", "cookie": ""}` and gets a session of its own on
  that key (ctrl.go userPortForwardTCP / portforwardConnectTCP). An old backend cannot take a
  half-close: a local EOF ends the connection, as OSMO's CLI did, once every byte sent is delivered
  (the router closes the backend behind the data). UDP: each datagram is one message behind a
  6-byte IPv4 address header, on the control session (userPortForwardUDP).
- rsync: the backend forwards to an rsync daemon (module `osmo` = /osmo/run/workspace). The local
  rsync runs in daemon-over-remote-shell mode (`osmo::osmo/PATH`), and `rsync-shell` pipes it through
  one port-forward connection: control on `rsync/{workflow}/client/{key}`, the connection itself on
  the `portforward` operation, where osmo-ctrl dials it (ctrl.go portforwardConnectTCP).

What the old protocol cannot carry is refused with a clear error (EXIT_USAGE).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from osmo_router.client.binds import Bind, bind_all
from osmo_router.client.config import ClientConfig
from osmo_router.client.forward_events import STOP_SIGNALS, Reporter, host_port
from osmo_router.client.notice import say
from osmo_router.transport import SessionStream, Transport
from osmo_router.wire.errors import EXIT_CONNECTION_ERROR, RouterError, Unavailable
from osmo_router.wire.protocol import BULK_CHUNK_SIZE, half_close_frame, pb
from osmo_router.wire.wsproto import connection_key, control_message, parse_udp_message, terminal_eof, udp_message

EXIT_USAGE = 2
#: exec: how long input waits for the old backend's first output. osmo-user decodes the size message
#: with a buffering JSON decoder and loses whatever came in the same read (user.go userExec), so
#: input right behind it could vanish; OSMO's CLI waits for the first output (its shell's prompt).
#: A command that prints nothing first (`cat`) gets its input after this long.
LEGACY_INPUT_HOLD = 1.0
#: port-forward: how long a connection whose local side reached EOF waits for the old backend's end
#: (the router closes it once every byte is delivered; a router older than that passes the EOF on as
#: an empty message, which osmo-ctrl ignores).
LEGACY_EOF_LINGER = 60.0
#: The command rsync gives its remote shell for `HOST::MODULE` (daemon over a remote shell).
DAEMON_COMMAND = ["rsync", "--server", "--daemon", "."]


class LegacyUsageError(Exception):
    """Something an old backend cannot be asked for."""


def exec_eof(sent_any: bool, last_byte: int | None) -> bytes:
    """What stands for stdin EOF on an old backend's terminal (wsproto.terminal_eof)."""
    return terminal_eof(sent_any, last_byte)


def check_exec(command: list[str], env: dict[str, str], workdir: str = "") -> None:
    """An old backend runs the entry command the OSMO service gave it: a command, environment or
    working directory here cannot reach it."""
    if env or workdir:
        flag = "--env" if env else "--workdir"
        raise LegacyUsageError(
            f"an old backend runs the command the OSMO service gave it, where it gave it; {flag} cannot be carried"
        )
    if command:
        raise LegacyUsageError(
            "an old backend runs the command the OSMO service gave it; a command on this command line "
            f"cannot be carried ({' '.join(command)!r}): drop it"
        )


def _init(config: ClientConfig, key: str, remote_port: int = 0) -> pb.PortForwardInit:
    target = pb.SessionTarget(workflow_id=config.workflow_id, task=config.task, session_key=key)
    return pb.PortForwardInit(target=target, protocol=pb.PROTOCOL_TCP, remote_port=remote_port)


async def _abort(stream: SessionStream) -> None:
    """End a session at once (the old protocol has no half-close)."""
    call = getattr(stream, "call", None)
    if call is not None:
        call.cancel()
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class Control:
    """The control session on the orchestrator's key: announces connections, one JSON message each."""

    def __init__(self, transport: Transport, config: ClientConfig, operation: int, remote_port: int = 0) -> None:
        self.transport = transport
        self.config = config
        self.operation = operation
        self.remote_port = remote_port
        self.stream: SessionStream | None = None
        #: Set when something else reads the control session (UDP replies): its end is the loss.
        self.reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> SessionStream:
        init = _init(self.config, self.config.session_key, self.remote_port)
        if self.operation == pb.OPERATION_RSYNC:
            rsync = pb.RsyncInit(target=init.target)
            self.stream = await self.transport.open(pb.OPERATION_RSYNC, rsync)
        else:
            self.stream = await self.transport.open(pb.OPERATION_PORT_FORWARD, init)
        return self.stream

    async def connection(self) -> SessionStream:
        """Announce a new connection and open its session (always the portforward operation: ctrl.go
        portforwardConnectTCP dials `/portforward/{workflow}/backend/{key}`, also for rsync)."""
        assert self.stream is not None
        conn_key = connection_key()
        async with self._lock:
            await self.stream.send_data(control_message(conn_key))
        return await self.transport.open(pb.OPERATION_PORT_FORWARD, _init(self.config, conn_key, self.remote_port))

    async def wait_lost(self) -> RouterError:
        """Wait until the control session ends (the backend or the router went away); say why."""
        assert self.stream is not None
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
            return Unavailable("the old backend ended the forward")
        try:
            while True:
                frame = await self.stream.recv()
                if frame is None:
                    break
                if frame.WhichOneof("kind") == "error":
                    return RouterError(frame.error.message)
        except RouterError as err:
            return err
        except Exception as err:
            return Unavailable(f"the control session broke: {err}")
        return Unavailable("the old backend ended the forward")


async def relay_socket(conn: socket.socket, stream: SessionStream) -> None:
    """One local connection <-> its session, the old way: whichever side ends first ends both.

    A local EOF is a half-close behind the data, not an abort: the router delivers what is still
    queued and then closes the old backend normally (osmo-ctrl takes no half-close), whose end ends
    the session (at most LEGACY_EOF_LINGER later). Aborting dropped the queued frames: the target got
    a short upload and a clean EOF.
    """
    loop = asyncio.get_running_loop()

    async def up() -> bool:
        try:
            while chunk := await loop.sock_recv(conn, BULK_CHUNK_SIZE):
                await stream.send_data(chunk)
        except OSError:
            return False
        return True  # the local EOF

    async def down() -> None:
        with contextlib.suppress(OSError, RouterError):
            while (frame := await stream.recv()) is not None:
                if frame.WhichOneof("kind") == "data":
                    await loop.sock_sendall(conn, frame.data)
                elif frame.WhichOneof("kind") in ("half_close", "error", "exit_status"):
                    return

    upstream, downstream = asyncio.create_task(up()), asyncio.create_task(down())
    pumps = [upstream, downstream]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        at_eof = upstream.done() and not upstream.cancelled() and upstream.exception() is None and upstream.result()
        if at_eof and not downstream.done():
            with contextlib.suppress(Exception):  # (a broken session: the abort below ends it)
                await stream.send(half_close_frame())
                await stream.close()
                await asyncio.wait([downstream], timeout=LEGACY_EOF_LINGER)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await _abort(stream)


# --- port-forward --------------------------------------------------------------------------------


async def run_legacy_forward(
    config: ClientConfig,
    transport: Transport,
    specs: list[tuple[int, int]],
    binds: list[Bind],
    protocol: str,
    reporter: Reporter,
) -> int:
    """Forward one port through an old backend until interrupted (0) or the backend is gone (255)."""
    if len(specs) != 1:
        reporter.notice(
            "usage", "an old backend forwards the one port the OSMO service named for its key: give one SPEC"
        )
        return EXIT_USAGE
    if protocol == "udp":
        binds = [bind for bind in binds if ":" not in bind.address or not bind.best_effort]  # localhost: IPv4
    if protocol == "udp" and any(":" in bind.address for bind in binds):
        reporter.notice("usage", "an old backend's UDP framing carries IPv4 senders only (a 6-byte address header)")
        return EXIT_USAGE
    local_port, remote_port = specs[0]
    control = Control(transport, config, pb.OPERATION_PORT_FORWARD, remote_port)
    try:
        await control.open()
    except RouterError as err:
        reporter.fatal(err, "cannot reach the old backend")
        return EXIT_CONNECTION_ERROR
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    servers: list[Any] = []
    try:
        if protocol == "udp":
            servers = await _listen_udp(control, binds, local_port, remote_port, reporter)
        else:
            servers = await _listen_tcp(control, binds, local_port, remote_port, reporter)
        lost = asyncio.create_task(control.wait_lost())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            lost.cancel()
            return 0
        gone = lost.result()
        reporter.notice(
            "agent_lost", f"the old backend or the router is gone ({gone.message} [{gone.code.name}]); stopping"
        )
        return EXIT_CONNECTION_ERROR
    except OSError as err:
        say(f"cannot listen: {err.strerror or err}", "port-forward", tty=False)
        return 1
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        for server in servers:
            server()
        if control.stream is not None:
            await _abort(control.stream)


async def _listen_tcp(
    control: Control, binds: list[Bind], local_port: int, remote_port: int, reporter: Reporter
) -> list[Callable[[], None]]:
    from osmo_router.client.forward_tcp import listen_tcp

    loop = asyncio.get_running_loop()
    closers: list[Callable[[], None]] = []
    connections: set[asyncio.Task[None]] = set()

    async def handle(conn: socket.socket, peer: str) -> None:
        try:
            try:
                stream = await control.connection()
            except RouterError as err:
                reporter.connection_error("tcp", peer, remote_port, err)
                return
            await relay_socket(conn, stream)
        finally:
            conn.close()

    async def accept(sock: socket.socket) -> None:
        while True:
            conn, addr = await loop.sock_accept(sock)
            conn.setblocking(False)
            task = asyncio.create_task(handle(conn, host_port(str(addr[0]), int(addr[1]))))
            connections.add(task)
            task.add_done_callback(connections.discard)

    async def listen(address: str, port: int) -> int:
        sock = listen_tcp(address, port)
        port = int(sock.getsockname()[1])
        acceptor = asyncio.create_task(accept(sock))

        def close(sock: socket.socket = sock, acceptor: asyncio.Task[None] = acceptor) -> None:
            acceptor.cancel()
            for task in connections:
                task.cancel()
            sock.close()

        closers.append(close)
        reporter.forwarding("tcp", address, port, remote_port)
        return port

    await bind_all(binds, local_port, listen)
    return closers


async def _listen_udp(
    control: Control, binds: list[Bind], local_port: int, remote_port: int, reporter: Reporter
) -> list[Callable[[], None]]:
    """Every datagram is one message on the control session: a 6-byte sender header, then the payload."""
    assert control.stream is not None
    stream = control.stream
    loop = asyncio.get_running_loop()
    transports: list[asyncio.DatagramTransport] = []
    pending: set[asyncio.Future[None]] = set()

    class Local(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            future = asyncio.ensure_future(stream.send_data(udp_message(data, (addr[0], addr[1]))))
            pending.add(future)
            future.add_done_callback(pending.discard)

    async def listen(address: str, port: int) -> int:
        transport, _ = await loop.create_datagram_endpoint(Local, local_addr=(address, port))
        transports.append(transport)
        port = int(transport.get_extra_info("sockname")[1])
        reporter.forwarding("udp", address, port, remote_port)
        return port

    await bind_all(binds, local_port, listen)

    async def replies() -> None:
        with contextlib.suppress(RouterError):
            while (frame := await stream.recv()) is not None:
                if frame.WhichOneof("kind") != "data":
                    continue
                try:
                    payload, sender = parse_udp_message(frame.data)
                except RouterError:
                    continue  # shorter than its header: nobody to send it to
                transports[0].sendto(payload, sender)

    # The control session's only reader: the replies; their end is the loss of the backend.
    reply_task = asyncio.create_task(replies())
    control.reader = reply_task

    def close() -> None:
        reply_task.cancel()
        for transport in transports:
            transport.close()

    return [close]


# --- rsync ---------------------------------------------------------------------------------------


async def run_legacy_rsync_shell(
    config: ClientConfig, transport: Transport, server_args: list[str], write_stdout: Callable[[bytes], Awaitable[None]]
) -> int:
    """rsync-shell for an old backend: stdin/stdout through one port-forward connection to its rsync daemon."""
    if server_args[:3] != DAEMON_COMMAND[:3]:
        raise LegacyUsageError("an old backend serves an rsync daemon; expected `rsync --server --daemon`")
    control = Control(transport, config, pb.OPERATION_RSYNC)
    await control.open()
    try:
        stream = await control.connection()
        return await _bridge_stdio(stream, write_stdout)
    finally:
        if control.stream is not None:
            await _abort(control.stream)


async def _bridge_stdio(stream: SessionStream, write_stdout: Callable[[bytes], Awaitable[None]]) -> int:
    """stdin -> session, session -> stdout, until the daemon's side ends (exit 0: rsync judges the transfer).

    `write_stdout` must not block the loop (rsync's end of the pipe may be non-blocking and full).
    """
    from osmo_router.client.stdio import StdinReader

    reader = StdinReader(0, chunk_size=BULK_CHUNK_SIZE)

    async def up() -> None:
        while chunk := await reader.read():
            await stream.send_data(chunk)

    async def down() -> None:
        while (frame := await stream.recv()) is not None:
            if frame.WhichOneof("kind") == "data":
                await write_stdout(frame.data)
            elif frame.WhichOneof("kind") in ("half_close", "exit_status"):
                return
            elif frame.WhichOneof("kind") == "error":
                raise RouterError(frame.error.message)

    upstream = asyncio.create_task(up())
    try:
        await down()
    finally:
        upstream.cancel()
        await asyncio.gather(upstream, return_exceptions=True)
        await _abort(stream)
    return 0
