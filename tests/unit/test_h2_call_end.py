"""A client call the server ended while the client was still writing (h2/client_calls.py, wire/streams.py).

The router ends a draining session with trailers (UNAVAILABLE "router draining: ...") while the
client may be in the middle of sending. The client's next write must find the call finished with
that status, whoever reads first, so its resume tells the user the router's reason; the messages
sent before the trailers stay readable.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from osmo_router.h2.client_calls import Call
from osmo_router.h2.config import H2Config
from osmo_router.h2.stream import Stream
from osmo_router.wire.protocol import pb
from osmo_router.wire.streams import FrameStream
from tests.h2_pair import REQUEST, Pair, connected_pair, read_until

WAIT = 10.0
DRAINING = "router draining: the session resumes once the router is back"


async def _ended_by_the_server(pair: Pair) -> tuple[Call, Stream]:
    """A stream-stream call whose server sent one message, then its trailers, without reading on."""
    call = Call(lambda: pair.client.open_stream(REQUEST), None, None, None)
    await call.write(b"hello")
    served = await asyncio.wait_for(pair.streams.get(), WAIT)
    assert await asyncio.wait_for(served.read(), WAIT) == b"hello"
    served.send_headers([(":status", "200"), ("content-type", "application/grpc")])
    served.write_nowait(b"before the end")
    served.end([("grpc-status", str(grpc.StatusCode.UNAVAILABLE.value[0])), ("grpc-message", DRAINING)])
    return call, served


async def _write_until_refused(send: object) -> BaseException:
    """Write until a write fails (the trailers have arrived); that failure."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                await send()  # type: ignore[operator]
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as err:
                return err


@pytest.mark.asyncio
async def test_a_write_after_the_servers_trailers_finds_the_call_done_with_their_status() -> None:
    async with connected_pair(H2Config()) as pair:
        call, _served = await _ended_by_the_server(pair)
        refused = await _write_until_refused(lambda: call.write(b"more"))
        assert isinstance(refused, asyncio.InvalidStateError), refused
        assert call.done(), "the write refused a call that has no status yet"
        assert (await call.code(), await call.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
        assert await asyncio.wait_for(call.read(), WAIT) == b"before the end"
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), WAIT)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [False, True])
async def test_a_frame_stream_write_reports_the_servers_status_when_nobody_read_it(raw: bool) -> None:
    """What the client's resume meets: the router's status, not 'RPC already finished.' (seen in CI)."""
    async with connected_pair(H2Config()) as pair:
        call, _served = await _ended_by_the_server(pair)
        stream = FrameStream(call, lambda frame: frame.SerializeToString(), raw=raw)
        send = (lambda: stream.send_data(b"x")) if raw else (lambda: stream.send(pb.Frame(data=b"x")))
        refused = await _write_until_refused(send)
        assert isinstance(refused, grpc.aio.AioRpcError), refused
        assert (refused.code(), refused.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING)


@pytest.mark.asyncio
async def test_a_write_waiting_on_the_window_reports_the_servers_status_when_the_connection_then_drops() -> None:
    """The router's drain: its trailers, then its exit, while the client's upload waits on a window the
    router no longer opens. The write woken by the lost connection must report the trailers' status
    (as `read` does), not "Socket closed": the client's resume tells the user the router's reason."""
    async with connected_pair(H2Config(stream_window=64 * 1024)) as pair:
        call = Call(lambda: pair.client.open_stream(REQUEST), None, None, None)
        await call.write(b"hello")
        served = await asyncio.wait_for(pair.streams.get(), WAIT)
        assert await asyncio.wait_for(served.read(), WAIT) == b"hello"
        served.send_headers([(":status", "200"), ("content-type", "application/grpc")])
        sending = pair.client.streams[served.id]
        chunk = bytes(16 * 1024)
        while call.try_write(chunk):  # the server reads no more: the stream window runs out
            pass
        writer = asyncio.ensure_future(call.write(chunk))
        await asyncio.sleep(0)  # (its first step: it queues the chunk and waits for the window)
        assert sending.unsent and not writer.done()
        served.end([("grpc-status", str(grpc.StatusCode.UNAVAILABLE.value[0])), ("grpc-message", DRAINING)])
        pair.servers[0].transport.close()  # (after the trailers it holds)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(writer, WAIT)
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING)
        assert (await call.code(), await call.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING)


@pytest.mark.asyncio
async def test_a_complete_response_stays_readable_after_the_connection_is_lost() -> None:
    """The router sends a session's last output, its exit status and its trailers, then exits before
    the client read them: the client still reads every message, then the trailers' status."""
    async with connected_pair(H2Config()) as pair:
        call = Call(lambda: pair.client.open_stream(REQUEST), None, None, None)
        await call.write(b"hello")  # the client's side stays open (no half-close), as a session's does
        served = await asyncio.wait_for(pair.streams.get(), WAIT)
        served.send_headers([(":status", "200"), ("content-type", "application/grpc")])
        last = [b"output", b"more output", b"exit status 3"]
        for message in last:
            served.write_nowait(message)
        served.end([("grpc-status", "0")])
        stream = call._stream
        assert stream is not None
        await asyncio.wait_for(read_until(pair.client, lambda: stream.ended_in), WAIT)
        # Closed with the client's PING ack or window update unread, the socket sends RST, which would
        # also drop bytes still in the client's kernel buffer: the trailers are in its stream already.
        pair.servers[0].transport.close()
        await asyncio.wait_for(pair.client.wait_closed(), WAIT)
        assert [await asyncio.wait_for(call.read(), WAIT) for _ in last] == last
        assert await asyncio.wait_for(call.read(), WAIT) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
