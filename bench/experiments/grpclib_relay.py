"""Candidate (b): the relay on grpclib (pure asyncio on h2: no C core, no poller thread, no thread hop).

    python -m bench.experiments.grpclib_relay [--no-uvloop] [--window BYTES]   (prints "listening PORT")

The same wire protocol as bench/plain_relay.py, served by grpclib with an identity codec (messages
are opaque bytes). HTTP/2 windows are set large (`--window`, default 4 MiB per stream and 4x that
per connection) so a long link is not window-bound; grpc.aio's BDP probing gets there on its own.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler
from grpclib.encoding.base import CodecBase
from grpclib.server import Server, Stream

from bench.plain_relay import OPEN, READY
from osmo_router.wire.protocol import ENCODED_SESSION_END, pb


class RawCodec(CodecBase):
    """Messages pass as the bytes they are (grpclib's codec interface, identity both ways)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


class GrpclibRelay:
    """Pairs an Exec stream with a Connect stream by key and copies messages both ways."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[asyncio.Future[Any], Stream[Any, Any]]] = {}

    async def _pair(self, key: str, stream: Stream[Any, Any]) -> Stream[Any, Any]:
        if key in self._waiting:
            arrived, other = self._waiting.pop(key)
            arrived.set_result(stream)
            return other
        arrived = asyncio.get_running_loop().create_future()
        self._waiting[key] = (arrived, stream)
        result: Stream[Any, Any] = await arrived
        return result

    async def client(self, stream: Stream[Any, Any]) -> None:
        """Exec: ready, then copy client -> agent until the client ends."""
        init = pb.ExecRequest.FromString(await stream.recv_message())
        agent = await self._pair(init.init.target.session_key, stream)
        await stream.send_message(READY)
        while (message := await stream.recv_message()) is not None:
            await agent.send_message(message)

    async def agent(self, stream: Stream[Any, Any]) -> None:
        """Connect: open, then copy agent -> client; at the agent's end, SessionEnd to the client."""
        init = pb.ConnectRequest.FromString(await stream.recv_message())
        client = await self._pair(init.init.session_key, stream)
        await stream.send_message(OPEN)
        while (message := await stream.recv_message()) is not None:
            await client.send_message(message)
        await client.send_message(ENCODED_SESSION_END)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/osmo.router.v1.RouterClientService/Exec": Handler(self.client, Cardinality.STREAM_STREAM, bytes, bytes),
            "/osmo.router.v1.RouterAgentService/Connect": Handler(self.agent, Cardinality.STREAM_STREAM, bytes, bytes),
        }


async def serve(window: int) -> None:
    """Listen on a free loopback port, print it, serve until killed."""
    config = Configuration(http2_connection_window_size=4 * window, http2_stream_window_size=window)
    server = Server([GrpclibRelay()], codec=RawCodec(), config=config)
    await server.start("127.0.0.1", 0)
    sockets = server._server.sockets if server._server is not None else []
    print(f"listening {sockets[0].getsockname()[1]}", flush=True)
    await server.wait_closed()


def main() -> None:
    """Parse the options, serve on uvloop unless told not to."""
    parser = argparse.ArgumentParser(prog="bench.experiments.grpclib_relay")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--window", type=int, default=4 * 2**20)
    args = parser.parse_args()
    if not args.no_uvloop:
        import uvloop

        uvloop.run(serve(args.window))
        return
    asyncio.run(serve(args.window))


if __name__ == "__main__":
    main()
