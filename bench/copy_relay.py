"""Minimal relays that only copy bytes: the floor of a path through Python processes (issue 18).

`MinimalRelay` is uvloop's `data_received` -> `transport.write`, plus the flow control and
half-close a bulk client (iperf3) needs: the least any Python relay process does per message.
`relay_chain` puts several in a row in front of a target (or socat hops), as the forward's path
crosses three processes (client, router, agent).

    python -m bench.copy_relay LISTEN TARGET   (relays 127.0.0.1:LISTEN to 127.0.0.1:TARGET until killed)
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import cast

from bench.bench_forward import socat_relay
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
        stack.callback(_stop, proc)
        wait_listening(listen)
        ports.insert(0, listen)
    return ports[0]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a relay process; kill it if it has not gone within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def uvloop_relay(listen: int, target: int, _hop: int) -> list[str]:
    """The argv of a MinimalRelay process."""
    return [sys.executable, "-m", "bench.copy_relay", str(listen), str(target)]


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
