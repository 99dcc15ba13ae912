"""`osmo-router`: serve (the router), agent (inside the container), local (both, on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

import click

from osmo_router import __version__
from osmo_router.agent.config import AgentConfig
from osmo_router.cli.agent import agent as agent_command
from osmo_router.cli.limit_options import buffer_limit_options, connection_limit_options
from osmo_router.cli.logs import setup_logging
from osmo_router.cli.migration_options import migration_options
from osmo_router.cli.options import DURATION, bool_option_names, log_options, normalize_bool_flags, run_async
from osmo_router.cli.session import session as session_commands
from osmo_router.dial.config import DialConfig
from osmo_router.io.memtune import tune_for_bulk
from osmo_router.io.stdfds import sanitise_std_fds
from osmo_router.router.config import RouterConfig

#: A TCP port (0 picks a free one); a number outside is a usage error at start-up (99999 started a router).
PORT = click.IntRange(0, 65535)
#: The same, or -1 for none.
PORT_OR_NONE = click.IntRange(-1, 65535)

# The server and agent modules (aiohttp, prometheus...) are imported where they are used: the client
# imports this module for its dial options, and every client start (rsync starts two) would pay them.

log = logging.getLogger("osmo_router")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="osmo-router")
def main_group() -> None:
    """osmo-router: pairs CLI clients with agents in workload containers and relays their streams."""


@main_group.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", type=PORT, default=50051, show_default=True, help="gRPC port (0 picks a free one).")
@click.option(
    "--metrics-port",
    type=PORT_OR_NONE,
    default=8080,
    show_default=True,
    help="Port of /metrics, /healthz and /readyz (0 picks a free one, -1 disables).",
)
@click.option(
    "--ws-port",
    type=PORT_OR_NONE,
    default=8000,
    show_default=True,
    help="Port of the old router's WebSocket endpoints, for the migration (0 picks a free one, -1 disables).",
)
@click.option("--tls-enabled/--no-tls-enabled", default=True, show_default=True, help="Serve gRPC over TLS.")
@click.option("--tls-cert", default="/etc/router/tls/tls.crt", show_default=True, help="Server certificate (PEM).")
@click.option("--tls-key", default="/etc/router/tls/tls.key", show_default=True, help="Server private key (PEM).")
@click.option("--tls-client-ca", default=None, help="CA that client certificates must chain to (mutual TLS).")
@click.option(
    "--tls-reload-interval",
    type=DURATION,
    default="30s",
    show_default=True,
    help="How often the certificate, key and client CA files are checked; changed ones are loaded for new "
    "handshakes without a restart (a renewed Kubernetes secret). 0: never.",
)
@click.option(
    "--auth",
    type=click.Choice(["jwt", "none"]),
    default="jwt",
    show_default=True,
    help="Authentication of every stream; none is only allowed on a loopback --host.",
)
@click.option("--jwt-public-key", default=None, help="PEM file with the RS256/ES256 key that signs tokens.")
@click.option("--jwks-url", default=None, help="JWKS URL to fetch signing keys from (cached, refreshed).")
@click.option(
    "--jwks-cache-ttl",
    type=DURATION,
    default="5m",
    show_default=True,
    help="How long keys fetched from --jwks-url are used before they are fetched again: a key the identity "
    "provider removed is refused at most this long (plus one fetch) later. Keys in use are kept while the "
    "provider cannot be reached.",
)
@click.option("--jwt-audience", default="osmo-router", show_default=True, help="Required `aud` claim.")
@click.option(
    "--jwt-hs256-secret",
    default=None,
    envvar="OSMO_JWT_HS256_SECRET",
    help="DEVELOPMENT ONLY: accept HS256 tokens signed with this shared secret.",
)
@click.option("--session-ttl", type=DURATION, default="30m", show_default=True, help="Idle time before a session ends.")
@click.option(
    "--rendezvous-timeout",
    type=DURATION,
    default="60s",
    show_default=True,
    help="How long one side waits for the other.",
)
@click.option(
    "--flow-control-buffer",
    type=int,
    default=16,
    show_default=True,
    help="Messages buffered per direction of a session.",
)
@click.option(
    "--flow-control-timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    help="How long a side may stop reading before its session ends.",
)
@click.option(
    "--init-timeout",
    type=DURATION,
    default="10s",
    show_default=True,
    help="Deadline for the first message of a stream.",
)
@click.option(
    "--credential-recheck",
    type=DURATION,
    default="60s",
    show_default=True,
    help="How often an agent's long-lived Register stream has its token verified again (it also ends at "
    "the token's exp; the agent then re-registers with its current token).",
)
@click.option(
    "--drain-timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    help="On SIGTERM, how long sessions in flight may run on.",
)
@click.option(
    "--keepalive-time",
    type=DURATION,
    default="20s",
    show_default=True,
    help="Ping idle connections this often (keeps them through load balancers).",
)
@click.option(
    "--keepalive-timeout",
    type=DURATION,
    default="10s",
    show_default=True,
    help="A peer that does not answer a ping within this is dropped, with its sessions.",
)
@click.option(
    "--max-message-size",
    type=int,
    default=4 * 1024 * 1024,
    show_default=True,
    help="Largest gRPC message accepted or sent.",
)
@click.option(
    "--max-connections-per-forward",
    type=int,
    default=4096,
    show_default=True,
    help="Connections one port-forward command may hold at once; the command counts as one session "
    "against --max-sessions-per-user.",
)
@click.option("--max-sessions", type=int, default=10_000, show_default=True, help="Sessions per router.")
@click.option("--max-sessions-per-user", type=int, default=256, show_default=True, help="Sessions per user.")
@click.option(
    "--max-pending-rendezvous",
    type=int,
    default=10_000,
    show_default=True,
    help="Sessions waiting for their second side.",
)
@click.option(
    "--max-pending-per-identity",
    type=int,
    default=1000,
    show_default=True,
    help="Sessions one token (user or agent) may keep waiting for their second side; 0: no such limit. "
    "Not applied with --auth=none.",
)
@click.option(
    "--redis-url",
    default=None,
    envvar="OSMO_REDIS_URL",
    help="Share the session directory with other replicas through Redis.",
)
@click.option(
    "--advertise-address",
    default=None,
    help="host:port other replicas use to reach this one (default: --host and the gRPC port).",
)
@click.option(
    "--peer-secret",
    default=None,
    envvar="OSMO_PEER_SECRET",
    help="Shared secret replicas prove themselves with when relaying streams; required with --redis-url "
    "unless --auth=none [env OSMO_PEER_SECRET].",
)
@click.option("--peer-tls-ca", default=None, help="CA bundle to verify other replicas with (default: system store).")
@click.option(
    "--peer-tls-server-name",
    default=None,
    help="Name to verify in other replicas' certificates (default: the host of their advertise address).",
)
@click.option(
    "--directory-ttl",
    type=DURATION,
    default="45s",
    show_default=True,
    help="Lifetime of this replica's entries in Redis; refreshed every third of it, gone this long after a crash.",
)
@buffer_limit_options
@connection_limit_options
@migration_options
@log_options
def serve(log_level: str, log_format: str, **options: Any) -> None:
    """Run the router."""
    setup_logging(log_level, log_format)
    try:
        config = RouterConfig(**options)
        config.validate()
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    # Relayed rsync and forward traffic arrives in messages of up to 1 MiB; see memtune. The idle
    # session figure (bench) is the same with and without it: small allocations are not affected.
    tune_for_bulk()
    sys.exit(run_async(_serve(config), prefer_uvloop=True))


async def _serve(config: RouterConfig) -> int:
    from osmo_router.router.server import RouterServer

    try:
        server = RouterServer(config)
        await server.start()
    except (OSError, RuntimeError, ValueError) as err:
        log.error("cannot start: %s", err)
        return 1
    await server.serve()
    return 0


@main_group.command()
@click.option("--port", type=PORT, default=50051, show_default=True, help="gRPC port on 127.0.0.1.")
@click.option("--metrics-port", type=PORT_OR_NONE, default=8080, show_default=True, help="Metrics port on 127.0.0.1.")
@click.option(
    "--ws-port", type=PORT_OR_NONE, default=8000, show_default=True, help="WebSocket port on 127.0.0.1 (-1: none)."
)
@click.option("--workflow-id", default="local", show_default=True, help="Workflow id the local agent serves.")
@log_options
def local(port: int, metrics_port: int, ws_port: int, workflow_id: str, log_level: str, log_format: str) -> None:
    """Embedded default: a router and an agent in one process on loopback (no TLS, no auth)."""
    setup_logging(log_level, "text" if log_format == "auto" else log_format)
    config = RouterConfig(port=port, metrics_port=metrics_port, ws_port=ws_port, tls_enabled=False, auth="none")
    tune_for_bulk()  # as `serve` and `agent` do: bulk sessions move 1 MiB frames (memtune)
    run_async(_local(config, workflow_id))


async def _local(config: RouterConfig, workflow_id: str) -> None:
    from osmo_router.agent.agent import Agent
    from osmo_router.router.server import RouterServer

    server = RouterServer(config)
    await server.start()
    agent = Agent(AgentConfig(dial=DialConfig(address=f"127.0.0.1:{server.port}", tls=False), workflow_id=workflow_id))
    runner = asyncio.create_task(agent.run())
    await agent.registered.wait()
    address = f"127.0.0.1:{server.port}"
    print(
        f"\nosmo-router is running on {address} with a local agent for workflow {workflow_id!r}.\n"
        "Try, in another terminal:\n\n"
        f"  .venv/bin/osmo-net-client exec --router-address {address} --workflow-id {workflow_id} "
        "--tls=false --tty -- bash\n"
        f"  echo hello | .venv/bin/osmo-net-client exec --router-address {address} --workflow-id {workflow_id} "
        "--tls=false -- cat\n\n"
        f"Metrics: http://127.0.0.1:{server.metrics_server.port}/metrics   Stop with Ctrl-C.\n",
        flush=True,
    )
    try:
        await server.serve()
    finally:
        await agent.close()
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner


main_group.add_command(agent_command)
main_group.add_command(session_commands)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `osmo-router`."""
    sanitise_std_fds()
    args = sys.argv[1:] if argv is None else argv
    main_group.main(args=normalize_bool_flags(args, bool_option_names(main_group)), prog_name="osmo-router")
