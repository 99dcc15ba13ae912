"""The load generator's WebSocket modes: both ends of sessions through the router's `--ws-port` (aiohttp).

The same shape as the gRPC modes of bench/loadgen.py, so the two relays are compared like for like:
a WS backend joins `/api/router/portforward/{workflow}/backend/{key}` (the old protocol: binary
messages are raw payload bytes, an empty message is EOF), a WS client joins the `client` side of
the same key with `eof=1` (so the backend's EOF reaches it as an empty message), and the router
relays between them through the same sessions, relay, flow control and metrics as a gRPC session.
Port-forward is used because its old protocol has no first (terminal size) message.

    ws-throughput: payload MB/s client -> backend, `sessions` sessions at once, `size`-byte messages
    ws-echo:       1-byte round trips client -> backend -> client, one at a time
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from bench.wire import TLS_CA_ENV, WAIT

PATH = "/api/router/portforward/{workflow}/{side}/{key}"


@dataclass
class WsPair:
    """Both ends of one session over the WebSocket port."""

    client: aiohttp.ClientWebSocketResponse
    backend: aiohttp.ClientWebSocketResponse


def _url(address: str, workflow: str, side: str, key: str) -> str:
    scheme = "https" if os.environ.get(TLS_CA_ENV) else "http"
    return f"{scheme}://{address}" + PATH.format(workflow=workflow, side=side, key=key)


async def open_ws_pair(http: aiohttp.ClientSession, address: str, workflow: str) -> WsPair:
    """A session from both ends: the backend first (it is joined before its upgrade), then the client."""
    key = secrets.token_urlsafe(16)
    async with asyncio.timeout(WAIT):
        backend = await http.ws_connect(_url(address, workflow, "backend", key), max_msg_size=0, compress=0)
        client = await http.ws_connect(_url(address, workflow, "client", key) + "?eof=1", max_msg_size=0, compress=0)
    pair = WsPair(client, backend)
    await ws_echo(pair)  # paired, and both directions warmed
    return pair


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> bytes | None:
    """The next binary message (b"" is EOF), or None once the WebSocket closed."""
    msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.BINARY:
        data: bytes = msg.data
        return data
    return None


async def ws_echo(pair: WsPair, message: bytes = b"x") -> None:
    """One round trip: client -> backend, the backend echoes it back -> client."""
    await pair.client.send_bytes(message)
    got = await _receive(pair.backend)
    if got != message:
        raise RuntimeError(f"backend got {got!r}")
    await pair.backend.send_bytes(got)
    back = await _receive(pair.client)
    if back != message:
        raise RuntimeError(f"client got {back!r}")


async def close_ws_pair(pair: WsPair) -> None:
    """The client's EOF (an empty message), then the backend's end, as the old protocol ends a pipe."""
    async with asyncio.timeout(WAIT):
        await pair.client.send_bytes(b"")
        while await _receive(pair.backend) not in (b"", None):
            pass
        await _end_backend(pair)
        while await _receive(pair.client) is not None:
            pass
        await pair.client.close()


async def _end_backend(pair: WsPair) -> None:
    """The backend's end after the client's EOF: its own EOF and close. The router closes an old backend's
    WebSocket itself at the client's EOF, as osmo-ctrl takes no half-close (OSMO's ctrl.go
    portforwardConnectTCP: an empty message is a zero-byte write, and it closes both ends when one
    direction ends); OSMO's own router passes the empty message on. Either way the pipe ends."""
    with contextlib.suppress(ConnectionResetError):
        await pair.backend.send_bytes(b"")
    await pair.backend.close()  # an old backend ends its side by closing: the router then ends the session


def _http() -> aiohttp.ClientSession:
    # One connection per WebSocket (no limit), no proxies from the environment; TLS when the bench says so.
    ca = os.environ.get(TLS_CA_ENV)
    context = ssl.create_default_context(cafile=ca) if ca else None
    connector = aiohttp.TCPConnector(limit=0, ssl=context) if context else aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(connector=connector, trust_env=False)


def _no_cpu() -> float:
    return 0.0


async def ws_throughput(args: argparse.Namespace, cpu: Callable[[], float] = _no_cpu) -> dict[str, float]:
    """Payload MB/s from WS clients to WS backends through the router's WebSocket port.

    `cpu_s`: what `cpu()` (the relay's CPU seconds) grew by from the start of sending to the last byte
    received (read by each receiver at its last byte; the largest).
    """
    async with _http() as http:
        pairs = [await open_ws_pair(http, args.address, args.workflow) for _ in range(args.sessions)]
        payload = os.urandom(args.size)
        counted = [0, 0]
        last = [0.0]
        stop = time.perf_counter() + args.seconds

        async def send(pair: WsPair) -> None:
            send_bytes = pair.client.send_bytes
            while time.perf_counter() < stop:
                for _ in range(16):
                    await send_bytes(payload)
            await send_bytes(b"")  # EOF: the router turns it into the backend's empty message

        async def receive(pair: WsPair) -> None:
            while data := await _receive(pair.backend):
                counted[0] += len(data)
                counted[1] += 1
            last[0] = max(last[0], time.perf_counter())
            used[0] = max(used[0], cpu() - cpu0)
            await _end_backend(pair)
            while await _receive(pair.client) is not None:
                pass

        used = [0.0]
        cpu0, start = cpu(), time.perf_counter()
        await asyncio.gather(*(send(p) for p in pairs), *(receive(p) for p in pairs))
        seconds = last[0] - start
        await asyncio.gather(*(p.client.close() for p in pairs))
    return {
        "bytes": counted[0],
        "messages": counted[1],
        "seconds": seconds,
        "mbps": counted[0] / seconds / 1e6,
        "cpu_s": used[0],
    }


async def ws_echo_rounds(
    args: argparse.Namespace, warmup: int = 50, cpu: Callable[[], float] = _no_cpu
) -> tuple[list[float], float]:
    """Microseconds of `rounds` 1-byte round trips through the WebSocket port, and the relay's CPU seconds
    over the warm-up and timed round trips (`cpu()` read around them)."""
    async with _http() as http:
        pair = await open_ws_pair(http, args.address, args.workflow)
        cpu0 = cpu()
        for _ in range(warmup):
            await ws_echo(pair)
        samples = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            await ws_echo(pair)
            samples.append((time.perf_counter() - t0) * 1e6)
        used = cpu() - cpu0
        await close_ws_pair(pair)
    return samples, used
