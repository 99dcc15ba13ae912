"""A/B of the forward's receive path alone, per message: a DATA frame to the local socket (issue 18).

The path a forwarded message takes in the client and the agent when it arrives from the router: the
native h2 connection's `get_buffer` / `buffer_updated` with one whole DATA frame (a data-frame message
of 1-100 payload bytes, as a redis GET's) -> the stream's listener -> `FrameStream` -> the resumable
stream's data lane -> `DirectSender.offer_data` -> the socket's send (a socketpair, drained untimed).
The frame is fed in memory on a real call to a grpc.aio sink in another process (the window updates
and acknowledgements it causes go there), so what is timed is the Python (and the C it calls) plus
the one send system call, with no epoll and no read of the connection's socket.

Trees A and B differ by environment (`--a-env PYTHONPATH=/tmp/base/src`); runs alternate A and B, the
order flipping each round; the figure is the median ns per message of each run, then the median over
the rounds (send_path_ab's method: see there for why this is steadier than forward_ab's CPU per GET).
The channel does not grow its windows (no BDP pings: with frames fed faster than any link, they made
the grpc sink end the call for too many pings); a message not delivered at once fails the run within
10 s instead of hanging it.

    .venv/bin/python -m bench.experiments.recv_path_ab --a-env PYTHONPATH=/tmp/base/src [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

from bench.experiments.send_path_ab import _pairs, alternated, run_child, serve_child


async def _child(messages: int, port: int) -> dict[str, float]:
    """One run of `messages` received frames in this process (the tree on PYTHONPATH); ns per message."""
    from osmo_router.h2 import frames as fr
    from osmo_router.h2.channel import Channel
    from osmo_router.h2.config import DEFAULT_STREAM_WINDOW, H2Config
    from osmo_router.io.socket_pumps import DirectSender
    from osmo_router.resume.stream import ResumableStream
    from osmo_router.wire.codec import encode_data_message, raw_serializer
    from osmo_router.wire.streams import FrameStream

    # No BDP growth: its pings, one per burst of the frames fed here, would make the grpc sink end the
    # call for too many pings (GOAWAY), which stalled runs in either tree.
    channel = Channel(f"127.0.0.1:{port}", config=H2Config(max_stream_window=DEFAULT_STREAM_WINDOW))
    call = channel.stream_stream("/bench.Sink/Sink", request_serializer=raw_serializer)()
    await call.write(encode_data_message(b"x"))  # the stream open, its headers out
    stream = ResumableStream(FrameStream(call, lambda frame: frame, raw=True))
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    theirs.settimeout(10)  # (a message not delivered at once fails the run instead of hanging it)
    sender = DirectSender(mine, on_error=lambda err: asyncio.sleep(0))
    stream.set_sink(sender.offer, sender.offer_data)
    stream.start()
    handler = asyncio.create_task(stream.recv())  # the pump waits in recv: frames go to its sink
    await asyncio.sleep(0)
    h2stream = call._stream
    assert h2stream is not None
    conn = h2stream.conn
    frames = []
    for size in range(1, 101):
        message = encode_data_message(b"x" * size)
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        frames.append(fr.header(fr.DATA, 0, h2stream.id, len(body)) + body)
    spent = []
    for i in range(messages):
        frame = frames[i % 100]
        start = time.perf_counter_ns()
        target = conn.get_buffer(-1)
        target[: len(frame)] = frame
        conn.buffer_updated(len(frame))
        spent.append(time.perf_counter_ns() - start)
        got = theirs.recv(4096)
        assert len(got) == 1 + i % 100, f"message {i} was not delivered at once"
        await asyncio.sleep(0)
    assert not handler.done()
    handler.cancel()
    call.cancel()
    await channel.close()
    return {"median": statistics.median(spent), "p10": sorted(spent)[len(spent) // 10]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-env", action="append", default=[], help="K=V for tree A")
    parser.add_argument("--b-env", action="append", default=[], help="K=V for tree B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(lambda port: _child(args.messages, port))
        return
    envs = {"A": _pairs(args.a_env), "B": _pairs(args.b_env)}
    module, messages = "bench.experiments.recv_path_ab", str(args.messages)
    a, b, medians = alternated(envs, args.rounds, lambda env: run_child(module, env, "--messages", messages)["median"])
    print(
        f"receive: A {a:.0f} ns, B {b:.0f} ns per message (medians of {args.rounds} runs: A {medians['A']}, "
        f"B {medians['B']}); B/A {b / a:.2f}"
    )


if __name__ == "__main__":
    main()
