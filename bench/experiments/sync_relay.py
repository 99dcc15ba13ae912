"""Candidate (a): grpcio's synchronous server relaying between two streams, a thread per stream.

    python -m bench.experiments.sync_relay [--workers N]   (prints "listening PORT", serves until killed)

The same wire protocol as bench/plain_relay.py (init, ready/open, frames as opaque bytes with identity
serializers, SessionEnd at the agent's end). Each handler runs in a thread of the server's pool and
yields what it reads from the *other* side's request iterator: the client's handler relays agent ->
client, the agent's handler client -> agent. No event loop; grpc's sync server still takes each
completion on its own polling thread and hands it to the handler thread through a condition variable.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from bench.experiments.aio_relay import add_port
from bench.plain_relay import OPEN, READY
from osmo_router.wire.protocol import ENCODED_SESSION_END, pb, server_options

PAIR_TIMEOUT = 30.0


class _Waiting:
    def __init__(self, requests: Iterator[bytes]) -> None:
        self.requests = requests
        self.other: Iterator[bytes] | None = None
        self.joined = threading.Event()


class SyncRelay:
    """Pairs an Exec stream with a Connect stream by key; each handler yields the other's messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}

    def _pair(self, key: str, requests: Iterator[bytes]) -> Iterator[bytes]:
        """The other side's request iterator, once it arrived."""
        with self._lock:
            other = self._waiting.pop(key, None)
            if other is not None:
                other.other = requests
                other.joined.set()
                return other.requests
            me = self._waiting[key] = _Waiting(requests)
        if not me.joined.wait(PAIR_TIMEOUT) or me.other is None:
            raise RuntimeError(f"no peer for {key}")
        return me.other

    def client(self, requests: Iterator[bytes], _context: Any) -> Iterator[bytes]:
        """Exec: ready, then the agent's messages; at the agent's end, SessionEnd."""
        init = pb.ExecRequest.FromString(next(requests))
        agent = self._pair(init.init.target.session_key, requests)
        yield READY
        try:
            yield from agent
        except grpc.RpcError:
            return
        yield ENCODED_SESSION_END

    def agent(self, requests: Iterator[bytes], _context: Any) -> Iterator[bytes]:
        """Connect: open, then the client's messages until the client ends."""
        init = pb.ConnectRequest.FromString(next(requests))
        client = self._pair(init.init.session_key, requests)
        yield OPEN
        try:
            yield from client
        except grpc.RpcError:
            return

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """Generic handlers with identity serializers."""
        return (
            grpc.method_handlers_generic_handler(
                "osmo.router.v1.RouterClientService", {"Exec": grpc.stream_stream_rpc_method_handler(self.client)}
            ),
            grpc.method_handlers_generic_handler(
                "osmo.router.v1.RouterAgentService", {"Connect": grpc.stream_stream_rpc_method_handler(self.agent)}
            ),
        )


def main() -> None:
    """Listen on a free loopback port, print it, serve until killed."""
    parser = argparse.ArgumentParser(prog="bench.experiments.sync_relay")
    parser.add_argument("--workers", type=int, default=256, help="threads: two per session are busy")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=server_options())
    server.add_generic_rpc_handlers(SyncRelay().handlers())
    port = add_port(server)
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
