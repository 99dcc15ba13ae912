"""The echo's client side without grpc.aio: both ends of a session on a minimal asyncio HTTP/2 gRPC client.

    python -m bench.experiments.h2_client --address A [--rounds N] [--cpu-pid PID]

What the echo costs when the client and the agent are as cheap per message as the WS port's aiohttp
ends: the same framing as bench/experiments/h2_relay.py on the client side (request HEADERS with
hpack, DATA frames with the gRPC 5-byte prefix, PING and SETTINGS answered), one connection for the
client's Exec stream and one for the agent's Connect stream, like bench.loadgen's grpc-echo. Works
against any gRPC relay speaking the router's wire protocol (the router, plain grpc.aio, h2_relay).
Prints one JSON line like grpc-echo: samples_us, cpu_s of --cpu-pid over the timed part, round_trips.

A prototype of the measurement only: no TLS, no send-side flow control (an echo of 1-byte messages
stays far inside the initial windows), trailers read as the end of a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import ssl
import struct
import time
from typing import Any

import hpack

from bench import wire
from bench.experiments.h2_relay import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from bench.loadgen import emit, relay_cpu
from osmo_router.wire.codec import encode_data_message as data_message

_HEADER = struct.Struct(">IBI")
WINDOW = 8 * 2**20


class Client(asyncio.Protocol):
    """One HTTP/2 connection, client side, whose streams deliver messages into asyncio queues."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.next_id = 1
        self.inbox: dict[int, bytearray] = {}
        self.queues: dict[int, asyncio.Queue[bytes | None]] = {}
        self.unacked = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        settings = struct.pack(">HIHI", 0x4, WINDOW, 0x2, 0)
        transport.write(PREFACE + frame(SETTINGS, 0, 0, settings))
        transport.write(frame(WINDOW_UPDATE, 0, 0, (8 * WINDOW).to_bytes(4, "big")))

    def open(self, path: str) -> int:
        """A new call; its stream id."""
        stream_id, self.next_id = self.next_id, self.next_id + 2
        headers = [
            (":method", "POST"),
            (":scheme", "https" if os.environ.get(wire.TLS_CA_ENV) else "http"),
            (":path", path),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.inbox[stream_id] = bytearray()
        self.queues[stream_id] = asyncio.Queue()
        assert self.transport is not None
        self.transport.write(frame(HEADERS, END_HEADERS, stream_id, self.encoder.encode(headers)))
        return stream_id

    def send(self, stream_id: int, message: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame(DATA, 0, stream_id, b"\x00" + len(message).to_bytes(4, "big") + message))

    def end(self, stream_id: int) -> None:
        assert self.transport is not None
        self.transport.write(frame(DATA, END_STREAM, stream_id))

    async def recv(self, stream_id: int) -> bytes | None:
        return await self.queues[stream_id].get()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, size = 0, len(buf)
        while size - pos >= 9:
            word, flags, stream_id = _HEADER.unpack_from(buf, pos)
            length, kind = word >> 8, word & 0xFF
            end = pos + 9 + length
            if end > size:
                break
            payload = bytes(buf[pos + 9 : end])
            pos = end
            stream_id &= 0x7FFFFFFF
            if kind == DATA:
                self._data(flags, stream_id, payload)
            elif kind == HEADERS:
                self.decoder.decode(payload)  # keeps the decoder's table in step; the values are not needed
                if flags & END_STREAM and stream_id in self.queues:
                    self.queues[stream_id].put_nowait(None)
            elif kind == SETTINGS and not flags & ACK:
                assert self.transport is not None
                self.transport.write(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                assert self.transport is not None
                self.transport.write(frame(PING, ACK, 0, payload))
        del buf[:pos]

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        assert self.transport is not None
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        inbox = self.inbox.get(stream_id)
        if inbox is None:
            return
        inbox += payload
        consumed = 0
        while len(inbox) - consumed >= 5:
            stop = consumed + 5 + int.from_bytes(inbox[consumed + 1 : consumed + 5], "big")
            if stop > len(inbox):
                break
            self.queues[stream_id].put_nowait(bytes(inbox[consumed + 5 : stop]))
            consumed = stop
        del inbox[:consumed]
        self.unacked += len(payload)
        if self.unacked >= 2**20:  # give the windows back now and then (both: one stream per connection)
            increment = self.unacked.to_bytes(4, "big")
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, increment) + frame(WINDOW_UPDATE, 0, stream_id, increment))
            self.unacked = 0
        if flags & END_STREAM:
            self.queues[stream_id].put_nowait(None)


async def connect(address: str) -> Client:
    host, _, port = address.rpartition(":")
    context = None
    if ca := os.environ.get(wire.TLS_CA_ENV):
        context = ssl.create_default_context(cafile=ca)
        context.set_alpn_protocols(["h2"])
    loop = asyncio.get_running_loop()
    _transport, client = await loop.create_connection(lambda: Client(address), host, int(port), ssl=context)
    return client


async def echo(args: argparse.Namespace) -> None:
    """1-byte round trips client -> agent -> client through the relay at --address."""
    client, agent = await connect(args.address), await connect(args.address)
    key = secrets.token_urlsafe(16)
    exec_id, connect_id = client.open(wire.EXEC), agent.open(wire.CONNECT)
    client.send(exec_id, wire.client_init(args.workflow, key))
    agent.send(connect_id, wire.agent_init(args.workflow, key))
    ready, opened = await client.recv(exec_id), await agent.recv(connect_id)
    if not ready or ready[0] != 0x0A or not opened or opened[0] != 0x0A:
        raise RuntimeError(f"not paired: {ready!r} {opened!r}")
    message = data_message(b"x")

    async def once() -> None:
        client.send(exec_id, message)
        got = await agent.recv(connect_id)
        if got != message:
            raise RuntimeError(f"agent got {got!r}")
        agent.send(connect_id, got)
        back = await client.recv(exec_id)
        if back != message:
            raise RuntimeError(f"client got {back!r}")

    warmup = 50
    cpu0 = relay_cpu(args)
    for _ in range(warmup):
        await once()
    samples = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        await once()
        samples.append((time.perf_counter() - t0) * 1e6)
    emit({"samples_us": samples, "cpu_s": relay_cpu(args) - cpu0, "round_trips": args.rounds + warmup})
    # End the session the way the load generator does: half-closes, SessionEnd, ends of both calls.
    from osmo_router.wire.protocol import ENCODED_HALF_CLOSE, ENCODED_SESSION_END

    client.send(exec_id, ENCODED_HALF_CLOSE)
    async with asyncio.timeout(wire.WAIT):
        while await agent.recv(connect_id) not in (ENCODED_HALF_CLOSE, None):
            pass
        agent.send(connect_id, ENCODED_HALF_CLOSE)
        agent.end(connect_id)
        while (back := await client.recv(exec_id)) is not None:
            if back == ENCODED_SESSION_END:
                client.end(exec_id)
    for side in (client, agent):
        if side.transport is not None:
            side.transport.close()


def main() -> None:
    """Parse the options, run on uvloop (like bench.loadgen)."""
    parser = argparse.ArgumentParser(prog="bench.experiments.h2_client")
    parser.add_argument("mode", nargs="?", default="echo", choices=["echo"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--workflow", default="bench")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--cpu-pid", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(echo(args))


if __name__ == "__main__":
    main()
