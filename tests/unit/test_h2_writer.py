"""VectorWriter: buffers to asyncio's socket transport in one writev, the rest through the transport, in order."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.h2.writer import VectorWriter


class Sink(asyncio.Protocol):
    """Collects what arrives until `total` bytes did."""

    def __init__(self, total: int) -> None:
        self.data = bytearray()
        self.total = total
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.total and not self.done.done():
            self.done.set_result(None)


@pytest.mark.asyncio
async def test_pieces_arrive_whole_and_in_order_past_a_full_socket() -> None:
    loop = asyncio.get_running_loop()
    pieces = [bytes([i]) * size for i, size in enumerate((14, 3 << 20, 1, 5, 2 << 20, 14, 1 << 20))]
    expected = b"".join(pieces) * 3
    sink = Sink(len(expected))
    server = await loop.create_server(lambda: sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    try:
        writer = VectorWriter(transport)
        assert writer._fd >= 0  # asyncio's socket transport: the writev path is the one tested
        for _ in range(3):  # the first vector overflows the socket: the later ones queue behind it
            writer.writelines(pieces)
        assert transport.get_write_buffer_size() > 0
        async with asyncio.timeout(20):
            await sink.done
        assert bytes(sink.data) == expected
    finally:
        transport.close()
        server.close()
        await server.wait_closed()
