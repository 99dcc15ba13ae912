"""The native server's stop closes connections gracefully, within a bound (real sockets on loopback).

A call's status at shutdown (the router's "draining" status) sits behind data its client is still
reading: it must reach a client that reads, and a client that does not read must not hold the stop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import hpack

from osmo_router.h2 import frames as fr
from osmo_router.h2.config import H2Config
from osmo_router.h2.core import LINGER
from osmo_router.h2.server import NativeServer
from tests.h2_raw import grpc_headers

POUR = "/t.Svc/Pour"
#: One message the handler cannot get out while its client holds the window: what the stop's status waits behind.
MESSAGE = 2 << 20
#: The raw client gives back its window every PACE seconds: about 1.25 MiB/s, so reading MESSAGE takes
#: well over the second the server used to give a status before it closed the connection.
PACE = 0.05


class Pourer:
    """A handler that writes one MESSAGE, then waits until the server's stop cancels it."""

    def __init__(self) -> None:
        self.writing = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def pour(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            # Set before the write queues the message: whoever waits for it runs once the write waits.
            self.writing.set()
            await context.write(b"x" * MESSAGE)
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


async def _serve(close_grace: float) -> tuple[NativeServer, Pourer, int]:
    server = NativeServer(H2Config(max_message_size=4 << 20), close_grace=close_grace)
    pourer = Pourer()
    server.add_registered_method_handlers("t.Svc", {"Pour": grpc.stream_stream_rpc_method_handler(pourer.pour)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, pourer, port


class SlowClient:
    """A raw HTTP/2 client with the default 64 KiB windows that gives them back only every PACE seconds,
    as a busy client reads; it records what the server sent until its EOF or a reset."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = fr.FrameParser(fr.MAX_FRAME_LIMIT, 1 << 20)
        self.decoder = hpack.Decoder()
        self.data = 0
        self.trailers: dict[str, str] = {}
        self.goaway = False
        self.outcome = ""  # "eof" or the error that ended the connection

    @classmethod
    async def open(cls, port: int) -> SlowClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(fr.PREFACE + fr.encode_settings({}))
        headers = hpack.Encoder().encode(grpc_headers(POUR))
        writer.write(fr.encode(fr.HEADERS, fr.END_HEADERS, 1, headers))
        await writer.drain()
        return cls(reader, writer)

    async def read_all(self) -> None:
        """Read until the server's EOF, giving back the windows (stream and connection) every PACE seconds."""
        owed = 0
        try:
            while data := await self.reader.read(1 << 16):
                owed += sum(self._take(frame) for frame in self.parser.feed(data))
                if owed:
                    await asyncio.sleep(PACE)  # (pacing a slow reader, not waiting for anything)
                    self.writer.write(fr.window_update(1, owed) + fr.window_update(0, owed))
                    owed = 0
            self.outcome = "eof"
        except ConnectionError as err:
            self.outcome = repr(err)
        finally:
            self.writer.close()

    def _take(self, frame: fr.Frame) -> int:
        """Take in a frame (its payload is valid only until the next feed); the DATA bytes it had."""
        if frame.kind == fr.SETTINGS and not frame.flags & fr.ACK:
            self.writer.write(fr.encode(fr.SETTINGS, fr.ACK, 0))
        elif frame.kind == fr.DATA:
            self.data += len(frame.payload)
            return len(frame.payload)
        elif frame.kind == fr.HEADERS:
            fields = {str(k): str(v) for k, v in self.decoder.decode(bytes(frame.payload))}
            if frame.flags & fr.END_STREAM:
                self.trailers = fields
        elif frame.kind == fr.GOAWAY:
            self.goaway = True
        return 0


async def _status_reaches_a_slow_reader() -> None:
    server, pourer, port = await _serve(close_grace=30.0)
    client = await SlowClient.open(port)
    try:
        async with asyncio.timeout(30):
            await pourer.writing.wait()
            stop = asyncio.create_task(server.stop(grace=0.1))
            await pourer.cancelled.wait()
            # Only now does the client read: the status waits behind about 2 MiB it has yet to take.
            await client.read_all()
            await stop
    finally:
        client.writer.close()
    assert client.goaway
    assert client.data == MESSAGE + 5, f"{client.data} of {MESSAGE + 5} bytes"
    assert client.trailers.get("grpc-status") == "14", client.trailers
    assert client.trailers.get("grpc-message") == "server shutting down", client.trailers
    assert client.outcome == "eof", client.outcome  # FIN after the status, no reset


def test_stop_sends_the_status_behind_data_to_a_client_that_reads() -> None:
    asyncio.run(_status_reaches_a_slow_reader())


async def _stalled_reader_does_not_hold_the_stop() -> None:
    server, pourer, port = await _serve(close_grace=1.0)
    client = await SlowClient.open(port)
    try:
        async with asyncio.timeout(30):
            await pourer.writing.wait()
            started = time.monotonic()
            await server.stop(grace=0.1)
            took = time.monotonic() - started
            assert not server.connections
    finally:
        client.writer.close()
    # grace, then close_grace for the status, then LINGER for the FIN and the peer's EOF: then cut off.
    assert took < 0.1 + 1.0 + LINGER + 5.0, took  # (slack for a loaded machine)


def test_stop_is_bounded_when_the_client_does_not_read() -> None:
    asyncio.run(_stalled_reader_does_not_hold_the_stop())
