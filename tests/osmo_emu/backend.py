"""OSMO's backend (osmo-ctrl and osmo-user, Go) as a process: `python -m tests.osmo_emu.backend OP ...`.

Follows NVIDIA/OSMO `src/runtime/cmd/ctrl/ctrl.go` and `src/runtime/cmd/user/user.go` (see
docs/migration.md for the protocol). The Go code dials with gorilla/websocket's DefaultDialer (no
compression, no read limit) and ends a connection with `conn.Close()`, which drops the TCP
connection without a close frame: `_drop` does the same, so the router sees an abnormal closure
(1006), as it would from the real backend. Each operation prints `{"event": "connected"}` on stderr
once its first WebSocket is open (the harness waits for it) and `{"event": "done"}` at its end.

The out-of-band part (the OSMO service telling osmo-ctrl the action, key, cookie, command and port
over its own WebSocket, `pingPang`) is replaced by this command's arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import termios
from typing import Any

import websockets
import websockets.client
import websockets.exceptions

#: ctrl.go `BUFFERSIZE`: the read size of portforwardConnectTCP and readUDP.
BUFFERSIZE = 32 * 1024
#: ctrl.go ctrlUserExec: `data := make([]byte, 1024)`, the read size of the exec output.
EXEC_READ = 1024
RESIZE_PREFIX = b"\x00RESIZE:"
Conn = websockets.client.WebSocketClientProtocol


def event(name: str, **fields: Any) -> None:
    """One JSON line on stderr for the test harness."""
    sys.stderr.write(json.dumps({"event": name, **fields}) + "\n")
    sys.stderr.flush()


class Dialer:
    """ctrl.go createWebsocketConnection: the token header (`Bearer ` only for Authorization) and the cookie."""

    def __init__(self, token: str = "", token_header: str = "Authorization", retry_delay: float = 1.0) -> None:
        self.token = token
        self.token_header = token_header
        self.retry_delay = retry_delay

    async def dial(self, url: str, cookie: str, retry_max: int) -> Conn | None:
        """The retry loops of every ctrl.go caller: `retryMax` attempts, one second apart; None if all failed."""
        headers: dict[str, str] = {"Cookie": cookie}
        if self.token:
            value = f"Bearer {self.token}" if self.token_header.lower() == "authorization" else self.token
            headers[self.token_header] = value
        last: Exception | None = None
        for _ in range(retry_max):
            try:
                return await websockets.client.connect(
                    url, extra_headers=headers, compression=None, max_size=None, ping_interval=None
                )
            except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as err:
                last = err
                await asyncio.sleep(self.retry_delay)
        event("dial failed", url=url, error=str(last))
        return None


async def _drop(ws: Conn) -> None:
    """gorilla's `conn.Close()`: close the TCP connection, no close frame."""
    if ws.transport is not None:
        ws.transport.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.wait_closed(), 5)


async def _recv(ws: Conn) -> bytes | None:
    """gorilla `ReadMessage`: the next message's bytes (text or binary alike), None on any error or close."""
    try:
        data = await ws.recv()
    except websockets.exceptions.ConnectionClosed:
        return None
    return data.encode() if isinstance(data, str) else data


# --- exec: ctrl.go ctrlUserExec + user.go userExec ---------------------------------------------


def _decode_size(stream: bytes) -> tuple[int, int] | None:
    """user.go userExec: `json.NewDecoder(connReader).Decode(&initSize)`, fields matched case-insensitively."""
    try:
        value, _ = json.JSONDecoder().raw_decode(stream.decode(errors="replace"))
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    fields = {str(k).lower(): v for k, v in value.items()}
    return int(fields.get("rows", 0)) & 0xFFFF, int(fields.get("cols", 0)) & 0xFFFF


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class _ResizeParser:
    """user.go userExec's reader goroutine: bytes to the terminal, `\\x00RESIZE:{...}` sequences applied."""

    def __init__(self, master: int, proc: subprocess.Popen[bytes]) -> None:
        self.master = master
        self.proc = proc
        self.carry = b""

    def feed(self, chunk: bytes) -> None:
        data, self.carry = self.carry + chunk, b""
        while data:
            idx = data.find(b"\x00")
            if idx == -1:
                os.write(self.master, data)
                return
            if idx > 0:
                os.write(self.master, data[:idx])
                data = data[idx:]
            if len(data) < len(RESIZE_PREFIX):
                self.carry = data
                return
            if not data.startswith(RESIZE_PREFIX):
                os.write(self.master, data[:1])
                data = data[1:]
                continue
            end = data.find(b"}", len(RESIZE_PREFIX))
            if end == -1:
                self.carry = data
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                size = json.loads(data[len(RESIZE_PREFIX) : end + 1])
                _set_size(self.master, int(size["Rows"]), int(size["Cols"]))
                self.proc.send_signal(signal.SIGWINCH)
            data = data[end + 1 :]


async def ctrl_user_exec(dialer: Dialer, base: str, workflow: str, key: str, cookie: str, entry_command: str) -> None:
    """ctrl.go ctrlUserExec (the router side) joined with user.go userExec (the terminal side).

    - dials `/api/router/exec/{workflow}/backend/{key}`, 5 attempts;
    - the first bytes are the size JSON; bytes after it in the same read are lost (Go's json.Decoder
      buffers them and userExec never reads its buffer): here the rest of the first message and every
      message already received when it is decoded (they would be in the unix socket's buffer);
    - the entry command always runs in a pty (TERM=xterm), sized from that message;
    - every later message is written to the pty as it is: an empty message writes nothing (the old
      backend has no stdin EOF); RESIZE sequences resize the pty and send SIGWINCH;
    - output is read 1024 bytes at a time, one binary message per read;
    - when the command's terminal closes, the connection is dropped (no close frame, no exit status);
      when the router closes first, the reader stops and the command lives until its next output
      fails to send (then the pty is closed: SIGHUP).
    """
    ws = await dialer.dial(f"{base}/api/router/exec/{workflow}/backend/{key}", cookie, 5)
    if ws is None:
        return
    event("connected", operation="exec")
    first = await _recv(ws)
    lost = 0
    while ws.messages:  # already here: read along with the size message, into the decoder's buffer
        lost += len(ws.messages.popleft())
    if lost:
        event("input lost behind the size message", bytes=lost)
    size = _decode_size(first) if first is not None else None
    if size is None:
        with contextlib.suppress(Exception):
            await ws.send(b"Error decoding initial size message: bad JSON\r\n")
        await _drop(ws)
        return
    master, slave = os.openpty()
    _set_size(master, *size)
    env = {**os.environ, "TERM": "xterm", "PS1": "\\$ "}
    proc = subprocess.Popen(  # noqa: ASYNC220 - pty.Start in user.go is a plain fork/exec too
        shlex.split(entry_command),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    parser = _ResizeParser(master, proc)
    loop = asyncio.get_running_loop()

    async def reader() -> None:
        while (data := await _recv(ws)) is not None:
            with contextlib.suppress(OSError):
                parser.feed(data)

    async def writer() -> None:
        while True:
            try:
                chunk = await loop.run_in_executor(None, os.read, master, EXEC_READ)
            except OSError as err:  # EIO: the command's side of the terminal is closed
                if err.errno != errno.EIO:
                    event("pty error", error=str(err))
                return
            if not chunk:
                return
            try:
                await ws.send(chunk)
            except websockets.exceptions.ConnectionClosed:
                return

    read_task = asyncio.create_task(reader())
    await writer()  # ctrlUserExec waits for the output goroutine only
    read_task.cancel()
    await _drop(ws)
    os.close(master)  # terminal.Close(): SIGHUP to the command if it still runs
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


# --- TCP port-forward and rsync: ctrl.go userPortForwardTCP + portforwardConnectTCP ------------


async def user_port_forward_tcp(
    dialer: Dialer, base: str, workflow: str, action: str, key: str, cookie: str, task_port: int
) -> None:
    """ctrl.go userPortForwardTCP: the control channel `/api/router/{action}/{workflow}/backend/{key}`.

    10 dial attempts. Each message must be exactly one JSON object `{"key", "cookie"[, "type"]}`
    (json.Unmarshal: two objects in one message, or an empty message, is an error and ends the
    control channel). Each starts portforwardConnectTCP in its own goroutine. `action` is
    `portforward` or `rsync` (the rsync action forwards to osmo-rsync's port, 16000 in OSMO).
    """
    ws = await dialer.dial(f"{base}/api/router/{action}/{workflow}/backend/{key}", cookie, 10)
    if ws is None:
        return
    event("connected", operation=action)
    tasks: set[asyncio.Task[None]] = set()
    while (data := await _recv(ws)) is not None:
        try:
            message = json.loads(data)
            conn_key = str(message["key"]) if isinstance(message, dict) else None
        except (ValueError, KeyError):
            event("control message is not one JSON object", data=data[:200].decode(errors="replace"))
            break
        if conn_key is None:
            event("control message is not one JSON object", data=data[:200].decode(errors="replace"))
            break
        if message.get("type") == "ws":  # portforwardConnectWS: webserver proxying, not emulated
            event("ws-type connection not emulated", key=conn_key)
            continue
        cookie_of_conn = str(message.get("cookie", ""))
        task = asyncio.create_task(portforward_connect_tcp(dialer, base, workflow, conn_key, cookie_of_conn, task_port))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drop(ws)
    if tasks:
        await asyncio.wait(tasks, timeout=30)


async def portforward_connect_tcp(
    dialer: Dialer, base: str, workflow: str, key: str, cookie: str, local_port: int
) -> None:
    """ctrl.go portforwardConnectTCP: one WebSocket per forwarded TCP connection.

    Always dials `/api/router/portforward/{workflow}/backend/{key}`, also for the rsync action
    (5 attempts), then `127.0.0.1:{port}` (5 attempts). Local reads of up to 32 KiB go out as one
    binary message each; each message received is written to the local socket (an empty one
    writes nothing). When either direction ends, both connections are closed (no half-close, no
    close frame).
    """
    ws = await dialer.dial(f"{base}/api/router/portforward/{workflow}/backend/{key}", cookie, 5)
    if ws is None:
        return
    reader = writer = None
    for _ in range(5):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
            break
        except OSError:
            await asyncio.sleep(dialer.retry_delay)
    if reader is None or writer is None:
        await _drop(ws)
        return

    async def local_to_remote() -> None:
        while True:
            try:
                chunk = await reader.read(BUFFERSIZE)
            except OSError:
                return
            if not chunk:
                return
            try:
                await ws.send(chunk)
            except websockets.exceptions.ConnectionClosed:
                return

    async def remote_to_local() -> None:
        while (data := await _recv(ws)) is not None:
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                return

    pumps = [asyncio.create_task(local_to_remote()), asyncio.create_task(remote_to_local())]
    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    writer.close()
    await _drop(ws)
    await asyncio.wait(pumps, timeout=5)
    for pump in pumps:
        pump.cancel()


# --- UDP port-forward: ctrl.go userPortForwardUDP + readUDP ------------------------------------


async def user_port_forward_udp(
    dialer: Dialer, base: str, workflow: str, key: str, cookie: str, task_port: int
) -> None:
    """ctrl.go userPortForwardUDP: one WebSocket for every datagram of one forwarded UDP port.

    Each message is one datagram behind a 6-byte header, the client-side sender's IPv4 address and
    big-endian port (getSrcAddr). A new sender gets its own UDP socket to 127.0.0.1:{port} and a
    readUDP goroutine sending each reply as one message behind the same header. A message shorter
    than 6 bytes makes the Go code panic (index out of range): here the process exits with an error.
    """
    ws = await dialer.dial(f"{base}/api/router/portforward/{workflow}/backend/{key}", cookie, 10)
    if ws is None:
        return
    event("connected", operation="portforward-udp")
    loop = asyncio.get_running_loop()
    senders: dict[bytes, asyncio.DatagramTransport] = {}
    lock = asyncio.Lock()
    sends: set[asyncio.Task[None]] = set()

    class Reply(asyncio.DatagramProtocol):
        def __init__(self, header: bytes) -> None:
            self.header = header

        def datagram_received(self, data: bytes, addr: Any) -> None:
            # readUDP: header + datagram, one message, writes serialised by a mutex
            async def send() -> None:
                async with lock:
                    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                        await ws.send(self.header + data)

            task = loop.create_task(send())
            sends.add(task)
            task.add_done_callback(sends.discard)

    while (data := await _recv(ws)) is not None:
        if len(data) < 6:
            raise SystemExit(f"userPortForwardUDP: message of {len(data)} bytes: index out of range [panic]")
        header = data[:6]
        if header not in senders:
            transport, _ = await loop.create_datagram_endpoint(
                lambda h=header: Reply(h), remote_addr=("127.0.0.1", task_port)
            )
            senders[header] = transport
        senders[header].sendto(data[6:])
    for transport in senders.values():
        transport.close()
    await _drop(ws)


# --- rsync: src/runtime/cmd/rsync/rsync.go (gokrazy rsyncd) stood in for by `rsync --daemon` --------


def start_rsync_daemon(root: str, modules: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """An rsync daemon on 127.0.0.1 with module `osmo` at `root` (rsync.go getModulesList) plus `modules`."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    conf_dir = tempfile.mkdtemp(prefix="osmo-rsyncd-")
    lines = ["use chroot = no", f"uid = {os.getuid()}", f"gid = {os.getgid()}", f"pid file = {conf_dir}/pid"]
    for name, path in {"osmo": root, **(modules or {})}.items():
        lines += [f"[{name}]", f"path = {path}", "read only = false"]
    conf = os.path.join(conf_dir, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    argv = ["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}", "--address=127.0.0.1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the rsync daemon did not start")


async def main_async(args: argparse.Namespace) -> int:
    dialer = Dialer(args.token, args.token_header, args.retry_delay)
    base = args.base.rstrip("/")
    if args.operation == "exec":
        await ctrl_user_exec(dialer, base, args.workflow, args.key, args.cookie, args.command)
    elif args.operation == "portforward" and args.udp:
        await user_port_forward_udp(dialer, base, args.workflow, args.key, args.cookie, args.port)
    elif args.operation == "portforward":
        await user_port_forward_tcp(dialer, base, args.workflow, "portforward", args.key, args.cookie, args.port)
    else:
        daemon, port = start_rsync_daemon(args.root)
        try:
            await user_port_forward_tcp(dialer, base, args.workflow, "rsync", args.key, args.cookie, port)
        finally:
            daemon.terminate()
            daemon.wait(5)
            import shutil

            config = next((a for a in daemon.args if str(a).startswith("--config=")), "")  # type: ignore[union-attr]
            shutil.rmtree(os.path.dirname(str(config).removeprefix("--config=")), ignore_errors=True)
    event("done")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("operation", choices=["exec", "portforward", "rsync"])
    parser.add_argument("--base", required=True, help="ws://host:port of the router")
    parser.add_argument("--workflow", required=True, help="cmdArgs.Workflow: the workflow's ID")
    parser.add_argument("--key", required=True)
    parser.add_argument("--cookie", default="")
    parser.add_argument("--command", default="/bin/sh", help="exec: the entry command (shlex-split, as user.go)")
    parser.add_argument("--port", type=int, default=0, help="portforward: the task port")
    parser.add_argument("--udp", action="store_true")
    parser.add_argument("--root", default="", help="rsync: the path of module osmo")
    parser.add_argument("--token", default="")
    parser.add_argument("--token-header", default="Authorization")
    parser.add_argument("--retry-delay", type=float, default=1.0)
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(main_async(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
