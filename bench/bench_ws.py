"""WebSocket path versus gRPC path through the same router, in the same run.

TCP forward throughput (one connection through `osmo-net-client port-forward --transport grpc|ws`,
download and upload, best of a few runs), exec echo round trip (one small message to `cat` and
back, p50/p99) and exec bulk throughput (a blob through `cat`), for a gRPC client and a WebSocket
client meeting the same gRPC agent; the exec figures also for a WebSocket client meeting a
WebSocket backend. Printed as figures and as ratios WebSocket / gRPC.

    .venv/bin/python -m bench.bench_ws [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

from bench.bench_forward import best_rate, download, upload
from bench.forward_targets import BulkServer
from osmo_router.client.config import ClientConfig
from osmo_router.dial.config import DialConfig
from osmo_router.transport import SessionStream, Transport
from osmo_router.transport.grpc_transport import GrpcTransport
from osmo_router.transport.ws_transport import WsTransport
from osmo_router.wire.protocol import CHUNK_SIZE, pb
from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router
from tests.ws_kit import WsBackendProc, client_args, new_key


async def _open_cat(transport: Transport, workflow: str, key: str = "") -> SessionStream:
    target = pb.SessionTarget(workflow_id=workflow, session_key=key)
    return await transport.open(pb.OPERATION_EXEC, pb.ExecInit(target=target, command=["cat"]))


async def _finish(stream: SessionStream) -> None:
    await stream.send(pb.Frame(half_close=pb.HalfClose()))
    while await stream.recv() is not None:
        pass


async def echo_rtt(transport: Transport, workflow: str, rounds: int, key: str = "") -> dict[str, float]:
    """p50/p99 of one 64-byte message to `cat` and back, in milliseconds."""
    stream = await _open_cat(transport, workflow, key)
    samples: list[float] = []
    for i in range(rounds + 10):
        payload = f"{i:063d}\n".encode()
        started = time.perf_counter()
        await stream.send_data(payload)
        got = b""
        while len(got) < len(payload):
            frame = await stream.recv()
            assert frame is not None and frame.WhichOneof("kind") == "data", frame
            got += frame.data
        if i >= 10:  # the first rounds warm up both paths
            samples.append((time.perf_counter() - started) * 1000)
    await _finish(stream)
    quantiles = statistics.quantiles(samples, n=100)
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": round(quantiles[98], 3)}


async def bulk_throughput(transport: Transport, workflow: str, size: int, key: str = "") -> float:
    """MiB/s of a blob through `cat` (sent and received at once)."""
    stream = await _open_cat(transport, workflow, key)
    chunk = os.urandom(CHUNK_SIZE)
    started = time.perf_counter()

    async def send() -> None:
        for _ in range(size // CHUNK_SIZE):
            await stream.send_data(chunk)
        await stream.send(pb.Frame(half_close=pb.HalfClose()))

    sender = asyncio.create_task(send())
    received = 0
    while (frame := await stream.recv()) is not None:
        if frame.WhichOneof("kind") == "data":
            received += len(frame.data)
    await sender
    assert received == size // CHUNK_SIZE * CHUNK_SIZE, received
    return round(received / (time.perf_counter() - started) / 2**20, 1)


async def _measure(router: Router, workflow: str, quick: bool) -> dict[str, Any]:
    dial = DialConfig(address=router.address, tls=False)
    ws_address = f"127.0.0.1:{router.ws_port}"
    rounds, size = (200, 32 * 2**20) if quick else (2000, 256 * 2**20)
    results: dict[str, Any] = {}
    paths: list[tuple[str, Transport]] = [
        ("grpc", GrpcTransport(ClientConfig(dial=dial, workflow_id=workflow))),
        ("ws", WsTransport(dial, ws_address)),
    ]
    for name, transport in paths:
        try:
            results[name] = {
                "exec_echo": await echo_rtt(transport, workflow, rounds),
                "exec_mib_s": await bulk_throughput(transport, workflow, size),
            }
        finally:
            await transport.aclose()
    results["ws_backend"] = await _measure_ws_backend(router, dial, ws_address, rounds, size)
    return results


async def _measure_ws_backend(router: Router, dial: DialConfig, ws_address: str, rounds: int, size: int) -> Any:
    """A WebSocket client meeting a WebSocket backend (`agent --transport ws`), one backend per session."""
    workflow = f"bench-wsb-{uuid.uuid4().hex[:6]}"
    transport = WsTransport(dial, ws_address)
    out: dict[str, Any] = {}
    try:
        for metric in ("exec_echo", "exec_mib_s"):
            key = new_key()
            backend = await asyncio.to_thread(WsBackendProc, router, workflow, key)
            try:
                if metric == "exec_echo":
                    out[metric] = await echo_rtt(transport, workflow, rounds, key)
                else:
                    out[metric] = await bulk_throughput(transport, workflow, size, key)
            finally:
                backend.stop()
    finally:
        await transport.aclose()
    return out


def forward_throughput(router: Router, workflow: str, transport: str, total: int, runs: int) -> dict[str, float]:
    """MiB/s of one forwarded TCP connection each way, the CLI on `transport`."""
    out: dict[str, float] = {}
    with BulkServer(total) as target:
        proc, (local,) = start_forward(client_args(router, workflow, transport), f":{target.port}")
        try:
            for name, transfer in (("download", download), ("upload", upload)):
                out[f"forward_{name}_mib_s"] = round(best_rate(transfer, local, total, runs), 1)
        finally:
            proc.stop()
    return out


def run(quick: bool) -> dict[str, Any]:
    """Start a router and an agent, measure both paths, return the figures and ws/grpc ratios."""
    router = Router()
    workflow = f"bench-{uuid.uuid4().hex[:6]}"
    agent = AgentProc(router.address, workflow)
    total, runs = (64 << 20, 2) if quick else (256 << 20, 3)
    try:
        results = asyncio.run(_measure(router, workflow, quick))
        for transport in ("grpc", "ws"):
            results[transport].update(forward_throughput(router, workflow, transport, total, runs))
    finally:
        agent.stop()
        router.stop()
    grpc, ws = results["grpc"], results["ws"]
    results["ratios_ws_over_grpc"] = {
        "exec_echo_p50": round(ws["exec_echo"]["p50_ms"] / grpc["exec_echo"]["p50_ms"], 2),
        "exec_echo_p99": round(ws["exec_echo"]["p99_ms"] / grpc["exec_echo"]["p99_ms"], 2),
        "exec_throughput": round(ws["exec_mib_s"] / grpc["exec_mib_s"], 2),
        "forward_download": round(ws["forward_download_mib_s"] / grpc["forward_download_mib_s"], 2),
        "forward_upload": round(ws["forward_upload_mib_s"] / grpc["forward_upload_mib_s"], 2),
    }
    return results


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
