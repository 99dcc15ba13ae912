"""A plain grpc.aio relay: the floor that grpc.aio itself sets, measured beside the router.

    python -m bench.plain_relay   (prints "listening PORT", serves until killed)

It speaks just enough of the router's wire protocol for the load generator (init, ready/open,
frames, SessionEnd) and pairs streams by session key, then each handler copies what it reads
straight into the other stream: no bounded queues, no flow-control timeout, no coalescing, no
metrics, no auth. Whatever the router loses against this is the router's own cost.

It also serves `/osmo.bench.Echo/Echo`, which writes every message back on the same stream: one
grpc.aio round trip with nothing else, the floor under any echo through a relay (which makes two).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from osmo_router.wire.codec import ENCODED_SESSION_END
from osmo_router.wire.protocol import pb, server_options

READY = pb.ExecResponse(ready=pb.SessionReady(session_key="plain")).SerializeToString()
OPEN = pb.ConnectResponse(open=pb.SessionOpen(session_key="plain")).SerializeToString()


class PlainRelay:
    """Pairs an Exec stream with a Connect stream by key and copies messages both ways."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[asyncio.Future[Any], Any]] = {}

    async def _pair(self, key: str, context: Any) -> Any:
        """The other side's context, once it arrived."""
        if key in self._waiting:
            arrived, other = self._waiting.pop(key)
            arrived.set_result(context)
            return other
        arrived = asyncio.get_running_loop().create_future()
        self._waiting[key] = (arrived, context)
        return await arrived

    async def client(self, _requests: Any, context: Any) -> None:
        """Exec: ready, then copy client -> agent until the client ends."""
        init = pb.ExecRequest.FromString(await context.read())
        agent = await self._pair(init.init.target.session_key, context)
        await context.write(READY)
        while (message := await context.read()) is not grpc.aio.EOF:
            await agent.write(message)

    async def agent(self, _requests: Any, context: Any) -> None:
        """Connect: open, then copy agent -> client; at the agent's end, SessionEnd to the client."""
        init = pb.ConnectRequest.FromString(await context.read())
        client = await self._pair(init.init.session_key, context)
        await context.write(OPEN)
        while (message := await context.read()) is not grpc.aio.EOF:
            await client.write(message)
        await client.write(ENCODED_SESSION_END)

    async def echo(self, _requests: Any, context: Any) -> None:
        """Echo: every message straight back, until the caller ends."""
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message)

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """Generic handlers with identity serializers, like the router's."""
        return (
            grpc.method_handlers_generic_handler(
                "osmo.bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(self.echo)}
            ),
            grpc.method_handlers_generic_handler(
                "osmo.router.v1.RouterClientService", {"Exec": grpc.stream_stream_rpc_method_handler(self.client)}
            ),
            grpc.method_handlers_generic_handler(
                "osmo.router.v1.RouterAgentService", {"Connect": grpc.stream_stream_rpc_method_handler(self.agent)}
            ),
        )


async def serve() -> None:
    """Listen on a free loopback port, print it, serve until killed."""
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers(PlainRelay().handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
