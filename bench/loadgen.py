"""The load generator: one process that holds both ends of sessions, through a router or a TCP relay.

`python -m bench.loadgen MODE [options]` prints one JSON object per result line on stdout. It runs in
a process of its own, so it does not share a GIL with the router it measures; it uses uvloop
when it can and pre-encoded messages, so its own cost per message stays small.

Modes: grpc-throughput, tcp-throughput, grpc-echo, grpc-bare-echo, tcp-echo, rendezvous, idle, and the
WebSocket port's ws-throughput and ws-echo (bench/ws_load.py). With `--cpu-pid PID` the throughput and
echo modes also report `cpu_s`, the CPU seconds that process (the relay measured) used during the timed part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import wire
from bench.common import cpu_seconds
from bench.tcp import tcp_echo, tcp_throughput
from osmo_router.wire.codec import encode_data_message as data_message


def relay_cpu(args: argparse.Namespace) -> float:
    """CPU seconds used so far by the process named by --cpu-pid (0 without one)."""
    return cpu_seconds(args.cpu_pid) if args.cpu_pid else 0.0


def emit(record: dict[str, Any]) -> None:
    """One result line for the parent."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def grpc_throughput(args: argparse.Namespace) -> None:
    """Payload MB/s from clients to agents through the router, `sessions` streams at once."""
    client_ch, agent_ch = wire.open_channel(args.address), wire.open_channel(args.address)
    pairs = [await wire.open_pair(client_ch, agent_ch, args.workflow) for _ in range(args.sessions)]
    message = data_message(os.urandom(args.size))
    for pair in pairs:  # warm the streams (windows, buffers) before timing
        await wire.echo(pair)
    counted = [0, 0]
    last = [0.0]
    stop = time.perf_counter() + args.seconds

    async def send(pair: wire.Pair) -> None:
        # The client's side writes as the CLI's FrameStream does (wire/batching.py), unless --writer direct.
        writer = wire.data_writer(pair.client, args.writer)
        while time.perf_counter() < stop:
            for _ in range(16):
                await writer(message)
        await wire.flush(writer)
        await wire.finish_client(pair.client)

    async def receive(pair: wire.Pair) -> None:
        await wire.drain_agent(pair.agent, counted)
        last[0] = max(last[0], time.perf_counter())
        await wire.end_agent(pair.agent)

    cpu0, start, own0 = relay_cpu(args), time.perf_counter(), time.process_time()
    await asyncio.gather(*(send(p) for p in pairs), *(receive(p) for p in pairs))
    seconds = last[0] - start
    cpu = relay_cpu(args) - cpu0
    own = time.process_time() - own0
    emit({"bytes": counted[0], "messages": counted[1], "seconds": seconds, "mbps": counted[0] / seconds / 1e6,
          "cpu_s": cpu, "payload_per_message": counted[0] / max(counted[1], 1), "writer": args.writer,
          "ends_cpu_s": own})  # fmt: skip
    await asyncio.gather(client_ch.close(), agent_ch.close())


async def grpc_echo(args: argparse.Namespace) -> None:
    """1-byte round trips client -> agent -> client through the router, one at a time."""
    client_ch, agent_ch = wire.open_channel(args.address), wire.open_channel(args.address)
    pair = await wire.open_pair(client_ch, agent_ch, args.workflow)
    # Both ends write through the writer the CLI and the agent use (wire/batching.py) unless --writer direct.
    writers = (wire.data_writer(pair.client, args.writer), wire.data_writer(pair.agent, args.writer))
    cpu0, own0 = relay_cpu(args), time.process_time()
    samples = await _timed(args.rounds, lambda: wire.echo(pair, writers=writers), warmup=50)
    # ends_cpu_s: this process's CPU (the client's and the agent's ends of every round trip).
    emit({"samples_us": samples, "cpu_s": relay_cpu(args) - cpu0, "round_trips": args.rounds + 50,
          "ends_cpu_s": time.process_time() - own0})  # fmt: skip
    await wire.close_pair(pair)
    await asyncio.gather(client_ch.close(), agent_ch.close())


async def grpc_bare_echo(args: argparse.Namespace) -> None:
    """1-byte round trips on one stream to plain_relay's Echo method: a single grpc.aio hop, no relay."""
    channel = wire.open_channel(args.address)
    call = channel.stream_stream("/osmo.bench.Echo/Echo")()
    message = data_message(b"x")

    async def once() -> None:
        await call.write(message)
        await call.read()

    samples = await _timed(args.rounds, once, warmup=50)
    emit({"samples_us": samples})
    await call.done_writing()
    await call.read()  # EOF: the server ends the call
    await channel.close()


async def ws_throughput(args: argparse.Namespace) -> None:
    """Payload MB/s from clients to backends through the router's WebSocket port (bench/ws_load.py)."""
    from bench.ws_load import ws_throughput as run

    emit(await run(args, lambda: relay_cpu(args)))


async def ws_echo(args: argparse.Namespace) -> None:
    """1-byte round trips client -> backend -> client through the router's WebSocket port."""
    from bench.ws_load import ws_echo_rounds

    samples, cpu = await ws_echo_rounds(args, warmup=50, cpu=lambda: relay_cpu(args))
    emit({"samples_us": samples, "cpu_s": cpu, "round_trips": args.rounds + 50})


async def _timed(rounds: int, op: Callable[[], Awaitable[None]], warmup: int = 0) -> list[float]:
    for _ in range(warmup):
        await op()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


def main() -> None:
    """Parse the mode and its options, run it on uvloop when available."""
    parser = argparse.ArgumentParser(prog="bench.loadgen")
    parser.add_argument("mode")
    parser.add_argument("--address", default="")
    parser.add_argument("--workflow", default="bench")
    parser.add_argument("--size", type=int, default=32 * 1024)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--real-agent", action="store_true")
    parser.add_argument("--fresh-connection", action="store_true")
    parser.add_argument("--standby", type=int, default=2, help="rendezvous: the fake agent's standby streams")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument(
        "--writer",
        choices=["batch", "direct"],
        default="batch",
        help="gRPC data writes: through the edges' BatchingWriter as the CLI and agent (default), or one write each",
    )
    parser.add_argument("--cpu-pid", type=int, default=0, help="report the CPU this process used while timed")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    modes: dict[str, Callable[[argparse.Namespace], Awaitable[None]]] = {
        "grpc-throughput": grpc_throughput,
        "grpc-echo": grpc_echo,
        "grpc-bare-echo": grpc_bare_echo,
        "tcp-throughput": tcp_throughput,
        "tcp-echo": tcp_echo,
        "ws-throughput": ws_throughput,
        "ws-echo": ws_echo,
    }
    from bench.sessions import idle, rendezvous

    modes.update({"rendezvous": rendezvous, "idle": idle})
    run = modes[args.mode](args)
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.run(run)
            return
        except ImportError:
            pass
    asyncio.run(run)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
