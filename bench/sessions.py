"""Load-generator modes about sessions rather than bytes: rendezvous latency and idle sessions held open."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

from bench import wire
from bench.loadgen import emit
from osmo_router.wire.codec import ENCODED_HALF_CLOSE
from osmo_router.wire.codec import encode_data_message as data_message
from osmo_router.wire.protocol import pb

FIRST_BYTE = data_message(b"x")


class FakeAgent:
    """A registered agent inside the load generator: answers session requests with an echo of the first frame.

    Like the real agent, it keeps `standby` Connect streams parked on the router (replacing each one
    a session takes), so a session starts without the SessionRequest round trip.
    """

    def __init__(self, channel: Any, workflow: str, standby: int = 0) -> None:
        self._channel = channel
        self._workflow = workflow
        self._standby = standby
        self._tasks: set[asyncio.Task[None]] = set()
        self._call: Any = None

    async def register(self) -> None:
        """Open the Register stream and wait for the router's confirmation."""
        self._call = self._channel.stream_stream(wire.REGISTER)()
        hello = pb.AgentHello(workflow_id=self._workflow, agent_id="loadgen", operations=[pb.OPERATION_EXEC])
        await self._call.write(pb.RegisterRequest(hello=hello).SerializeToString())
        first = pb.RegisterResponse.FromString(await wire.read(self._call) or b"")
        if first.WhichOneof("kind") != "registered":
            raise RuntimeError("registration was not confirmed")
        task = asyncio.create_task(self._serve())
        self._tasks.add(task)
        for _ in range(self._standby):
            self._tasks.add(asyncio.create_task(self._standby_slot()))

    async def _serve(self) -> None:
        while (raw := await wire.read(self._call)) is not None:
            message = pb.RegisterResponse.FromString(raw)
            if message.WhichOneof("kind") == "session_request":
                task = asyncio.create_task(self._session(message.session_request.session_key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _standby_slot(self) -> None:
        while True:
            call = self._channel.stream_stream(wire.CONNECT)()
            await call.write(wire.standby_init(self._workflow))
            opened = await wire.read(call)  # SessionOpen, once a session takes this stream
            if opened is None:
                raise RuntimeError(f"standby stream ended: {await call.code()} {await call.details()}")
            task = asyncio.create_task(self._echo(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _session(self, key: str) -> None:
        call = self._channel.stream_stream(wire.CONNECT)()
        await call.write(wire.agent_init(self._workflow, key))
        await wire.read(call)  # SessionOpen
        await self._echo(call)

    async def _echo(self, call: Any) -> None:
        first = await wire.read(call)
        if first is not None and first != ENCODED_HALF_CLOSE:
            await call.write(first)
            await wire.drain_agent(call, None)
        await wire.end_agent(call)

    async def close(self) -> None:
        """End the registration."""
        await self._call.done_writing()
        self._call.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def rendezvous(args: argparse.Namespace) -> None:
    """Client start to first byte back: open a session, send one byte, time until it returns.

    With --real-agent the parent runs `osmo-router agent` for the workflow (it spawns `cat`);
    otherwise the generator registers a fake agent that echoes. With --fresh-connection each
    round also dials a new connection to the router, as a new CLI process does.
    """
    agent_channel = wire.open_channel(args.address)
    agent = None if args.real_agent else FakeAgent(agent_channel, args.workflow, args.standby)
    if agent is not None:
        await agent.register()
    shared = wire.open_channel(args.address)
    samples = []
    for i in range(args.rounds + 10):
        started = time.perf_counter()
        channel = wire.open_channel(args.address) if args.fresh_connection else shared
        call = channel.stream_stream(wire.EXEC)()
        async with asyncio.timeout(wire.WAIT):
            await call.write(wire.client_init(args.workflow))
            await call.write(FIRST_BYTE)
            ready = await wire.read(call)
            echoed = await wire.read(call)
        elapsed = time.perf_counter() - started
        if not ready or ready[0] != 0x0A or echoed != FIRST_BYTE:
            raise RuntimeError(f"round {i}: {ready!r} {echoed!r}")
        if i >= 10:  # the first rounds warm caches and connections
            samples.append(elapsed * 1e6)
        await wire.finish_client(call)
        if channel is not shared:
            await channel.close()
    emit({"samples_us": samples})
    if agent is not None:
        await agent.close()
    await asyncio.gather(shared.close(), agent_channel.close())


async def _bounded(concurrency: int, jobs: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Any) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True)


async def _next_command() -> str:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def idle(args: argparse.Namespace) -> None:
    """Hold `sessions` paired sessions open; steps driven by the parent through stdin.

    warm: 50 sessions opened and closed; open: all sessions opened; check: one byte echoed on
    each; close: all closed. One result line after each step, then the next command is awaited.
    """
    count = args.channels
    clients = [wire.open_channel(args.address) for _ in range(count)]
    agents = [wire.open_channel(args.address) for _ in range(count)]
    warm = [await wire.open_pair(clients[i % count], agents[i % count], args.workflow) for i in range(50)]
    await asyncio.gather(*(wire.close_pair(p) for p in warm))
    emit({"step": "warm"})
    await _next_command()
    started = time.perf_counter()
    jobs = [wire.open_pair(clients[i % count], agents[i % count], args.workflow) for i in range(args.sessions)]
    results = await _bounded(200, jobs)
    pairs = [r for r in results if isinstance(r, wire.Pair)]
    errors = [repr(r) for r in results if not isinstance(r, wire.Pair)][:3]
    emit({"step": "open", "opened": len(pairs), "seconds": time.perf_counter() - started, "errors": errors})
    await _next_command()
    answers = await _bounded(200, [wire.echo(p) for p in pairs])
    emit({"step": "check", "answered": sum(1 for a in answers if a is None)})
    await _next_command()
    closed = await _bounded(200, [wire.close_pair(p) for p in pairs])
    emit({"step": "close", "closed": sum(1 for c in closed if c is None)})
    with contextlib.suppress(Exception):
        await asyncio.gather(*(c.close() for c in clients + agents))
