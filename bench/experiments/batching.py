"""Candidate (c): per-edge batching in the client, the load generator writing what is queued as one message.

    python -m bench.experiments.batching [throughput] --address A --size 4096 [--batch BYTES] [--seconds S]
    python -m bench.experiments.batching echo --address A [--batch BYTES] [--rounds N]

A producer per session puts `size`-byte chunks on a bounded queue (what a pipe or socket reader
does: DEPTH chunks at most, then it waits); a writer takes one chunk, and with `--batch` also every
chunk already queued behind it up to BYTES of payload, and sends them as one data frame. When the
queue holds one chunk (an idle or interactive session) the writer sends it at once: no added latency,
no timer. `--batch 0` is the same producer, queue and writer sending one message per chunk, so the
two differ only in the merging. Prints one JSON line like bench.loadgen's grpc-throughput
(plus `payload_per_message`), with `cpu_s` of `--cpu-pid` over the timed part; `echo` prints one like
grpc-echo, the client's side of every round trip going through the same queue and writer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from bench import wire
from bench.loadgen import emit, relay_cpu
from osmo_router.wire.codec import encode_data_message as data_message

#: Chunks a producer may have queued before it waits (128 KiB at 4 KiB: the router's coalescing cap).
DEPTH = 32


async def writer(
    queue: asyncio.Queue[bytes | None], write: Any, batch: int, encoded: dict[bytes, bytes] | None = None
) -> None:
    """Send what the queue holds until None: one data frame per chunk, or (batch > 0) with every chunk
    already queued behind it merged in, up to `batch` bytes. `encoded`: chunks with a ready message."""
    encoded = encoded or {}
    ended = False
    while not ended:
        item = await queue.get()
        if item is None:
            break
        if not batch or queue.empty():
            await write(encoded.get(item) or data_message(item))
            continue
        parts, size = [item], len(item)
        while size < batch and not queue.empty():
            more = queue.get_nowait()
            if more is None:
                ended = True
                break
            parts.append(more)
            size += len(more)
        await write(data_message(b"".join(parts)))


async def echo(args: argparse.Namespace) -> None:
    """1-byte round trips whose client side goes through the producer queue and the writer, one at a time:
    what batching costs an idle, interactive session (it should be nothing: the queue holds one chunk)."""
    client_ch, agent_ch = wire.open_channel(args.address), wire.open_channel(args.address)
    pair = await wire.open_pair(client_ch, agent_ch, args.workflow)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(DEPTH)
    sender = asyncio.create_task(writer(queue, pair.client.write, args.batch))
    expected = data_message(b"x")

    async def once() -> None:
        queue.put_nowait(b"x")
        got = await wire.read(pair.agent)
        if got != expected:
            raise RuntimeError(f"agent got {got!r}")
        await pair.agent.write(got)
        if await wire.read(pair.client) != expected:
            raise RuntimeError("client got something else")

    for _ in range(50):
        await once()
    cpu0 = relay_cpu(args)
    samples = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        await once()
        samples.append((time.perf_counter() - t0) * 1e6)
    emit({"samples_us": samples, "cpu_s": relay_cpu(args) - cpu0, "round_trips": args.rounds})
    queue.put_nowait(None)
    await sender
    await wire.close_pair(pair)
    await asyncio.gather(client_ch.close(), agent_ch.close())


async def run(args: argparse.Namespace) -> None:
    """Payload MB/s client -> agent through a relay, with or without merging queued chunks."""
    client_ch, agent_ch = wire.open_channel(args.address), wire.open_channel(args.address)
    pairs = [await wire.open_pair(client_ch, agent_ch, args.workflow) for _ in range(args.sessions)]
    chunk = os.urandom(args.size)
    single = data_message(chunk)
    for pair in pairs:
        await wire.echo(pair)
    counted = [0, 0]
    last = [0.0]
    stop = time.perf_counter() + args.seconds

    async def produce(queue: asyncio.Queue[bytes | None]) -> None:
        while time.perf_counter() < stop:
            for _ in range(16):
                await queue.put(chunk)
        await queue.put(None)

    async def send(pair: wire.Pair) -> None:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(DEPTH)
        producer = asyncio.create_task(produce(queue))
        await writer(queue, pair.client.write, args.batch, {chunk: single})
        await producer
        await wire.finish_client(pair.client)

    async def receive(pair: wire.Pair) -> None:
        await wire.drain_agent(pair.agent, counted)
        last[0] = max(last[0], time.perf_counter())
        await wire.end_agent(pair.agent)

    cpu0, start = relay_cpu(args), time.perf_counter()
    await asyncio.gather(*(send(p) for p in pairs), *(receive(p) for p in pairs))
    seconds = last[0] - start
    cpu = relay_cpu(args) - cpu0
    emit(
        {
            "bytes": counted[0],
            "messages": counted[1],
            "seconds": seconds,
            "mbps": counted[0] / seconds / 1e6,
            "cpu_s": cpu,
            "payload_per_message": counted[0] / max(counted[1], 1),
        }
    )
    await asyncio.gather(client_ch.close(), agent_ch.close())


def main() -> None:
    """Parse the options, run on uvloop (like bench.loadgen)."""
    parser = argparse.ArgumentParser(prog="bench.experiments.batching")
    parser.add_argument("mode", nargs="?", default="throughput", choices=["throughput", "echo"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--workflow", default="bench")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=0, help="merge queued chunks up to this many bytes (0: never)")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--cpu-pid", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(echo(args) if args.mode == "echo" else run(args))


if __name__ == "__main__":
    main()
