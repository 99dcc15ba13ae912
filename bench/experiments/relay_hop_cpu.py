"""The router's Python per relayed small message, in one process, without the kernel (issue 18).

`forward_ab` measures the three processes' CPU per GET through real sockets: on a shared 2-core machine
its per-round ratios of identical trees swing 0.5-1.2x. This drives the router's own objects instead,
in memory: a server `Connection` (its FrameReader, streams, windows, BDP estimator, stream credit in two
byte budgets) gets one whole DATA frame per read (`get_buffer` / `buffer_updated`, as the transport
calls them), and the relay's hand-over (`_Passing.through`, `FlowQueue.pass_through`, `_DirectWrite`)
writes it to a second connection's served stream, whose transport drops what it is given. That is the
router's path for one message of a redis GET; the kernel's part (read, write, epoll) is left out, so the
figure is the Python (and the C it calls) alone. Best of `--repeats` runs of `--messages` messages.

    .venv/bin/python -m bench.experiments.relay_hop_cpu --a-env PYTHONPATH=/tmp/base/src --b-env PYTHONPATH=src

Each tree runs in its own process, alternately, `--rounds` times; the figure per tree is the minimum
(interference only ever adds time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/M"), (":authority", "x"), ("te", "trailers")]
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
#: A redis GET's request as the relay sees it: a Frame with 14 bytes of data, behind its gRPC prefix.
PAYLOAD = b"\x12\x10\x0a\x0e" + b"*2\r\n$3\r\nGET\r\n"


class _Sink:
    """A transport that keeps what it is given (to hand to the peer) or drops it."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.keep = True

    def write(self, data: Any) -> None:
        if self.keep:
            self.out.append(bytes(data))

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _feed(conn: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        target = conn.get_buffer(-1)
        take = min(len(target), len(view))
        target[:take] = view[:take]
        view = view[take:]
        conn.buffer_updated(take)


def _pump(a: Any, ta: _Sink, b: Any, tb: _Sink) -> None:
    for _ in range(10):
        if not ta.out and not tb.out:
            return
        out_a, out_b = b"".join(ta.out), b"".join(tb.out)
        ta.out.clear()
        tb.out.clear()
        if out_a:
            _feed(b, out_a)
        if out_b:
            _feed(a, out_b)


async def _served_pair(config: Any) -> tuple[Any, Any, Any, Any, _Sink]:
    """A client and a server connection in memory, one stream open: (client stream, served stream, client
    connection, server connection, the server's transport)."""
    from osmo_router.h2.connection import Connection

    served: list[Any] = []
    client, server = Connection("client", config), Connection("server", config, on_stream=served.append)
    tc, ts = _Sink(), _Sink()
    client.connection_made(tc)
    server.connection_made(ts)
    _pump(client, tc, server, ts)
    await client.ready()
    stream = await client.open_stream(REQUEST)
    _pump(client, tc, server, ts)
    return stream, served[0], client, server, ts


class _Session:
    __slots__ = ("bytes_to_agent", "bytes_to_client", "last_activity")

    def __init__(self) -> None:
        self.bytes_to_agent = self.bytes_to_client = 0
        self.last_activity = 0.0

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class _Hooks:
    def count_bytes(self, session: _Session, direction: str, size: int) -> None:
        if direction == "client_to_agent":
            session.bytes_to_agent += size
        else:
            session.bytes_to_client += size


async def _run(messages: int, repeats: int) -> float:
    from osmo_router.h2 import frames as fr
    from osmo_router.h2.connection import H2Config
    from osmo_router.router.core import relay
    from osmo_router.router.core.budget import ByteBudget
    from osmo_router.router.core.flow_control import FlowQueue, WriteWatchdog

    config = H2Config(stream_window=2 << 20, max_stream_window=16 << 20, connection_window=8 << 20)
    _, inbound, _, in_conn, in_transport = await _served_pair(config)
    _, outbound, _, out_conn, out_transport = await _served_pair(config)
    outbound.send_headers(RESPONSE)
    in_transport.keep = out_transport.keep = False
    budgets = (ByteBudget(256 << 20), ByteBudget(2 << 30))
    inbound.use_budgets(budgets)
    queue = FlowQueue(16, 4 << 20)
    queue.use_budgets(budgets)
    watchdog = WriteWatchdog(60.0)
    queue.set_sink(relay._DirectWrite(outbound.try_write, watchdog, outbound.try_write_framed))
    getter = queue.readable()
    passing = relay._Passing(_Session(), queue, _Hooks(), "client_to_agent")  # type: ignore[arg-type]
    inbound.set_passthrough(passing.through)
    passing.idle = True
    frame = fr.encode(fr.DATA, 0, inbound.id, b"\x00" + len(PAYLOAD).to_bytes(4, "big") + PAYLOAD)
    size = len(frame)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(messages):
            target = in_conn.get_buffer(-1)
            target[:size] = frame
            in_conn.buffer_updated(size)
            out_conn.send_window = outbound.send_window = 1 << 30  # (the peer's WINDOW_UPDATEs)
        best = min(best, (time.perf_counter() - start) / messages)
    # Every message went through (none queued for the writer task, none refused).
    assert not getter.done() and not len(queue) and watchdog.moved == repeats * messages * len(PAYLOAD)
    return best


def _child(messages: int, repeats: int) -> None:
    print(json.dumps({"us": asyncio.run(_run(messages, repeats)) * 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.experiments.relay_hop_cpu", description=__doc__)
    parser.add_argument("--a-env", action="append", default=[], help="K=V for tree A (repeatable)")
    parser.add_argument("--b-env", action="append", default=[], help="K=V for tree B (repeatable)")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.messages, args.repeats)
        return
    figures: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(args.rounds):
        for name, pairs in (("A", args.a_env), ("B", args.b_env)):
            env = dict(os.environ, **dict(pair.split("=", 1) for pair in pairs))
            cmd = [sys.executable, "-m", "bench.experiments.relay_hop_cpu", "--child"]
            cmd += ["--messages", str(args.messages), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            figures[name].append(json.loads(out.splitlines()[-1])["us"])
    a, b = min(figures["A"]), min(figures["B"])
    print("us per message, per round: A", [round(x, 2) for x in figures["A"]], "B", [round(x, 2) for x in figures["B"]])
    print(f"best: A {a:.2f} us, B {b:.2f} us, B/A {b / a:.3f}")


if __name__ == "__main__":
    main()
