"""A `CutProxy` that can also hold back what the target sends, to place a cut exactly.

Two holds, both on the target -> client direction only (the client's frames still reach the target):

- `hold_after_first_message()`: connections are let through until the first gRPC message of the
  first stream that carries one (a client's SessionReady) and nothing after it on that connection
  (the agent's first Resume frame never arrives); connections without one (gRPC may dial twice)
  pass. The proxy reads HTTP/2 frames (plaintext h2c on loopback) to find that message's end; a
  DATA frame that carries more is cut short there. `held` is set then, and `client_spoke` once the
  client sent a gRPC message after that: it took the ready (an exec sends its stdin's end only once
  its session is open), so a cut placed after it comes after the ready, not before.
- `hold_before_first_message()`: the same, but that first gRPC message is held too (a client's
  SessionReady never arrives: the client is cut before it knows the session started).
- `pause()`: nothing more goes to the clients (an agent then does not get the SessionOpen its router
  writes) until `unpause()` lets it all through, in order, or `cut()` drops it.

Connections accepted after a `cut()` and `restore()` pass everything, as `CutProxy`'s do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from tests.cut_proxy import CutProxy

#: HTTP/2 frame header size, the DATA frame type and its PADDED flag.
H2_HEADER = 9
H2_DATA = 0
H2_PADDED = 0x8
#: What a client sends first on an HTTP/2 connection.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: gRPC's length prefix on every message.
GRPC_PREFIX = 5


class HoldProxy(CutProxy):
    """A CutProxy whose downstream direction can be held (see the module docstring)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.held = threading.Event()
        self.client_spoke = threading.Event()
        self._hold_next = False
        self._hold_before = False
        self._flowing: asyncio.Event | None = None
        super().__init__(target_host, target_port)
        self._call(self._set_flowing(True))

    def hold_after_first_message(self) -> None:
        """Hold the downstream of the first connection that carries a gRPC message, after that message."""
        self._hold_next = True

    def hold_before_first_message(self) -> None:
        """Hold the downstream of the first connection that carries a gRPC message, from that message on."""
        self._hold_before = True
        self._hold_next = True

    def pause(self) -> None:
        """Send nothing more downstream (what comes is kept, in the sockets, until `unpause`)."""
        self._call(self._set_flowing(False))

    def unpause(self) -> None:
        """Let what was held and what follows through."""
        self._call(self._set_flowing(True))

    def restore(self) -> None:
        """As CutProxy.restore; downstream flows again."""
        self._call(self._set_flowing(True))
        super().restore()

    async def _set_flowing(self, flowing: bool) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        hold = self._hold_next
        up = _up(reader, up_writer, self._data_after_held if hold else None)
        await asyncio.gather(up, self._down(up_reader, writer, hold=hold))

    def _data_after_held(self) -> None:
        if self.held.is_set():
            self.client_spoke.set()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold: bool) -> None:
        """Target -> client: through, or through the first gRPC message only, or nothing while paused."""
        first = _FirstMessage(before=self._hold_before) if hold else None
        try:
            while data := await reader.read(65536):
                if self._flowing is not None:
                    await self._flowing.wait()  # paused: held back (reading stops, the sockets hold it)
                if first is not None:
                    data = first.feed(data)
                    if first.done:
                        self._hold_next = False  # later connections pass
                        self.held.set()
                if data:
                    writer.write(data)
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            writer.transport.abort()


class _FirstMessage:
    """Passes HTTP/2 frames until the first gRPC message of the first stream with data has passed (`before`:
    until it comes)."""

    def __init__(self, *, before: bool = False) -> None:
        self._before = before  # the first message is held too
        self._buf = b""
        self._stream = 0
        self._message = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """What of `data` may go on (whole frames; once done, nothing)."""
        if self.done:
            return b""
        self._buf += data
        out = bytearray()
        while not self.done and len(self._buf) >= H2_HEADER:
            length = int.from_bytes(self._buf[0:3], "big")
            if len(self._buf) < H2_HEADER + length:
                break
            frame, self._buf = self._buf[: H2_HEADER + length], self._buf[H2_HEADER + length :]
            kind, flags = frame[3], frame[4]
            stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
            if kind != H2_DATA or stream == 0 or (self._stream and stream != self._stream):
                out += frame
                continue
            self._stream = stream
            payload = frame[H2_HEADER:]
            if flags & H2_PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            out += self._take(payload, stream)
        return bytes(out)

    def _take(self, payload: bytes, stream: int) -> bytes:
        """A DATA frame carrying `payload`, cut short where the first message ends (then done)."""
        if self._before:
            self.done = True
            return b""
        have = self._message + payload
        if len(have) >= GRPC_PREFIX:
            end = GRPC_PREFIX + int.from_bytes(have[1:5], "big")
            if len(have) >= end:
                payload = payload[: end - len(self._message)]
                self.done = True
        self._message += payload
        header = len(payload).to_bytes(3, "big") + bytes([H2_DATA, 0]) + stream.to_bytes(4, "big")
        return header + payload


class _DataWatch:
    """Calls `on_data` for every non-empty DATA frame a client sends (after the connection preface)."""

    def __init__(self, on_data: Callable[[], None]) -> None:
        self._buf = b""
        self._preface = len(H2_PREFACE)
        self._on_data = on_data

    def feed(self, data: bytes) -> None:
        """Look at more of the client's bytes."""
        self._buf += data
        if self._preface:
            skipped = min(self._preface, len(self._buf))
            self._buf, self._preface = self._buf[skipped:], self._preface - skipped
        while len(self._buf) >= H2_HEADER:
            length = int.from_bytes(self._buf[0:3], "big")
            if len(self._buf) < H2_HEADER + length:
                return
            kind, stream = self._buf[3], int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            self._buf = self._buf[H2_HEADER + length :]
            if kind == H2_DATA and stream and length:
                self._on_data()


async def _up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_data: Callable[[], None] | None) -> None:
    watch = _DataWatch(on_data) if on_data is not None else None
    try:
        while data := await reader.read(65536):
            if watch is not None:
                watch.feed(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, asyncio.IncompleteReadError):
        writer.transport.abort()
