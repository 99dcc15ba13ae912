"""The native client channel (h2/channel.py) against a real grpc.aio server on loopback: every cardinality,
statuses and metadata, deadlines, cancellation, reconnection, TLS with ALPN, server-name override and mTLS."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from osmo_router.h2.channel import Channel, client_ssl_context
from osmo_router.h2.config import H2Config
from tests.security_kit import CertificateAuthority

WAIT = 10.0


class EchoService(grpc.GenericRpcHandler):
    """/test.Echo/{Unary,Count,Bidi,Join,Hang} on bytes (identity serializers)."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, Any]] = []
        self.joined: asyncio.Queue[bytes] = asyncio.Queue()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Join": grpc.stream_unary_rpc_method_handler(self.join),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang),
        }
        return handlers.get(method)

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.metadata = list(context.invocation_metadata() or ())
        if request == b"fail":
            context.set_trailing_metadata((("x-why", "because"),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing: 100% ünicode")
        return request[::-1]

    async def count(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def bidi(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            if request == b"stop":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stopped")
            yield request.upper()

    async def join(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        joined = b"+".join([r async for r in requests])
        self.joined.put_nowait(joined)
        return joined

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.Event().wait()  # ended by the client's deadline or cancellation
        return b""


async def start_server(port: int = 0, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    service = EchoService()
    server.add_generic_rpc_handlers((service,))
    server.service = service  # type: ignore[attr-defined]
    address = f"127.0.0.1:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    return server, bound


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Server, Channel]]:
    server, port = await start_server()
    channel = Channel(f"127.0.0.1:{port}")
    yield server, channel
    await channel.close()
    await server.stop(None)


@pytest.mark.asyncio
async def test_unary_with_metadata(served: tuple[grpc.aio.Server, Channel]) -> None:
    server, channel = served
    call = channel.unary_unary("/test.Echo/Unary")(b"abc", metadata=(("authorization", "Bearer t0k"),), timeout=WAIT)
    assert await call == b"cba"
    assert await call.code() == grpc.StatusCode.OK
    assert ("authorization", "Bearer t0k") in server.service.metadata  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_an_error_status_is_a_real_aio_rpc_error(served: tuple[grpc.aio.Server, Channel]) -> None:
    _server, channel = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Echo/Unary")(b"fail", timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "bad thing: 100% ünicode"
    assert ("x-why", "because") in tuple(caught.value.trailing_metadata())
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await channel.unary_unary("/test.Nothing/Here")(b"x", timeout=WAIT)
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.asyncio
async def test_bidi_write_read_done_writing_and_eof(served: tuple[grpc.aio.Server, Channel]) -> None:
    _server, channel = served
    call = channel.stream_stream("/test.Echo/Bidi")()
    await call.wait_for_connection()
    for word in (b"one", b"two"):
        await call.write(word)
        assert await asyncio.wait_for(call.read(), WAIT) == word.upper()
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), WAIT) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    failing = channel.stream_stream("/test.Echo/Bidi")()
    await failing.write(b"stop")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(failing.read(), WAIT)
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "stopped")
    with pytest.raises(asyncio.InvalidStateError):  # as grpc.aio: a finished call takes no writes
        await failing.write(b"after the end")


@pytest.mark.asyncio
async def test_server_and_client_streaming(served: tuple[grpc.aio.Server, Channel]) -> None:
    _server, channel = served
    got = [m async for m in channel.unary_stream("/test.Echo/Count")(b"4", timeout=WAIT)]
    assert got == [b"0", b"1", b"2", b"3"]
    assert await channel.stream_unary("/test.Echo/Join")(iter([b"a", b"b", b"c"]), timeout=WAIT) == b"a+b+c"
    call = channel.stream_unary("/test.Echo/Join")()
    await call.write(b"x")
    await call.write(b"y")
    await call.done_writing()
    assert await asyncio.wait_for(call, WAIT) == b"x+y"


@pytest.mark.asyncio
async def test_deadline_and_cancel(served: tuple[grpc.aio.Server, Channel]) -> None:
    _server, channel = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Echo/Hang")(b"", timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = channel.stream_stream("/test.Echo/Bidi")()
    await call.write(b"x")
    assert await asyncio.wait_for(call.read(), WAIT) == b"X"
    assert call.cancel()
    assert not call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    assert call.cancelled() and call.done()
    # The connection is still good for the next call.
    assert await channel.unary_unary("/test.Echo/Unary")(b"ok", timeout=WAIT) == b"ko"


@pytest.mark.asyncio
async def test_unreachable_then_reconnects_on_the_next_call_after_a_restart() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = Channel(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=WAIT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to connect to all addresses" in (caught.value.details() or "")
        assert "Connection refused" in (caught.value.details() or "")
        server, _ = await start_server(port)
        assert await channel.unary_unary("/test.Echo/Unary")(b"ab", timeout=WAIT) == b"ba"
        open_call = channel.stream_stream("/test.Echo/Bidi")()
        await open_call.write(b"x")
        assert await asyncio.wait_for(open_call.read(), WAIT) == b"X"
        await server.stop(None)  # the connection is lost under an open call
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await asyncio.wait_for(open_call.read(), WAIT)
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        server, _ = await start_server(port)
        assert await channel.unary_unary("/test.Echo/Unary")(b"cd", timeout=WAIT) == b"dc"
        await server.stop(None)
    finally:
        await channel.close()


@pytest.mark.asyncio
async def test_tls_alpn_server_name_and_client_certificates(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("test-ca")
    server_cert, server_key = ca.issue("localhost", server=True)
    client_cert, client_key = ca.issue("alice", server=False)
    for name, data in (("ca.pem", ca.pem), ("client.pem", client_cert), ("client.key", client_key)):
        (tmp_path / name).write_bytes(data)
    credentials = grpc.ssl_server_credentials(
        [(server_key, server_cert)], root_certificates=ca.pem, require_client_auth=True
    )
    server, port = await start_server(credentials=credentials)
    try:
        context = client_ssl_context(
            str(tmp_path / "ca.pem"), str(tmp_path / "client.pem"), str(tmp_path / "client.key")
        )
        async with Channel(f"127.0.0.1:{port}", ssl=context, server_name="localhost") as channel:
            assert await channel.unary_unary("/test.Echo/Unary")(b"tls", timeout=WAIT) == b"slt"
        # Without the client certificate the server refuses the handshake: UNAVAILABLE, as with grpc.
        bare = client_ssl_context(str(tmp_path / "ca.pem"))
        async with Channel(f"127.0.0.1:{port}", ssl=bare) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=WAIT)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # A name the certificate does not hold fails verification.
        async with Channel(f"127.0.0.1:{port}", ssl=context, server_name="elsewhere.example") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as mismatch:
                await channel.unary_unary("/test.Echo/Unary")(b"x", timeout=WAIT)
            assert "CERTIFICATE_VERIFY_FAILED" in (mismatch.value.details() or "")
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_keepalive_pings_end_a_call_on_a_silent_peer() -> None:
    """A peer that sends its SETTINGS, then nothing (no PING ack): the call fails UNAVAILABLE within the timeout."""
    empty_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)
        writer.write(empty_settings)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = H2Config(keepalive_time=0.2, keepalive_timeout=0.3)
    channel = Channel(f"127.0.0.1:{port}", config=config)
    try:
        call = channel.stream_stream("/test.Echo/Bidi")()
        await call.write(b"anyone?")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), WAIT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_the_status_is_known_without_reading_and_unread_messages_stay_readable(
    served: tuple[grpc.aio.Server, Channel],
) -> None:
    _server, channel = served
    call = channel.unary_stream("/test.Echo/Count")(b"3", timeout=WAIT)
    assert await asyncio.wait_for(call.code(), WAIT) == grpc.StatusCode.OK  # nothing read yet
    assert [m async for m in call] == [b"0", b"1", b"2"]


@pytest.mark.asyncio
async def test_cancel_after_the_end_of_the_requests_lets_the_server_take_them_all(
    served: tuple[grpc.aio.Server, Channel],
) -> None:
    """What a client sent before its END_STREAM (a Detach frame, say) is not lost to a cancel right after."""
    server, channel = served
    call = channel.stream_unary("/test.Echo/Join")()
    for part in (b"a", b"b", b"detach"):
        await call.write(part)
    await call.done_writing()
    assert call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    assert await asyncio.wait_for(server.service.joined.get(), WAIT) == b"a+b+detach"  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_a_raw_listener_never_takes_a_message_ahead_of_one_code_took_off_the_stream(
    served: tuple[grpc.aio.Server, Channel],
) -> None:
    # The raw listener goes to the h2 stream itself (no guard call per message, issue 18): while a
    # message that `code()` took off the stream waits for `read`, the stream must have no listener,
    # and get it back once that message was read.
    _server, channel = served
    call = channel.stream_stream("/test.Echo/Bidi")()
    await call.wait_for_connection()
    accept = False
    taken: list[bytes] = []
    took = asyncio.Event()

    def listener(message: bytes) -> bool:
        if accept:
            taken.append(message)
            took.set()
        return accept

    call.set_listener(listener, raw=True)
    stream = call._stream
    assert stream is not None
    # What the test waits on: a second read of the stream begun (the first took "A"), a DATA payload arrived.
    reading_again, arrived = asyncio.Event(), asyncio.Event()
    reads: list[None] = []
    read, received_data = stream.read, stream.received_data

    async def read_seen() -> bytes | None:
        reads.append(None)
        if len(reads) == 2:
            reading_again.set()
        return await read()

    def received_data_seen(payload: memoryview, flow: int) -> None:
        received_data(payload, flow)
        arrived.set()

    stream.read = read_seen  # type: ignore[method-assign]
    stream.received_data = received_data_seen  # type: ignore[method-assign]
    await call.write(b"a")
    await asyncio.wait_for(arrived.wait(), WAIT)  # declined: "A" waits on the stream
    ending = asyncio.create_task(call.code())  # takes "A" off the stream, then waits for the end
    await asyncio.wait_for(reading_again.wait(), WAIT)
    assert list(call._buffer) == [b"A"]
    ending.cancel()
    await asyncio.gather(ending, return_exceptions=True)
    accept = True
    arrived.clear()
    await call.write(b"b")
    await asyncio.wait_for(arrived.wait(), WAIT)
    assert taken == []  # "B" waits behind "A", for `read`
    assert await asyncio.wait_for(call.read(), WAIT) == b"A"
    assert await asyncio.wait_for(call.read(), WAIT) == b"B"
    await call.write(b"c")  # nothing waits for `read` any more: the listener again
    await asyncio.wait_for(took.wait(), WAIT)
    assert taken == [b"C"]
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), WAIT) is grpc.aio.EOF
