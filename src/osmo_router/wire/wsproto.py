"""The WebSocket protocol of the router being replaced, in one place, and how it maps to Frames.

The old router is a byte pipe between two WebSockets that meet on a key:

    /api/router/{exec|portforward|rsync}/{workflow}/client/{key}    the user's side
    /api/router/{exec|portforward|rsync}/{workflow}/backend/{key}   the container's side

Messages are binary. The first exec message from the client is the terminal size as JSON
(`{"Rows": R, "Cols": C}`); later `\\x00RESIZE:` followed by the same JSON resizes it. An empty
message, or a close, ends the pipe; `?timeout=` (seconds) bounds the wait for the other side.
It carries no exit status, no stderr of its own and no signals.

Optional extensions, only used when the client asks for them with query parameters (an old client
never does, so it sees the old bytes exactly): `cmd` (repeatable; the argv to run), `tty=0` (pipe
mode: no size parsing of later messages), `term`, `exit=1` (the router's final close carries the
exit status as its reason, `exit:N` or `signal:N`), `eof=1` (the agent's half-close reaches the
client as an empty message: TCP half-close both ways), `port`/`host` (port-forward target), `arg`
(repeatable; rsync server argv) and `task`. A new backend (`osmo-router agent --transport ws`) asks
with `init=1` for the session's `SessionOpen` (protobuf) as its first message instead of the size,
reports its exit status as the reason of its close (`exit:N`, `signal:N`), and an error as the
router does (close code 4000, `CODE: message`).

stderr apart (docs/migration.md 2a): our client and our WS agent offer the WebSocket subprotocol
STDERR_SUBPROTOCOL and our router selects it. On a WebSocket where it was selected, stderr travels as
*text* messages holding the bytes in base64 (RFC 4648, with padding), at most STDERR_CHUNK bytes of
stderr each; binary messages stay the output, as before. Where it was not (OSMO's router accepts
without choosing a subprotocol, router.py `ws.accept()`; an older osmo-router), both sides keep to the
old protocol: stderr merged into the binary output, and nobody sends text. OSMO's CLI and osmo-ctrl
offer no subprotocol, so they see the old bytes exactly.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from typing import Final
from urllib.parse import urlencode, urlsplit

import grpc

from osmo_router.wire import ops
from osmo_router.wire.errors import InvalidArgument, RouterError, from_status
from osmo_router.wire.protocol import pb

#: Path of a session endpoint; side is "client" or "backend".
SESSION_PATH: Final = "/api/router/{operation}/{workflow}/{side}/{key}"
VERSION_PATH: Final = "/api/router/version"
#: Operation names as they appear in the paths (the same as the metrics labels).
OPERATIONS: Final[dict[str, int]] = {op.label: op.value for op in ops.OPERATIONS}
OPERATION_PATH_NAMES: Final[dict[int, str]] = {value: name for name, value in OPERATIONS.items()}
RESIZE_PREFIX: Final = b"\x00RESIZE:"
#: Close code the old router used for its own failures (rendezvous timeout); we use it for every error.
CLOSE_ERROR: Final = 4000
CLOSE_NORMAL: Final = 1000
#: The default port of the old router, and of this router's WebSocket listener.
DEFAULT_WS_PORT: Final = 8000
#: Response header of a refused handshake: `CODE: message` (the body is not shown to WebSocket clients).
ERROR_HEADER: Final = "Osmo-Error"
MAX_ERROR_HEADER: Final = 512
#: Close reasons are limited to 123 bytes by RFC 6455.
MAX_REASON: Final = 123
#: The WebSocket subprotocol of stderr apart, as text messages (module docstring). A subprotocol, not a
#: query parameter: the router's selection acknowledges it, so a side never sends text to a router that
#: would relay it as output.
STDERR_SUBPROTOCOL: Final = "osmo-router.stderr.v1"
#: Most stderr bytes in one text message (65,536 characters of base64): far below every side's
#: message limit, whatever size of stderr frame an agent sends.
STDERR_CHUNK: Final = 48 * 1024


def size_message(rows: int, cols: int) -> bytes:
    """The exec client's first message: the terminal size."""
    return json.dumps({"Rows": rows, "Cols": cols}).encode()


def resize_message(rows: int, cols: int) -> bytes:
    """A resize message."""
    return RESIZE_PREFIX + size_message(rows, cols)


def parse_size(raw: bytes) -> tuple[int, int]:
    """(rows, cols) of a size message (the first exec message or a RESIZE body)."""
    try:
        value = json.loads(raw)
        rows, cols = int(value["Rows"]), int(value["Cols"])
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # ([[[[... nests past the parser's depth)
        raise InvalidArgument(f'expected a terminal size {{"Rows": R, "Cols": C}}, got {raw[:60]!r}') from err
    if not (0 <= rows < 65536 and 0 <= cols < 65536):
        raise InvalidArgument(f"terminal size out of range: {rows}x{cols}")
    return rows, cols


def error_reason(code: grpc.StatusCode, message: str) -> str:
    """The close reason of a failed session: `CODE: message`, cut to what a close frame can carry."""
    text = f"{code.name}: {message}"
    encoded = text.encode()[:MAX_REASON]
    return encoded.decode(errors="ignore")


def error_from_reason(reason: str) -> RouterError:
    """The RouterError a close reason of `error_reason` reports (UNKNOWN when it names no code)."""
    name, _, message = reason.partition(": ")
    code = getattr(grpc.StatusCode, name, None)
    if isinstance(code, grpc.StatusCode) and message:
        return from_status(code, message)
    return RouterError(reason or "the router closed the connection")


def exit_reason(status: pb.ExitStatus) -> str:
    """The close reason carrying an exit status (the `exit=1` extension)."""
    if status.WhichOneof("status") == "signal":
        return f"signal:{status.signal}"
    return f"exit:{status.code}"


def exit_from_reason(reason: str) -> pb.ExitStatus | None:
    """The exit status in a close reason, if it carries one."""
    kind, _, number = reason.partition(":")
    if not number.isdigit():
        return None
    if kind == "exit":
        return pb.ExitStatus(code=int(number))
    if kind == "signal":
        return pb.ExitStatus(signal=int(number))
    return None


def base_url(address: str, tls: bool) -> str:
    """`ws://host:port` (or wss) for host:port, or the URL as given (http(s) becomes ws(s))."""
    if "://" not in address:
        return f"{'wss' if tls else 'ws'}://{address}"
    parts = urlsplit(address)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def default_ws_address(router_address: str) -> str:
    """The router's WebSocket address when none is given: its gRPC host, port 8000."""
    host, _, port = router_address.rpartition(":")
    if not port.isdigit() or not host or (":" in host and not host.endswith("]")):
        host = router_address  # no port given (or a bare IPv6 address)
    return f"{host}:{DEFAULT_WS_PORT}"


#: Longest request target (path and query) the router's WebSocket port reads: aiohttp's max_line_size,
#: which its parser applies to the target (measured: 8,190 bytes answered, 8,191 refused with 400).
MAX_REQUEST_TARGET = 8190


def session_url(base: str, operation: int, workflow: str, side: str, key: str, query: list[tuple[str, str]]) -> str:
    """The full URL of one side of a session."""
    path = SESSION_PATH.format(operation=OPERATION_PATH_NAMES[operation], workflow=workflow, side=side, key=key)
    return f"{base}{path}" + (f"?{urlencode(query)}" if query else "")


def client_query(init: pb.ExecInit | pb.PortForwardInit | pb.RsyncInit, want_exit: bool) -> list[tuple[str, str]]:
    """The extension parameters that carry what an init says beyond the old protocol."""
    query: list[tuple[str, str]] = [("eof", "1")]
    if init.target.task:
        query.append(("task", init.target.task))
    if isinstance(init, pb.ExecInit):
        query += [("cmd", arg) for arg in init.command]
        query.append(("tty", "1" if init.tty else "0"))
        if init.term:
            query.append(("term", init.term))
        query += [("env", f"{name}={value}") for name, value in init.env.items()]
        if init.workdir:
            query.append(("cwd", init.workdir))
        if want_exit:
            query.append(("exit", "1"))
    elif isinstance(init, pb.PortForwardInit):
        query.append(("port", str(init.remote_port)))
        if init.remote_host:
            query.append(("host", init.remote_host))
    else:
        query += [("arg", arg) for arg in init.server_args]
        if want_exit:
            query.append(("exit", "1"))
    return query


def client_protocols(init: pb.ExecInit | pb.PortForwardInit | pb.RsyncInit) -> tuple[str, ...]:
    """The subprotocols a client offers: stderr apart for exec and rsync (a forward has no stderr)."""
    return () if isinstance(init, pb.PortForwardInit) else (STDERR_SUBPROTOCOL,)


def stderr_messages(data: bytes) -> Iterator[str]:
    """stderr as text messages of STDERR_SUBPROTOCOL: base64, at most STDERR_CHUNK bytes each
    (made one at a time: a large frame is not held twice over)."""
    view = memoryview(data)
    for start in range(0, len(view), STDERR_CHUNK):
        yield base64.b64encode(view[start : start + STDERR_CHUNK]).decode("ascii")


def stderr_frame(text: str) -> pb.Frame:
    """The stderr frame a text message of STDERR_SUBPROTOCOL stands for; InvalidArgument if no base64."""
    try:
        return pb.Frame(stderr=base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII character
        raise InvalidArgument(f"a stderr message must be base64, got {text[:40]!r}") from None


def frame_to_message(frame: pb.Frame, *, to_backend: bool) -> bytes | None:
    """What a frame becomes on an old WebSocket; None when the old protocol cannot carry it.

    Data and stderr (merged: the old protocol has one output stream; see stderr_messages for the
    extension that keeps them apart) pass as they are; a
    half-close towards the backend is the empty message (EOF); a resize is a RESIZE message.
    Signals, exit statuses, datagrams and errors have no old form: the caller handles or drops them.
    """
    kind = frame.WhichOneof("kind")
    if kind == "data":
        return frame.data or None  # an empty message would mean EOF
    if kind == "stderr":
        return frame.stderr or None
    if kind == "half_close" and to_backend:
        return b""
    if kind == "resize" and to_backend:
        return resize_message(frame.resize.size.rows, frame.resize.size.cols)
    return None


def message_to_frame(data: bytes, *, parse_resize: bool) -> pb.Frame:
    """The frame an old WebSocket message stands for: EOF, a resize (exec client only) or data."""
    if not data:
        return pb.Frame(half_close=pb.HalfClose())
    if parse_resize and data.startswith(RESIZE_PREFIX):
        rows, cols = parse_size(data[len(RESIZE_PREFIX) :])
        return pb.Frame(resize=pb.Resize(size=pb.TerminalSize(rows=rows, cols=cols)))
    return pb.Frame(data=data)


# --- How NVIDIA OSMO's own CLI and backend use the old protocol (docs/migration.md) -------------------
#
# The old router is a byte pipe, but OSMO puts framing of its own inside the messages. These helpers
# speak it: the new CLI's `--legacy-backend` (client/legacy.py) and, later, the router side.

#: Prefix of a port-forward connection's key (OSMO port_forward.py run_tcp_with_sock).
CONNECTION_KEY_PREFIX: Final = "PORTFORWARD-"
#: Length of a UDP message's sender header: IPv4 address and big-endian port (OSMO port_forward.py
#: _encode_addr, ctrl.go getSrcAddr).
UDP_HEADER_SIZE: Final = 6
#: The terminal's EOF character. An old exec backend runs its command in a pty and writes an empty
#: message to it as zero bytes (user.go userExec, ctrl.go ctrlUserExec): ^D is the only EOF it has.
VEOF: Final = b"\x04"


def connection_key() -> str:
    """A new port-forward connection's key, as OSMO's CLI makes them (`PORTFORWARD-` + uuid4 hex)."""
    import uuid

    return f"{CONNECTION_KEY_PREFIX}{uuid.uuid4().hex}"


def control_message(conn_key: str, cookie: str = "") -> bytes:
    """One connection's announcement on a port-forward control channel: one JSON object, one message."""
    return json.dumps({"key": conn_key, "cookie": cookie}).encode()


def parse_control_message(data: bytes) -> tuple[str, str, str]:
    """(key, cookie, type) of a control message; InvalidArgument unless it is exactly one JSON object with a key.

    As strict as osmo-ctrl's `json.Unmarshal` (ctrl.go userPortForwardTCP): two objects in one
    message, or an empty message, are errors (they end the control channel there).
    """
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # ([[[[... nests past the parser's depth)
        raise InvalidArgument(f"a control message must be one JSON object: {str(err)[:100]}") from None
    if not isinstance(value, dict) or not isinstance(value.get("key"), str):
        raise InvalidArgument("a control message must be a JSON object with a string 'key'")
    return value["key"], str(value.get("cookie", "")), str(value.get("type") or "tcp")


def udp_message(data: bytes, sender: tuple[str, int]) -> bytes:
    """A datagram as one message: the sender's IPv4 address and port, then the payload."""
    import socket
    import struct

    try:
        address = socket.inet_aton(sender[0])
    except OSError:
        raise InvalidArgument(f"the old UDP framing carries IPv4 senders only, not {sender[0]!r}") from None
    return address + struct.pack(">H", sender[1]) + data


def parse_udp_message(message: bytes) -> tuple[bytes, tuple[str, int]]:
    """(payload, sender) of a UDP message; InvalidArgument when it is shorter than its header."""
    import socket
    import struct

    if len(message) < UDP_HEADER_SIZE:
        raise InvalidArgument(f"a UDP message has a {UDP_HEADER_SIZE}-byte header; got {len(message)} bytes")
    (port,) = struct.unpack(">H", message[4:6])
    return message[UDP_HEADER_SIZE:], (socket.inet_ntoa(message[:4]), port)


def datagram_frame(message: bytes) -> pb.Frame:
    """An OSMO UDP message (6-byte IPv4 sender header, then the datagram) as a Datagram frame.

    A message shorter than its header is refused with InvalidArgument (osmo-ctrl crashed on one,
    docs/migration.md 1.7); an empty message is the end of the sender's direction.
    """
    if not message:
        return pb.Frame(half_close=pb.HalfClose())
    payload, (host, port) = parse_udp_message(message)
    return pb.Frame(datagram=pb.Datagram(payload=payload, peer=f"{host}:{port}"))


def datagram_message(datagram: pb.Datagram) -> bytes:
    """A Datagram frame as an OSMO UDP message: the sender's header (from its `peer` host:port), then the payload."""
    host, _, port = datagram.peer.rpartition(":")
    if not port.isdigit():
        raise InvalidArgument(f"a datagram's peer is not host:port: {datagram.peer!r}")
    return udp_message(datagram.payload, (host, int(port)))


def terminal_eof(sent_any: bool, last_byte: int | None) -> bytes:
    """What stands for stdin EOF on an old backend's terminal: ^D at the start of a line, else ^D^D
    (in canonical mode the first ^D ends the unfinished line, the second is the EOF)."""
    if not sent_any or last_byte in (0x0A, 0x0D):
        return VEOF
    return VEOF + VEOF
