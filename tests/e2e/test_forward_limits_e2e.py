"""Limits that fit use: 1,000 connections at once through one port-forward, with the router's default flags.

One `port-forward` command is one session of its user, however many connections it carries (its
streams name the command); before, every connection counted against --max-sessions-per-user (256)
and a connection pool through a forward was refused past 254.
"""

from __future__ import annotations

import asyncio

from tests.forward_servers import start_forward
from tests.harness import AgentProc, Router, metric_value, run_client

CONNECTIONS = 1000


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0, backlog=CONNECTIONS)


async def _hold_and_echo(local: int) -> list[bytes]:
    """Open every connection first, then echo a line on each while all are open."""
    opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", local) for _ in range(CONNECTIONS)))
    try:

        async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            line = f"connection {i}\n".encode()
            writer.write(line)
            await writer.drain()
            return await reader.readexactly(len(line))

        return list(await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(opened))))
    finally:
        for _reader, writer in opened:
            writer.close()


def test_a_thousand_connections_at_once_through_one_forward(
    router: Router, agent: AgentProc, client_args: list[str]
) -> None:
    async def scenario() -> list[bytes]:
        server = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        proc, (local,) = await asyncio.to_thread(start_forward, client_args, f":{port}")
        try:
            async with asyncio.timeout(120):
                return await _hold_and_echo(local)
        finally:
            proc.stop()
            server.close()

    echoed = asyncio.run(scenario())
    assert echoed == [f"connection {i}\n".encode() for i in range(CONNECTIONS)]
    text = router.metrics_text()  # type: ignore[attr-defined]
    assert (
        metric_value(text, "router_grpc_errors_total", {"operation": "portforward", "code": "RESOURCE_EXHAUSTED"}) == 0
    )
    # The forward counted as one session of its user: other sessions still fit beside it.
    result = run_client("exec", *client_args, "--", "echo", "beside")
    assert result.returncode == 0 and result.stdout == b"beside\n", result.stderr
