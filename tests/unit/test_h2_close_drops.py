"""Frames that arrive behind our close are dropped (h2/reader.py `discard`), also those of the same read.

Connection.close lingers (write_eof, reading on to the peer's EOF): the transport is not `is_closing()`
meanwhile, so a stream opened after the close would write to a transport past its EOF. Real sockets on
loopback, a raw client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import hpack

from osmo_router.h2 import frames as fr
from osmo_router.h2.config import H2Config
from osmo_router.h2.server import NativeServer
from tests.h2_raw import grpc_headers

ECHO = "/t.Svc/Echo"


class Echo:
    """A handler that counts its invocations and answers every request."""

    def __init__(self) -> None:
        self.invoked = 0
        self.errors: list[BaseException] = []

    async def echo(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.invoked += 1
        try:
            async for request in requests:
                await context.write(request)
        except Exception as err:  # (a write to a transport past its EOF raised here)
            self.errors.append(err)
            raise


async def _headers_behind_a_goaway_open_no_stream() -> None:
    server = NativeServer(H2Config())
    echo = Echo()
    server.add_registered_method_handlers("t.Svc", {"Echo": grpc.stream_stream_rpc_method_handler(echo.echo)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(20):
            writer.write(fr.PREFACE + fr.encode_settings({}))
            await writer.drain()
            parser = fr.FrameParser(fr.MAX_FRAME_LIMIT, 1 << 20)
            settings = False
            while not settings:  # the server's SETTINGS: from now on its frame walk takes ours
                data = await reader.read(1 << 16)
                assert data, "the server closed before its SETTINGS"
                settings = any(f.kind == fr.SETTINGS and not f.flags & fr.ACK for f in parser.feed(data))
            # One write, so one read on the server: our GOAWAY (no stream open: the server closes at once),
            # then a request. The close drops what is behind it; the request must not open a call.
            request = b"\x00" + (4).to_bytes(4, "big") + b"ping"
            writer.write(
                fr.encode(fr.SETTINGS, fr.ACK, 0)
                + fr.goaway(0, fr.ErrorCode.NO_ERROR)
                + fr.encode(fr.HEADERS, fr.END_HEADERS, 1, hpack.Encoder().encode(grpc_headers(ECHO)))
                + fr.encode(fr.DATA, 0, 1, request)
            )
            await writer.drain()
            while await reader.read(1 << 16):  # until the server's FIN (its close)
                pass
            # The close happened in the walk of that read, before the HEADERS frame; a call made from it
            # would have been started by now (its task runs before our read saw the FIN).
            assert not server.calls, "a call was opened on a connection closed before its HEADERS"
            assert echo.invoked == 0, "the handler ran for a request that arrived behind our close"
            assert not echo.errors, echo.errors
    finally:
        writer.close()
        await server.stop(grace=0)


def test_frames_behind_our_close_in_the_same_read_are_dropped() -> None:
    asyncio.run(_headers_behind_a_goaway_open_no_stream())
