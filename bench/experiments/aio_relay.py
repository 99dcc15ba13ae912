"""bench/plain_relay.py's grpc.aio relay with server options and the event loop chosen on the command line.

    python -m bench.experiments.aio_relay [--option NAME=INT ...] [--no-uvloop]   (prints "listening PORT")

The options are added to (or replace) the router's own server options; environment variables that grpc
reads at start-up (GRPC_POLL_STRATEGY, GRPC_EXPERIMENTS, GRPC_ENABLE_FORK_SUPPORT, ...) are given by
the caller in the process's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import grpc

from bench.plain_relay import PlainRelay
from osmo_router.wire.protocol import server_options


def parse_option(text: str) -> tuple[str, int | str]:
    """NAME=VALUE, the value an int when it is one."""
    name, _, value = text.partition("=")
    return name, int(value) if value.lstrip("-").isdigit() else value


#: Certificate and key files in these variables make the prototypes listen with TLS (compare_paths --tls).
TLS_CERT_ENV, TLS_KEY_ENV = "OSMO_BENCH_TLS_CERT", "OSMO_BENCH_TLS_KEY"


def add_port(server: Any) -> int:
    """A free loopback port on a grpcio server (sync or aio), with TLS when the environment says so."""
    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    if cert and key:
        with open(cert, "rb") as c, open(key, "rb") as k:
            credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
        return int(server.add_secure_port("127.0.0.1:0", credentials))
    return int(server.add_insecure_port("127.0.0.1:0"))


async def serve(extra: list[tuple[str, int | str]]) -> None:
    """Listen on a free loopback port, print it, serve until killed."""
    names = {name for name, _ in extra}
    options = [(n, v) for n, v in server_options() if n not in names] + extra
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(PlainRelay().handlers())
    port = add_port(server)
    await server.start()
    print(f"listening {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    """Parse the options, serve on uvloop unless told not to."""
    parser = argparse.ArgumentParser(prog="bench.experiments.aio_relay")
    parser.add_argument("--option", action="append", default=[], type=parse_option)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if not args.no_uvloop:
        import uvloop

        uvloop.run(serve(args.option))
        return
    asyncio.run(serve(args.option))


if __name__ == "__main__":
    main()
