"""Candidate (e): a minimal HTTP/2 + gRPC framing relay on an asyncio Protocol (no gRPC library on the data path).

    python -m bench.experiments.h2_relay [--no-uvloop]   (prints "listening PORT", serves until killed)

What it would take to cost per message what the WebSocket port costs: the relay parses HTTP/2 frames
and the gRPC 5-byte message prefix itself, in the event loop's own data_received, and writes relayed
messages straight to the other connection's transport. hpack (already a dependency of grpclib/h2)
decodes and encodes the HEADERS, once per stream. The same wire protocol as bench/plain_relay.py, so
today's grpc.aio clients and agents talk to it unchanged.

A prototype, not a server: TLS only as the loop's SSL transport with ALPN h2 when OSMO_BENCH_TLS_CERT
and OSMO_BENCH_TLS_KEY name the files (no client certificates), no compression, no deadlines or
cancellation beyond RST_STREAM, no keepalive of its own (it answers PINGs), inbound flow control by
acknowledging on receipt and pausing reading of the source connection while the destination is
congested, outbound flow control by the peer's windows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import struct
from collections.abc import Callable
from typing import Any

import hpack

from bench.plain_relay import OPEN, READY
from osmo_router.wire.protocol import ENCODED_SESSION_END, pb

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
#: What we let the peers send ahead: per stream, and for the whole connection.
STREAM_WINDOW = 8 * 2**20
CONNECTION_WINDOW = 64 * 2**20
#: Acknowledge received bytes (WINDOW_UPDATE) once this many are unacknowledged.
ACK_EVERY = 2**20
#: Stop reading the source connection while the destination has this much unsent.
CONGESTED = 4 * 2**20
MAX_FRAME = 2**20
_HEADER = struct.Struct(">IBI")  # length (24 bits) and type in one word, flags, stream id

EXEC = "/osmo.router.v1.RouterClientService/Exec"
CONNECT = "/osmo.router.v1.RouterAgentService/Connect"


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


class Stream:
    """One gRPC call: its receive buffer, its send window and what waits for it."""

    __slots__ = (
        "closed",
        "conn",
        "ended_in",
        "ended_out",
        "headers_sent",
        "id",
        "inbox",
        "on_message",
        "out",
        "unacked",
        "window",
    )

    def __init__(self, conn: Connection, stream_id: int, window: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.window = window
        self.inbox = bytearray()
        self.out = bytearray()  # gRPC-framed bytes not yet sent for lack of window
        self.headers_sent = False
        self.ended_in = False  # the peer's END_STREAM
        self.ended_out = False  # our trailers are due once `out` is empty
        self.closed = False  # our trailers were sent
        self.unacked = 0  # bytes read and not yet given back to the peer's window
        self.on_message: Callable[[Stream, bytes | None], None] = lambda _s, _m: None

    def send(self, message: bytes) -> None:
        """Queue one gRPC message to the peer."""
        if not self.headers_sent:
            self.headers_sent = True
            self.conn.write(frame(HEADERS, END_HEADERS, self.id, self.conn.response_headers))
        self.out += b"\x00" + len(message).to_bytes(4, "big") + message
        self.conn.flush(self)

    def finish(self) -> None:
        """End the call with status OK once everything queued is sent."""
        self.ended_out = True
        self.conn.flush(self)


class Relay:
    """Pairs streams by session key, as bench/plain_relay.py does."""

    def __init__(self) -> None:
        self.waiting: dict[str, Stream] = {}
        self.peer: dict[Stream, Stream] = {}

    def _pair(self, key: str, stream: Stream) -> Stream | None:
        other = self.waiting.pop(key, None)
        if other is None:
            self.waiting[key] = stream
            return None
        self.peer[stream], self.peer[other] = other, stream
        return other

    def open(self, path: str, stream: Stream) -> None:
        """A new call: its first message is the init."""
        if path == EXEC:
            stream.on_message = self._client_init
        elif path == CONNECT:
            stream.on_message = self._agent_init
        else:
            stream.conn.reset(stream, 12)  # INADEQUATE_SECURITY stands in for "unimplemented" here

    def _client_init(self, stream: Stream, message: bytes | None) -> None:
        if message is None:
            stream.finish()
            return
        other = self._pair(pb.ExecRequest.FromString(message).init.target.session_key, stream)
        stream.on_message = self._forward
        if other is not None:
            self._joined(client=stream, agent=other)

    def _agent_init(self, stream: Stream, message: bytes | None) -> None:
        if message is None:
            stream.finish()
            return
        other = self._pair(pb.ConnectRequest.FromString(message).init.session_key, stream)
        stream.on_message = self._forward
        if other is not None:
            self._joined(client=other, agent=stream)

    def _joined(self, client: Stream, agent: Stream) -> None:
        client.send(READY)
        agent.send(OPEN)
        client.on_message = self._from_client
        agent.on_message = self._from_agent

    def _forward(self, stream: Stream, message: bytes | None) -> None:
        raise RuntimeError("a message before the session was joined")  # the load generator never does this

    def _from_client(self, stream: Stream, message: bytes | None) -> None:
        if message is not None:
            agent = self.peer.get(stream)
            if agent is not None:  # after the agent's end the client's last messages have nowhere to go
                agent.send(message)
                stream.conn.throttle(agent.conn)
            return
        stream.finish()  # the client ended: its call ends (the agent's goes on until the agent ends)

    def _from_agent(self, stream: Stream, message: bytes | None) -> None:
        client = self.peer[stream]
        if message is not None:
            client.send(message)
            stream.conn.throttle(client.conn)
            return
        client.send(ENCODED_SESSION_END)
        stream.finish()
        self.peer.pop(stream, None)
        self.peer.pop(client, None)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection (server side)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface = False
        self.streams: dict[int, Stream] = {}
        self.decoder = hpack.Decoder()
        self.encoder = hpack.Encoder()
        self.response_headers = self.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        self.trailers = b""  # encoded once the first call ends (the encoder is stateful: one order of use)
        self.send_window = 65535
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.unacked = 0
        self.header_block: tuple[int, int, bytearray] | None = None
        self.paused_sources: set[Connection] = set()
        self.writing_paused = False
        self.blocked: dict[int, Stream] = {}

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        settings = struct.pack(">HIHIHI", 0x3, 2**31 - 1, 0x4, STREAM_WINDOW, 0x5, MAX_FRAME)
        self.write(frame(SETTINGS, 0, 0, settings))
        self.write(frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - 65535).to_bytes(4, "big")))

    def connection_lost(self, exc: Exception | None) -> None:
        for source in self.paused_sources:
            source.resume()
        self.paused_sources.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._release()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.preface:
            if len(buf) < len(PREFACE):
                return
            if bytes(buf[: len(PREFACE)]) != PREFACE:
                self.close()
                return
            del buf[: len(PREFACE)]
            self.preface = True
        pos, size = 0, len(buf)
        while size - pos >= 9:
            word, flags, stream_id = _HEADER.unpack_from(buf, pos)
            length, kind = word >> 8, word & 0xFF
            end = pos + 9 + length
            if end > size:
                break
            payload = memoryview(buf)[pos + 9 : end]
            try:
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
            finally:
                payload.release()
            pos = end
        del buf[:pos]
        if self.unacked >= ACK_EVERY:
            self.write(frame(WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4, "big")))
            self.unacked = 0

    # -- frames --------------------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION and self.header_block is not None:
            self.header_block[2].extend(payload)
            if flags & END_HEADERS:
                self._headers_done()
        elif kind == SETTINGS and not flags & ACK:
            self._settings(payload)
        elif kind == PING and not flags & ACK:
            self.write(frame(PING, ACK, 0, bytes(payload)))
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, int.from_bytes(payload, "big") & 0x7FFFFFFF)
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream.ended_in = stream.ended_out = True
        elif kind == GOAWAY:
            self.close()

    def _settings(self, payload: memoryview) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == 0x4:
                delta, self.peer_initial_window = value - self.peer_initial_window, value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == 0x5:
                self.peer_max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        for stream in list(self.streams.values()):
            self.flush(stream)

    def _headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        start, end = 0, len(payload)
        if flags & PADDED:
            start, end = 1, end - payload[0]
        if flags & PRIORITY:
            start += 5
        self.header_block = (stream_id, flags, bytearray(payload[start:end]))
        if flags & END_HEADERS:
            self._headers_done()

    def _headers_done(self) -> None:
        assert self.header_block is not None
        stream_id, flags, block = self.header_block
        self.header_block = None
        headers = dict(self.decoder.decode(bytes(block)))
        if stream_id in self.streams:  # trailers from the peer: not sent by gRPC clients; treat as the end
            self._ended(self.streams[stream_id])
            return
        stream = self.streams[stream_id] = Stream(self, stream_id, self.peer_initial_window)
        self.relay.open(str(headers.get(":path", "")), stream)
        if flags & END_STREAM:
            self._ended(stream)

    def _data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        self.unacked += len(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        inbox = stream.inbox
        inbox += payload
        consumed = 0
        while len(inbox) - consumed >= 5:
            length = int.from_bytes(inbox[consumed + 1 : consumed + 5], "big")
            stop = consumed + 5 + length
            if stop > len(inbox):
                break
            stream.on_message(stream, bytes(inbox[consumed + 5 : stop]))
            consumed = stop
        if consumed:
            del inbox[:consumed]
            stream.unacked += consumed
            if stream.unacked >= ACK_EVERY:
                self.write(frame(WINDOW_UPDATE, 0, stream_id, stream.unacked.to_bytes(4, "big")))
                stream.unacked = 0
        if flags & END_STREAM:
            self._ended(stream)

    def _ended(self, stream: Stream) -> None:
        stream.ended_in = True
        stream.on_message(stream, None)
        self._maybe_forget(stream)

    def _window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self.send_window += increment
            for stream in list(self.blocked.values()):
                self.flush(stream)
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.window += increment
            self.flush(stream)

    # -- sending ---------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def flush(self, stream: Stream) -> None:
        """Send what the windows allow of a stream's queued bytes, then its trailers if due."""
        out = stream.out
        while out:
            room = min(len(out), stream.window, self.send_window, self.peer_max_frame)
            if room <= 0:
                self.blocked[stream.id] = stream
                return
            self.write(frame(DATA, 0, stream.id, bytes(out[:room])))
            del out[:room]
            stream.window -= room
            self.send_window -= room
        self.blocked.pop(stream.id, None)
        if stream.ended_out and not stream.closed:
            if not stream.headers_sent:
                stream.headers_sent = True
                self.write(frame(HEADERS, END_HEADERS, stream.id, self.response_headers))
            if not self.trailers:
                self.trailers = self.encoder.encode([("grpc-status", "0")])
            self.write(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, self.trailers))
            stream.closed = True
            self._maybe_forget(stream)
        self._release()

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.ended_in and stream.closed:
            self.streams.pop(stream.id, None)
            self.blocked.pop(stream.id, None)

    def reset(self, stream: Stream, code: int) -> None:
        self.write(frame(RST_STREAM, 0, stream.id, code.to_bytes(4, "big")))
        self.streams.pop(stream.id, None)

    # -- backpressure between connections -------------------------------------------------------------

    def congested(self) -> bool:
        return self.writing_paused or sum(len(s.out) for s in self.blocked.values()) >= CONGESTED

    def throttle(self, destination: Connection) -> None:
        """Stop reading this connection while the destination cannot take more."""
        if destination is not self and destination.congested() and self not in destination.paused_sources:
            destination.paused_sources.add(self)
            if self.transport is not None:
                self.transport.pause_reading()

    def _release(self) -> None:
        if self.paused_sources and not self.congested():
            sources, self.paused_sources = self.paused_sources, set()
            for source in sources:
                source.resume()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def server_tls() -> ssl.SSLContext | None:
    """TLS with ALPN h2 when OSMO_BENCH_TLS_CERT/KEY name the files (compare_paths --tls), else None."""
    cert, key = os.environ.get("OSMO_BENCH_TLS_CERT"), os.environ.get("OSMO_BENCH_TLS_KEY")
    if not (cert and key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


async def serve() -> None:
    """Listen on a free loopback port, print it, serve until killed."""
    relay = Relay()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(relay), "127.0.0.1", 0, ssl=server_tls())
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    """Serve on uvloop unless told not to."""
    parser = argparse.ArgumentParser(prog="bench.experiments.h2_relay")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if not args.no_uvloop:
        import uvloop

        uvloop.run(serve())
        return
    asyncio.run(serve())


if __name__ == "__main__":
    main()
