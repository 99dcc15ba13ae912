"""OSMO's CLI side of the old router protocol (Python, websockets 11, as OSMO pins it).

Follows NVIDIA/OSMO `src/lib/utils/client.py` (ServiceClient.create_websocket),
`src/cli/workflow.py` (_run_exec_interactive, _run_exec_command), `src/lib/utils/port_forward.py`
(read_data, write_data, run_tcp_with_sock, run_udp) and `src/lib/rsync/rsync.py` (RsyncClient).
What the OSMO service hands the CLI (`router_address`, `key`, `cookie` from
`POST api/workflow/{id}/exec|portforward|rsync/...`) is passed in as arguments; the terminal is
replaced by an input queue and an output buffer so that tests can drive and check it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import struct
import subprocess
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
import websockets.client
import websockets.exceptions

RESIZE_PREFIX = b"\x00RESIZE:"
#: port_forward.py SOCKET_READ_BUFFER_SIZE
SOCKET_READ_BUFFER_SIZE = 4096
#: rsync.py RSYNC_BUFFER_SIZE, RSYNC_FLAGS, LOCAL_HOST_IP
RSYNC_BUFFER_SIZE = 8 * 1024
RSYNC_FLAGS = "-av"
LOCAL_HOST_IP = "127.0.0.1"
CLIENT_VERSION = "6.0.0"
Ws = websockets.client.WebSocketClientProtocol


async def create_websocket(
    address: str,
    endpoint: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    timeout: float = 10,
    token: str = "",
) -> Ws:
    """client.py ServiceClient.create_websocket: `{address}/{endpoint}?k=v&...` (not URL-encoded).

    Headers: what the caller gives (the Cookie), `Authorization: Bearer` with the user's id token
    when logged in with one, the client version and a User-Agent. websockets' defaults otherwise
    (permessage-deflate offered, 1 MiB max message, pings every 20 s).
    """
    query = ""
    if params is not None:
        query = "?" + "&".join(f"{k}={v}" for k, v in params.items())
    url = f"{address}/{endpoint}{query}"
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers["x-osmo-client-version"] = CLIENT_VERSION
    all_headers["User-Agent"] = f"osmo-cli/{CLIENT_VERSION}"
    return await websockets.client.connect(url, extra_headers=all_headers, open_timeout=timeout)


def size_message(rows: int, cols: int) -> bytes:
    """workflow.py _get_terminal_size: `json.dumps({'Rows': rows, 'Cols': cols})`."""
    return json.dumps({"Rows": rows, "Cols": cols}).encode("utf-8")


@dataclass
class Ended:
    """How a session ended, as the CLI saw it."""

    output: bytearray = field(default_factory=bytearray)
    #: "closed ok" (ConnectionClosedOK), "closed error" (ConnectionClosedError), "eof" (empty message),
    #: "stdin eof", "refused" (the handshake failed)
    how: str = ""
    close_code: int | None = None
    close_reason: str = ""

    def closed_by(self, err: websockets.exceptions.ConnectionClosed) -> None:
        frame = err.rcvd
        self.close_code = frame.code if frame is not None else 1006
        self.close_reason = frame.reason if frame is not None else ""
        self.how = "closed ok" if isinstance(err, websockets.exceptions.ConnectionClosedOK) else "closed error"


# --- port_forward.py read_data / write_data ------------------------------------------------------


async def read_data(
    read: Callable[[int], Any], ws: Ws, buffer_size: int = SOCKET_READ_BUFFER_SIZE
) -> BaseException | None:
    """port_forward.py read_data: each read (up to buffer_size) is one message; EOF ends it (no EOF is sent)."""
    try:
        while True:
            data = await read(buffer_size)
            if not data:
                raise EOFError("Reader closed.")
            await ws.send(data)
    except (EOFError, websockets.exceptions.ConnectionClosed) as err:
        return err


async def write_data(write: Callable[[bytes], Any], ws: Ws, ended: Ended | None = None) -> BaseException | None:
    """port_forward.py write_data: each message is written out; an empty message is EOF."""
    try:
        while True:
            data = await ws.recv()
            if not data:
                raise EOFError("Writer closed.")
            await write(data if isinstance(data, bytes) else data.encode())
    except EOFError:
        if ended is not None:
            ended.how = "eof"
    except websockets.exceptions.ConnectionClosedOK as err:
        if ended is not None:
            ended.closed_by(err)
    except websockets.exceptions.ConnectionClosedError as err:
        if ended is not None:
            ended.closed_by(err)
        return err
    return None


# --- workflow.py exec ----------------------------------------------------------------------------


class Terminal:
    """The user's terminal: keystrokes in (a queue; None is EOF), output collected, resizes queued."""

    def __init__(self, rows: int = 24, cols: int = 80) -> None:
        self.rows, self.cols = rows, cols
        self.keys: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.resizes: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self.output = bytearray()
        self.changed = asyncio.Event()

    async def read(self, _size: int) -> bytes:
        data = await self.keys.get()
        return data or b""

    async def write(self, data: bytes) -> None:
        self.output += data
        self.changed.set()

    async def wait_for(self, needle: bytes, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while needle not in self.output:
                self.changed.clear()
                await self.changed.wait()


async def exec_interactive(
    address: str, workflow_id: str, key: str, cookie: str, term: Terminal, timeout: float = 60
) -> Ended:
    """workflow.py _run_exec_interactive: size first, wait for the first output, then three pumps.

    The pumps are write_data (router -> terminal), read_data (keystrokes -> router) and
    _watch_terminal_resize (`\\x00RESIZE:` + size JSON per SIGWINCH); the first to finish ends the
    session (asyncio.wait FIRST_COMPLETED, the others cancelled). So stdin EOF ends the session, and
    no EOF message is ever sent. The WebSocket is not closed explicitly (only on KeyboardInterrupt).
    """
    ended = Ended()
    endpoint = f"api/router/exec/{workflow_id}/client/{key}"
    try:
        ws = await create_websocket(address, endpoint, headers={"Cookie": cookie}, timeout=timeout)
    except (OSError, websockets.exceptions.InvalidHandshake) as err:
        ended.how, ended.close_reason = "refused", str(err)
        return ended
    try:
        await ws.send(size_message(term.rows, term.cols))
        data = await ws.recv()
        if not data:
            ended.how = "eof"
            return ended
        await term.write(data if isinstance(data, bytes) else data.encode())

        async def watch_resize() -> None:
            with contextlib.suppress(websockets.exceptions.ConnectionClosed, asyncio.CancelledError):
                while True:
                    rows, cols = await term.resizes.get()
                    await ws.send(RESIZE_PREFIX + size_message(rows, cols))

        tasks = [
            asyncio.create_task(write_data(term.write, ws, ended)),
            asyncio.create_task(read_data(term.read, ws)),
            asyncio.create_task(watch_resize()),
        ]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if tasks[1] in done and not ended.how:
            ended.how = "stdin eof"
    except websockets.exceptions.ConnectionClosed as err:
        ended.closed_by(err)
    finally:
        ended.output = term.output
        with contextlib.suppress(Exception):
            await ws.close()
    return ended


async def exec_command(
    address: str, workflow_id: str, key: str, cookie: str, task_name: str, rows: int = 24, cols: int = 80
) -> tuple[str, Ended]:
    """workflow.py _run_exec_command (exec into a group): size, then print each message's lines as `[task] line`."""
    ended = Ended()
    printed: list[str] = []
    endpoint = f"api/router/exec/{workflow_id}/client/{key}"
    try:
        ws = await create_websocket(address, endpoint, headers={"Cookie": cookie}, timeout=60)
    except (OSError, websockets.exceptions.InvalidHandshake) as err:
        ended.how, ended.close_reason = "refused", str(err)
        return "", ended
    try:
        await ws.send(size_message(rows, cols))
        while True:
            data = await ws.recv()
            if not data:
                ended.how = "eof"
                break
            raw = data if isinstance(data, bytes) else data.encode()
            ended.output += raw
            for line in raw.decode("utf-8").splitlines(True):
                printed.append(f"[{task_name}] {line}")
    except websockets.exceptions.ConnectionClosed as err:
        ended.closed_by(err)
    return "".join(printed), ended


# --- port_forward.py run_tcp_with_sock -----------------------------------------------------------


def session_cookie(address: str, timeout: float) -> str:
    """port_forward.py _get_session_cookie: GET /api/router/version, its cookies as one header.

    Blocking, as OSMO's `requests.get` is inside the connection handler.
    """
    http = address.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
    with urllib.request.urlopen(f"{http}/api/router/version", timeout=timeout) as resp:
        cookies = resp.headers.get_all("Set-Cookie") or []
    return ", ".join(c.split(";", 1)[0] for c in cookies)


@dataclass
class Forward:
    """A running run_tcp_with_sock: its local port and what happened."""

    port: int
    ready: asyncio.Event
    close: asyncio.Event
    errors: list[str] = field(default_factory=list)
    control_ended: asyncio.Event = field(default_factory=asyncio.Event)
    #: Connections announced on the control WebSocket so far (for tests that need them queued).
    announced: int = 0


async def run_tcp_with_sock(
    address: str,
    sock: socket.socket,
    endpoint: str,
    timeout: float,
    key: str,
    ctrl_cookie: str,
    forward: Forward,
    params: dict[str, str] | None = None,
    buffer_size: int = SOCKET_READ_BUFFER_SIZE,
    token: str = "",
) -> None:
    """port_forward.py run_tcp_with_sock: a control WebSocket, then one WebSocket per accepted connection.

    Control: `{endpoint}/{key}`. Per connection: a new key `PORTFORWARD-<uuid hex>`, the router's
    cookies (GET /api/router/version), the JSON `{"key", "cookie"}` as one binary message on the
    control WebSocket, then `{endpoint}/{conn_key}` with the same params, and read_data/write_data
    until either ends (local EOF ends the connection: no EOF message, the WebSocket is closed).
    The forward ends when the control WebSocket closes or `close` is set.
    """
    ctrl_ws: Ws | None = None
    try:
        ctrl_ws = await create_websocket(
            address, f"{endpoint}/{key}", headers={"Cookie": ctrl_cookie}, params=params, timeout=timeout, token=token
        )

        async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert ctrl_ws is not None
            try:
                conn_key = f"PORTFORWARD-{uuid.uuid4().hex}"
                cookie = session_cookie(address, timeout)
                payload = {"key": conn_key, "cookie": cookie}
                await ctrl_ws.send(json.dumps(payload).encode())
                forward.announced += 1
            except (OSError, websockets.exceptions.ConnectionClosedError) as err:
                forward.errors.append(f"control connection closed: {err}")
                forward.close.set()
                return
            try:
                ws = await create_websocket(
                    address,
                    f"{endpoint}/{conn_key}",
                    headers={"Cookie": cookie},
                    params=params,
                    timeout=timeout,
                    token=token,
                )

                async def write(data: bytes) -> None:
                    writer.write(data)
                    await writer.drain()

                pumps = [
                    asyncio.create_task(write_data(write, ws)),
                    asyncio.create_task(read_data(reader.read, ws, buffer_size)),
                ]
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                await ws.close()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            except (
                OSError,
                websockets.exceptions.ConnectionClosedError,
                websockets.exceptions.InvalidHandshake,
            ) as err:
                forward.errors.append(str(err))

        server = await asyncio.start_server(handle_connection, sock=sock)
        forward.ready.set()
        try:
            waits = [asyncio.create_task(forward.close.wait()), asyncio.create_task(ctrl_ws.wait_closed())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            server.close()
    except (OSError, websockets.exceptions.ConnectionClosedError, websockets.exceptions.InvalidHandshake) as err:
        forward.errors.append(str(err))
    finally:
        forward.control_ended.set()
        if ctrl_ws is not None:
            with contextlib.suppress(Exception):
                await ctrl_ws.close()


def bind_local(port: int = 0) -> socket.socket:
    """port_forward.py run_tcp: an IPv4 TCP socket bound with SO_REUSEADDR (start_server listens on it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOCAL_HOST_IP, port))
    return sock


def start_tcp_forward(
    address: str,
    workflow_id: str,
    key: str,
    cookie: str = "",
    *,
    operation: str = "portforward",
    params: dict[str, str] | None = None,
    timeout: float = 60,
    buffer_size: int = SOCKET_READ_BUFFER_SIZE,
    token: str = "",
) -> tuple[Forward, asyncio.Task[None]]:
    """workflow.py _single_port_forward (TCP) / rsync.py RsyncClient._port_forward: run_tcp_with_sock in a task."""
    sock = bind_local()
    forward = Forward(port=int(sock.getsockname()[1]), ready=asyncio.Event(), close=asyncio.Event())
    endpoint = f"api/router/{operation}/{workflow_id}/client"
    task = asyncio.create_task(
        run_tcp_with_sock(address, sock, endpoint, timeout, key, cookie, forward, params, buffer_size, token)
    )
    return forward, task


# --- port_forward.py run_udp ---------------------------------------------------------------------


def encode_addr(data: bytes, addr: tuple[str, int]) -> bytes:
    """port_forward.py _encode_addr: inet_aton(ip) + big-endian port, then the datagram."""
    ip, port = addr[0], addr[1]
    return socket.inet_aton(ip) + struct.pack(">H", port) + data


def decode_addr(data: bytes) -> tuple[bytes, str, int]:
    """port_forward.py _decode_addr."""
    return data[6:], socket.inet_ntoa(data[:4]), struct.unpack(">H", data[4:6])[0]


async def run_udp(
    address: str,
    app_host: str,
    app_port: int,
    endpoint: str,
    timeout: float,
    key: str,
    cookie: str,
    ready: asyncio.Event,
    stop: asyncio.Event,
) -> str:
    """port_forward.py run_udp: one control WebSocket carries every datagram, each one message.

    Datagrams from local senders are queued and sent by a loop that polls the queue every 0.1 s;
    each message from the router is decoded and sent to the address in its header. An empty
    message ends the receiving side. IPv4 only (inet_aton).
    """
    ctrl_ws: Ws | None = None
    transport: asyncio.DatagramTransport | None = None
    try:
        ctrl_ws = await create_websocket(address, f"{endpoint}/{key}", headers={"Cookie": cookie}, timeout=timeout)
        queue: collections.deque[bytes] = collections.deque()

        async def send_datagram_to_router() -> None:
            assert ctrl_ws is not None
            with contextlib.suppress(websockets.exceptions.ConnectionClosedError):
                while True:
                    if queue:
                        await ctrl_ws.send(queue.popleft())
                    else:
                        await asyncio.sleep(0.1)

        async def receive_datagram_from_router(tr: asyncio.DatagramTransport) -> None:
            assert ctrl_ws is not None
            with contextlib.suppress(websockets.exceptions.ConnectionClosedError):
                while True:
                    data = await ctrl_ws.recv()
                    if not data:
                        break
                    payload, ip, port = decode_addr(data if isinstance(data, bytes) else data.encode())
                    tr.sendto(payload, (ip, port))

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                queue.append(encode_addr(data, addr))

        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Protocol, local_addr=(app_host, app_port))
        ready.set()
        tasks = [
            asyncio.create_task(send_datagram_to_router()),
            asyncio.create_task(receive_datagram_from_router(transport)),
            asyncio.create_task(stop.wait()),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return "ended"
    except (OSError, websockets.exceptions.ConnectionClosedError, websockets.exceptions.InvalidHandshake) as err:
        return f"error: {err}"
    finally:
        if ctrl_ws is not None:
            await ctrl_ws.close()
        if transport is not None:
            transport.close()


# --- rsync.py RsyncClient ------------------------------------------------------------------------


async def _rsync(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def rsync_client(
    address: str,
    workflow_id: str,
    key: str,
    cookie: str,
    *,
    direction: str,
    local_path: str,
    remote_module: str = "osmo",
    remote_path: str = "",
    timeout: int = 30,
) -> tuple[int, str]:
    """rsync.py RsyncClient: start(), list_modules() check, upload() or download(), stop().

    The port-forward runs run_tcp_with_sock on an ephemeral 127.0.0.1 port with endpoint
    `api/router/rsync/{workflow_id}/client`, params `{'timeout': str(timeout)}` and reads of 8 KiB;
    rsync then talks to `rsync://127.0.0.1:PORT/{module}/{path}` with `-av` (OSMO's bundled rsync
    adds `--gokr.dont_restrict`, which only gokrazy's rsync knows: left out with the system rsync).
    Returns (rsync's exit status, its stderr); 1 with the reason when the module check fails.
    The port-forward's own rsync runs are bounded by `4 * timeout` in all.
    """
    forward, task = start_tcp_forward(
        address,
        workflow_id,
        key,
        cookie,
        operation="rsync",
        params={"timeout": str(timeout)},
        timeout=timeout,
        buffer_size=RSYNC_BUFFER_SIZE,
    )
    try:
        async with asyncio.timeout(timeout):
            await forward.ready.wait()
        remote_host = f"rsync://{LOCAL_HOST_IP}:{forward.port}"
        code, out, err = await _rsync("rsync", remote_host)
        modules = [line.split()[0] for line in out.splitlines() if line.strip()] if code == 0 else []
        if remote_module not in modules:
            return 1, f"module {remote_module!r} not listed ({modules}); rsync said: {err.strip()}"
        remote = os.path.join(remote_host, remote_module, remote_path)
        if direction == "upload":
            code, _, err = await _rsync("rsync", RSYNC_FLAGS, local_path, remote)
        else:
            os.makedirs(local_path, exist_ok=True)
            code, _, err = await _rsync("rsync", RSYNC_FLAGS, remote, local_path)
        return code, err
    finally:
        forward.close.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)
