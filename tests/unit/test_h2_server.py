"""The native server with real grpc.aio channels over loopback: cardinalities, status, metadata, deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import pytest
import pytest_asyncio

from osmo_router.h2.config import H2Config
from osmo_router.h2.connection import Connection
from osmo_router.h2.frames import ErrorCode
from osmo_router.h2.server import NativeServer

SERVICE = "t.Svc"
seen: dict[str, Any] = {}


async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    seen["metadata"] = dict(context.invocation_metadata())
    seen["peer"] = context.peer()
    return request.upper()


async def unary_stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for i in range(3):
        yield request + str(i).encode()


async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return b"+".join([r async for r in requests])


async def aborting(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    context.set_trailing_metadata((("why-bin", b"\x00\xff"),))
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "nein: ü 100%")
    raise AssertionError("abort returned")


async def hanging(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    seen["remaining"] = context.time_remaining()
    try:
        await asyncio.Event().wait()
    finally:
        seen["cancelled"].set()
    return b""


async def failing(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError("boom")


@pytest_asyncio.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = NativeServer(H2Config(max_message_size=1 << 20))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "Abort": grpc.unary_unary_rpc_method_handler(aborting),
        "Hang": grpc.unary_unary_rpc_method_handler(hanging),
        "Fail": grpc.unary_unary_rpc_method_handler(failing),
    }
    server.add_registered_method_handlers(SERVICE, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen.clear()
    seen["cancelled"] = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


def _m(name: str) -> str:
    return f"/{SERVICE}/{name}"


@pytest.mark.asyncio
async def test_the_four_cardinalities_and_metadata(channel: grpc.aio.Channel) -> None:
    async with asyncio.timeout(10):
        md = (("x-user", "ann"), ("token-bin", b"\x01\x02\x03"))
        assert await channel.unary_unary(_m("Unary"))(b"abc", metadata=md) == b"ABC"
        assert seen["metadata"]["x-user"] == "ann"
        assert seen["metadata"]["token-bin"] == b"\x01\x02\x03"
        assert seen["peer"].startswith("ipv4:127.0.0.1:")
        assert [r async for r in channel.unary_stream(_m("UnaryStream"))(b"r")] == [b"r0", b"r1", b"r2"]

        async def parts() -> AsyncIterator[bytes]:
            for part in (b"a", b"b", b"c"):
                yield part

        assert await channel.stream_unary(_m("StreamUnary"))(parts()) == b"a+b+c"


@pytest.mark.asyncio
async def test_abort_sends_code_details_and_trailing_metadata(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(channel.unary_unary(_m("Abort"))(b""), 10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "nein: ü 100%"
    assert dict(err.value.trailing_metadata())["why-bin"] == b"\x00\xff"


@pytest.mark.asyncio
async def test_errors_unknown_methods_and_oversized_messages(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(channel.unary_unary(_m("Fail"))(b""), 10)
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(channel.unary_unary(_m("Nope"))(b""), 10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(channel.unary_unary(_m("Unary"))(b"x" * ((1 << 20) + 1)), 10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.asyncio
async def test_a_deadline_cancels_the_handler(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(channel.unary_unary(_m("Hang"))(b"", timeout=0.5), 10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # grpc core rounds the grpc-timeout header up to a coarser value (0.50095 s seen for 0.5 s)
    assert 0 < seen["remaining"] <= 0.51
    async with asyncio.timeout(5):  # the server's own deadline cancels the handler
        await seen["cancelled"].wait()


@pytest.mark.asyncio
async def test_compressed_requests_are_unimplemented(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        call = channel.unary_unary(_m("Unary"))
        await asyncio.wait_for(call(b"abc" * 100, compression=grpc.Compression.Gzip), 10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.asyncio
async def test_a_finished_call_whose_client_does_not_read_is_reset_after_the_grace() -> None:
    """The status waits behind data the client does not read: after close_grace the stream is reset, not held."""

    async def flood(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            async with asyncio.timeout(0.3):
                while True:
                    yield b"x" * 65536
        except TimeoutError:
            return

    server = NativeServer(H2Config(), close_grace=0.3)
    server.add_registered_method_handlers(SERVICE, {"Flood": grpc.unary_stream_rpc_method_handler(flood)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: Connection("client", H2Config(stream_window=65535)), "127.0.0.1", port
    )
    try:
        async with asyncio.timeout(10):
            await client.ready()
            headers = [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/Flood"), (":authority", "x")]
            stream = await client.open_stream([*headers, ("content-type", "application/grpc"), ("te", "trailers")])
            await stream.write(b"")
            stream.end()
            await stream.wait_closed()  # never reading a message
        assert stream.reset_code == ErrorCode.CANCEL
        assert not server.calls
    finally:
        client.close()
        await server.stop(0)
