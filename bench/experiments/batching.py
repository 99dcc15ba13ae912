"""Candidate (c): per-edge batching in the client, the load generator writing what is queued as one message.

    python -m bench.experiments.batching --address A --size 4096 [--batch BYTES] [--sessions N] [--seconds S]

A producer per session puts `size`-byte chunks on a bounded queue (what a pipe or socket reader
does: DEPTH chunks at most, then it waits); a writer takes one chunk, and with `--batch` also every
chunk already queued behind it up to BYTES of payload, and sends them as one data frame. When the
queue holds one chunk (an idle or interactive session) the writer sends it at once: no added latency,
no timer. `--batch 0` is the same producer, queue and writer sending one message per chunk, so the
two differ only in the merging. Prints one JSON line like bench.loadgen's grpc-throughput
(plus `payload_per_message`), with `cpu_s` of `--cpu-pid` over the timed part.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench import wire
from bench.loadgen import emit, relay_cpu
from osmo_router.framecodec import encode_data_message as data_message

#: Chunks a producer may have queued before it waits (128 KiB at 4 KiB: the router's coalescing cap).
DEPTH = 32


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
        write = pair.client.write
        ended = False
        while not ended:
            item = await queue.get()
            if item is None:
                break
            if not args.batch or queue.empty():
                await write(single if item is chunk else data_message(item))
                continue
            parts, size = [item], len(item)
            while size < args.batch and not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    ended = True
                    break
                parts.append(more)
                size += len(more)
            await write(data_message(b"".join(parts)))
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
    parser.add_argument("--address", required=True)
    parser.add_argument("--workflow", default="bench")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=0, help="merge queued chunks up to this many bytes (0: never)")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--cpu-pid", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
