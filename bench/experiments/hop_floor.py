"""The floor of a three-process path: redis-benchmark GET -c 1 through relays that do no work (issue 18).

The port-forward path crosses three processes (client, router, agent), so its round trip pays three
process wake-ups, reads and writes each way before any protocol work. This measures what three relays
that only copy bytes reach on this machine, interleaved round by round with one socat hop (the
issue's baseline) and with a direct connection:

- `socat x3`: three socat hops in a row;
- `uvloop x3`: three minimal Python relays in a row (`MinimalRelay`: uvloop, `data_received` ->
  `transport.write`, plus the flow control and half-close a bulk client needs), the least any Python
  relay process does per message.

    .venv/bin/python -m bench.experiments.hop_floor [--rounds 4] [--requests 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import cast

from bench.bench_forward import socat_relay
from bench.bench_real_clients import redis_get, redis_server
from bench.forward_targets import free_port, wait_listening


class MinimalRelay(asyncio.Protocol):
    """One side of a relayed connection: whatever arrives is written to the other side."""

    def __init__(self, peer: MinimalRelay | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early = bytearray()  # what the client sent before the target connection was up
        self.early_eof = False  # the client ended its side before the target connection was up
        self.lost = False  # the connection closed (before the target connection was up, that one is closed too)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; no Nagle delay (as socat's and our forwards' sockets)."""
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports are not its subclasses)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        """Relay, or keep until the other side is connected."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early += data

    def eof_received(self) -> bool:
        """Pass the half-close on (iperf3 and the end-to-end check use it); keep the other way open."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        else:
            self.early_eof = True
        return True

    def pause_writing(self) -> None:
        """The other side's backlog is full: stop reading it (without this an iperf3 upload piles up
        gigabytes in the relay, and the test's end waits behind them)."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        """The backlog drained: read the other side again."""
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Close the other side too."""
        self.lost = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def _serve(listen: int, target: int) -> None:
    loop = asyncio.get_running_loop()
    dialing: set[asyncio.Task[None]] = set()

    def accepted() -> MinimalRelay:
        front = MinimalRelay()

        async def dial() -> None:
            _, back = await loop.create_connection(lambda: MinimalRelay(front), "127.0.0.1", target)
            front.peer = back
            assert back.transport is not None
            if front.lost:  # (wait_listening's probe: an iperf3 server left with it open would stay busy)
                back.transport.close()
                return
            if front.early:
                back.transport.write(bytes(front.early))
                front.early.clear()
            if front.early_eof:
                back.transport.write_eof()

        task = loop.create_task(dial())
        dialing.add(task)
        task.add_done_callback(dialing.discard)
        return front

    server = await loop.create_server(accepted, "127.0.0.1", listen)
    await server.serve_forever()


def relay_chain(
    stack: ExitStack,
    target: int,
    hops: int,
    relay: Callable[[int, int, int], list[str]] | None,
    pids: list[int] | None = None,
) -> int:
    """`hops` relays in a row in front of `target`, closed with `stack`: socat when `relay` is None, else
    the processes `relay(listen, target, hop)` gives the argv of (hop 0 is the one next to the target),
    their pids appended to `pids`. Returns the port clients connect to."""
    ports = [target]
    for hop in range(hops):
        if relay is None:
            ports.insert(0, stack.enter_context(socat_relay(ports[0])))
            continue
        listen = free_port()
        proc = subprocess.Popen(relay(listen, ports[0], hop))
        if pids is not None:
            pids.append(proc.pid)
        stack.callback(proc.wait, 10)
        stack.callback(proc.terminate)
        wait_listening(listen)
        ports.insert(0, listen)
    return ports[0]


def uvloop_relay(listen: int, target: int, _hop: int) -> list[str]:
    """The argv of a MinimalRelay process."""
    return [sys.executable, "-m", "bench.experiments.hop_floor", "--relay", str(listen), str(target)]


def _relay_chain(stack: ExitStack, target: int, hops: int, python: bool) -> int:
    """`hops` relays in a row in front of `target` (socat, or MinimalRelay processes); the first's port."""
    return relay_chain(stack, target, hops, uvloop_relay if python else None)


def main() -> None:
    """Measure the paths round by round (order reversed every other round); print medians and ratios."""
    parser = argparse.ArgumentParser(prog="bench.experiments.hop_floor")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10000, help="GETs per run")
    parser.add_argument("--relay", nargs=2, type=int, metavar=("LISTEN", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        import uvloop

        uvloop.run(_serve(*args.relay))
        return
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        paths = {
            "direct": redis,
            "socat x1": stack.enter_context(socat_relay(redis)),
            "socat x3": _relay_chain(stack, redis, 3, python=False),
            "uvloop x3": _relay_chain(stack, redis, 3, python=True),
        }
        rps: dict[str, list[float]] = {name: [] for name in paths}
        for rnd in range(args.rounds):
            for name in list(paths) if rnd % 2 == 0 else reversed(list(paths)):
                rps[name].append(redis_get(paths[name], args.requests)[0])
        for name, runs in rps.items():
            ratios = [r / b for r, b in zip(runs, rps["socat x1"], strict=True)]
            print(f"{name:10} {statistics.median(runs):8.0f} GET/s  {statistics.median(ratios):.2f}x socat x1  {runs}")


if __name__ == "__main__":
    main()
