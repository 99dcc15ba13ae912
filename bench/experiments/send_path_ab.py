"""A/B of the forward's send path alone, per message: a socket's bytes to a DATA frame (issue 18).

The path a forwarded message takes in the client and the agent when its socket becomes readable:
`SocketReader._send_now` -> `ResumableStream.try_send_data_message` -> `FrameStream` ->
`BatchingWriter.try_write_data` -> the native h2 call -> `transport.write`, to a grpc.aio server in
another process that reads and drops every message. Each message (1-100 payload bytes, written to a
socketpair first, untimed) is one timed `_send_now`; the loop turns twice between messages (the
writer's hold, the windows), so every message takes the direct path as in a forward.

Modes: `write` (the whole path, the transport's write included), `python` (the transport's write a
no-op: the Python and the socket read), `read` (`_read_now` alone: the socket read and the message
made). Trees A and B differ by environment (`--a-env PYTHONPATH=/tmp/base/src`); runs alternate A
and B, the order flipping each round, and the figure is the median ns per send of each run (timer
overhead included, about 0.1 us), then the median over the rounds. On a shared machine this varies
far less than the round trip's CPU per GET, as the hot loop keeps the code in cache: it measures the
path's own cost, not what a cold wake adds to it.

    .venv/bin/python -m bench.experiments.send_path_ab --a-env PYTHONPATH=/tmp/base/src [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

MODES = ("write", "python", "read")

SINK = r"""
import asyncio, grpc
async def sink(requests, context):
    async for _ in requests:
        pass
    return
    yield
class Sink(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.stream_stream_rpc_method_handler(sink)
async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Sink(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


class _NoWrite:
    """A transport whose write does nothing (mode `python`): the system call left out."""

    def write(self, data: Any) -> None:
        """Drop `data`."""

    def is_closing(self) -> bool:
        """Never."""
        return False

    def get_write_buffer_size(self) -> int:
        """Nothing buffered."""
        return 0


async def _child(mode: str, messages: int, port: int) -> dict[str, float]:
    """One run of `messages` sends in this process (the tree on PYTHONPATH) to the sink on `port`; ns per send."""
    from osmo_router.h2.channel import Channel
    from osmo_router.io.socket_pumps import BULK_READ, SocketReader
    from osmo_router.resume.stream import ResumableStream
    from osmo_router.wire.codec import encode_data_message, raw_serializer
    from osmo_router.wire.streams import FrameStream

    channel = Channel(f"127.0.0.1:{port}")
    call = channel.stream_stream("/bench.Sink/Sink", request_serializer=raw_serializer)()
    await call.write(encode_data_message(b"x"))  # the stream open, its headers out
    stream = ResumableStream(FrameStream(call, lambda frame: frame, raw=True))
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    reader = SocketReader(mine)
    reader._direct = (stream.try_send_data_message, BULK_READ)
    h2stream = call._stream
    real = h2stream.conn.transport
    if mode == "python":
        h2stream.conn.transport = _NoWrite()
    spent = []
    for i in range(messages):
        theirs.send(b"x" * (1 + i % 100))
        start = time.perf_counter_ns()
        sent = reader._read_now(BULK_READ) if mode == "read" else reader._send_now()
        spent.append(time.perf_counter_ns() - start)
        assert sent, f"message {i} was not sent at once"
        if mode == "python":
            h2stream.conn.send_window = h2stream.send_window = 1 << 30  # (nothing reaches the peer)
        if len(stream.buffer) > 1000:
            stream.buffer.ack(stream.buffer.end)  # (the peer's acknowledgement, untimed)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    h2stream.conn.transport = real
    reader.close()
    call.cancel()
    await channel.close()
    return {"median": statistics.median(spent), "p10": sorted(spent)[len(spent) // 10]}


def run_child(module: str, env: dict[str, str], *args: str) -> dict[str, float]:
    """`python -m module --child ARGS` with `env` added (one run of one tree); the figures it printed."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--child", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def serve_child(child: Callable[[int], Coroutine[Any, Any, dict[str, float]]]) -> None:
    """In a child run: `child(port)` on uvloop against the grpc.aio SINK in a process of its own (the
    installed grpcio, whatever tree is on PYTHONPATH); print its figures as JSON for `run_child`."""
    import uvloop

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, env=env)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        print(json.dumps(uvloop.run(child(port))))
    finally:
        sink.kill()
        sink.wait()


def alternated(
    envs: dict[str, dict[str, str]], rounds: int, run: Callable[[dict[str, str]], float]
) -> tuple[float, float, dict[str, list[float]]]:
    """`run` per tree and round, A and B alternating (the order flipped each round); the medians of A and
    B over the rounds, and every round's figure."""
    figures: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            figures[name].append(run(envs[name]))
    return statistics.median(figures["A"]), statistics.median(figures["B"]), figures


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-env", action="append", default=[], help="K=V for tree A")
    parser.add_argument("--b-env", action="append", default=[], help="K=V for tree B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(lambda port: _child(args.child, args.messages, port))
        return
    envs = {"A": _pairs(args.a_env), "B": _pairs(args.b_env)}
    module, messages = "bench.experiments.send_path_ab", str(args.messages)
    for mode in args.modes.split(","):
        child_args = (mode, "--messages", messages)

        def median(env: dict[str, str], child_args: tuple[str, ...] = child_args) -> float:
            return run_child(module, env, *child_args)["median"]

        a, b, medians = alternated(envs, args.rounds, median)
        print(
            f"{mode}: A {a:.0f} ns, B {b:.0f} ns per send (medians of {args.rounds} runs: A {medians['A']}, "
            f"B {medians['B']}); B/A {b / a:.2f}"
        )


if __name__ == "__main__":
    main()
