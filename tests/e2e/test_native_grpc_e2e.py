"""The router's native gRPC server (osmo_router.h2, --grpc-server native) against real grpc.aio clients.

What the rest of the suite does not already cover on the native server (exec, forwards, health, TLS
and mutual TLS, scale-out run there as they ran on grpc.aio): reflection, the memory a stalled
stream can make the router hold (its receive window), a client that resets its stream, a message
over the size limit, keepalive pings both ways, and grpcio still selectable.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from osmo_router.h2 import frames as fr
from osmo_router.h2.stream import CREDIT_FLOOR
from tests.e2e.test_memory_idle import rss_kib
from tests.harness import Router
from tests.raw_grpc import EXEC, RawCall, exec_init, frame, raw_channel, wait_metric

MIB = 1 << 20


@pytest.fixture
def native() -> Router:
    return Router("--grpc-server", "native")


def test_reflection_lists_the_services() -> None:
    router = Router("--grpc-server", "native")
    try:

        async def services() -> list[str]:
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)

                async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                    yield reflection_pb2.ServerReflectionRequest(list_services="")

                async with asyncio.timeout(10):
                    async for reply in stub.ServerReflectionInfo(requests()):
                        return sorted(s.name for s in reply.list_services_response.service)
            return []

        names = asyncio.run(services())
        assert "osmo.router.v1.RouterClientService" in names
        assert "grpc.health.v1.Health" in names
        assert "grpc.reflection.v1alpha.ServerReflection" in names
        assert '"grpc_server": "native"' in "\n".join(router.lines)
    finally:
        router.stop()


STREAMS, WINDOW, MESSAGE = 24, 1 * MIB, 256 * 1024


def test_stalled_streams_hold_at_most_their_window() -> None:
    """Streams the router does not read (pending rendezvous: no agent joins) each hold <= their window + one
    message; unpaired, a stream counts in no budget and keeps the initial 64 KiB window (CREDIT_FLOOR)."""
    router = Router("--stream-window-bytes", str(WINDOW), "--rendezvous-timeout", "60s")
    try:
        fresh = rss_kib(router.pid)

        async def attack() -> tuple[int, list[int]]:
            channel = raw_channel(router.address)
            calls = [RawCall(channel, EXEC, None) for _ in range(STREAMS)]
            written = [0] * STREAMS
            chunk = frame(data=b"x" * MESSAGE)

            async def push(i: int) -> None:
                await calls[i].send(exec_init("wf-stall", key=f"never-{i}"))
                for _ in range(64):  # 16 MiB each, 384 MiB in all if nothing held it back
                    if not await calls[i].send(chunk):
                        return
                    written[i] += 1

            tasks = [asyncio.create_task(push(i)) for i in range(STREAMS)]
            # Until the router's RSS stops growing (bounded): the windows are full.
            peak, stable_since, deadline = 0, time.monotonic(), time.monotonic() + 30
            while time.monotonic() < deadline and time.monotonic() - stable_since < 2.0:
                await asyncio.sleep(0.25)
                now = rss_kib(router.pid)
                if now > peak + 1024:
                    peak, stable_since = now, time.monotonic()
            peak = max(peak, rss_kib(router.pid))
            unfinished = sum(not t.done() for t in tasks)
            for call in calls:
                call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await channel.close()
            return peak, [unfinished, sum(written)]

        peak, (unfinished, written) = asyncio.run(attack())
        growth = (peak - fresh) * 1024
        bound = STREAMS * (CREDIT_FLOOR + 2 * MESSAGE) + 48 * MIB
        assert unfinished == STREAMS, "every writer is held back: the router stopped taking its data"
        assert written >= STREAMS, "the windows did let data in (a message each, across the initial window)"
        figures = f"router RSS grew {growth >> 20} MiB for {STREAMS} stalled streams (bound {bound >> 20} MiB)"
        print(figures)  # for the record (-rA)
        assert growth <= bound, figures
        # The clients reset their streams: the pending sessions are gone.
        asyncio.run(wait_metric(router, "router_grpc_rendezvous_pending", 0))
    finally:
        router.stop()


def test_a_client_that_resets_its_stream_ends_its_pending_session(native: Router) -> None:
    async def run() -> None:
        async with raw_channel(native.address) as channel:
            call = RawCall(channel, EXEC, None)
            await call.send(exec_init("wf-reset", key="k-reset"))
            await wait_metric(native, "router_grpc_rendezvous_pending", 1)
            call.cancel()
            await wait_metric(native, "router_grpc_rendezvous_pending", 0)
            # The connection goes on serving.
            again = RawCall(channel, EXEC, None)
            await again.send(b"\x00garbage")
            outcome = await again.finish()
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT

    try:
        asyncio.run(run())
    finally:
        native.stop()


def test_a_message_over_the_limit_is_resource_exhausted() -> None:
    router = Router("--max-message-size", str(2 * MIB))
    try:

        async def run() -> grpc.StatusCode:
            async with raw_channel(router.address) as channel:
                call = RawCall(channel, EXEC, None)
                await call.send(b"\x0a" + b"x" * (2 * MIB + 10))
                return (await call.finish()).code

        assert asyncio.run(run()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        router.stop()


def test_keepalive_closes_a_peer_that_does_not_answer_pings() -> None:
    """The router pings every --keepalive-time; a peer that never acks is closed after --keepalive-timeout."""
    router = Router("--keepalive-time", "1s", "--keepalive-timeout", "1s")
    try:
        with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
            sock.sendall(fr.PREFACE + fr.encode_settings({}))
            started = time.monotonic()
            pings, received = 0, b""
            while chunk := sock.recv(65536):  # bounded by the socket timeout
                received += chunk
                pings = received.count(bytes([fr.PING, 0]))  # rough: ping frames' type and flags
            elapsed = time.monotonic() - started
        assert pings >= 1
        assert 1.0 <= elapsed <= 8.0, f"closed after {elapsed:.1f}s"

        # A grpc.aio client answers the pings: its idle connection stays and serves after several of them.
        async def idle_then_call() -> grpc.StatusCode:
            async with raw_channel(router.address) as channel:
                await channel.channel_ready()
                await asyncio.sleep(3.5)  # the scenario itself: three keepalive periods of idleness
                state = channel.get_state()
                assert state == grpc.ChannelConnectivity.READY, state
                return (await RawCall(channel, EXEC, None).finish()).code

        assert asyncio.run(idle_then_call()) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        router.stop()


def test_grpcio_is_still_selectable() -> None:
    router = Router("--grpc-server", "grpcio")
    try:
        assert '"grpc_server": "grpcio"' in "\n".join(router.lines)

        async def run() -> grpc.StatusCode:
            async with raw_channel(router.address) as channel:
                return (await RawCall(channel, EXEC, None).finish()).code

        assert asyncio.run(run()) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        router.stop()
