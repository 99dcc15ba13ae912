"""A raw HTTP/2 client that honours flow control, for hostile tests: it sends what a peer may send
(streams without their init, partial messages, many header fields) and records the router's resets."""

from __future__ import annotations

import asyncio

import hpack

from osmo_router.h2 import frames as fr

EXEC = "/osmo.router.v1.RouterClientService/Exec"


def grpc_headers(
    path: str, token: str | None = None, extra: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """A gRPC request's headers (and `extra` fields)."""
    h = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "router"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if token:
        h.append(("authorization", f"Bearer {token}"))
    return h + (extra or [])


class Raw:
    """One raw HTTP/2 connection: open streams, send DATA within the windows, see resets and GOAWAY."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()
        self.parser = fr.FrameParser(fr.MAX_FRAME_LIMIT, 1 << 24)
        self.conn_window = fr.DEFAULT_WINDOW
        self.peer_initial = fr.DEFAULT_WINDOW
        self.windows: dict[int, int] = {}
        self.next_id = 1
        self.changed = asyncio.Event()
        self.closed = False
        self.goaway: int | None = None
        self.resets: dict[int, int] = {}
        self.headers_in = 0
        self.max_frame = fr.DEFAULT_MAX_FRAME

    async def connect(self, host: str, port: int, settings: dict[int, int] | None = None) -> None:
        """Connect, send the preface and SETTINGS (a large window), and start reading."""
        self.reader, self.writer = await asyncio.open_connection(host, port)
        self.writer.write(fr.PREFACE + fr.encode_settings(settings or {fr.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 30}))
        self.writer.write(fr.window_update(0, (1 << 30)))
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    break
                for f in self.parser.feed(data):
                    if f.kind == fr.SETTINGS and not f.flags & fr.ACK:
                        for k, v in fr.decode_settings(f.payload):
                            if k == fr.SETTINGS_INITIAL_WINDOW_SIZE:
                                d = v - self.peer_initial
                                self.peer_initial = v
                                for s in self.windows:
                                    self.windows[s] += d
                            if k == fr.SETTINGS_MAX_FRAME_SIZE:
                                self.max_frame = v
                        self.writer.write(fr.encode(fr.SETTINGS, fr.ACK, 0))
                    elif f.kind == fr.WINDOW_UPDATE:
                        inc = int.from_bytes(f.payload, "big")
                        if f.stream_id == 0:
                            self.conn_window += inc
                        elif f.stream_id in self.windows:
                            self.windows[f.stream_id] += inc
                    elif f.kind == fr.PING and not f.flags & fr.ACK:
                        self.writer.write(fr.encode(fr.PING, fr.ACK, 0, f.payload))
                    elif f.kind == fr.RST_STREAM:
                        self.resets[f.stream_id] = int.from_bytes(f.payload, "big")
                    elif f.kind == fr.GOAWAY:
                        self.goaway = int.from_bytes(f.payload[4:8], "big")
                    elif f.kind == fr.HEADERS:
                        self.headers_in += 1
                self.changed.set()
        except (ConnectionError, fr.ProtocolError):
            pass
        self.closed = True
        self.changed.set()

    def open(self, headers: list[tuple[str, str]], end: bool = False) -> int:
        """Open a stream with these request headers; its id."""
        sid = self.next_id
        self.next_id += 2
        self.windows[sid] = self.peer_initial
        self.writer.write(
            fr.encode(fr.HEADERS, fr.END_HEADERS | (fr.END_STREAM if end else 0), sid, self.enc.encode(headers))
        )
        return sid

    async def send(self, sid: int, data: bytes | memoryview, timeout: float = 30.0) -> int:
        """Send as much of data as windows allow, waiting up to timeout for windows; returns bytes sent."""
        view = memoryview(data)
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sent < len(view):
            if self.closed or sid in self.resets:
                break
            room = min(self.windows[sid], self.conn_window, self.max_frame, len(view) - sent)
            if room <= 0:
                self.changed.clear()
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except TimeoutError:
                    break
                continue
            self.writer.write(fr.encode(fr.DATA, 0, sid, view[sent : sent + room]))
            self.windows[sid] -= room
            self.conn_window -= room
            sent += room
            await self.writer.drain()
        return sent

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()
