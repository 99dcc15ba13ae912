"""`osmo-router agent`: the agent inside a workload container, its flags and its run until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Any

import click

from osmo_router.agent.config import AgentConfig
from osmo_router.agent.process import default_signals_for_commands
from osmo_router.agent.ws_options import ws_agent_options, ws_agent_settings
from osmo_router.cli.logs import setup_logging
from osmo_router.cli.options import log_options, prefers_uvloop, run_async
from osmo_router.cli.resume_options import agent_resume_options
from osmo_router.dial.options import dial_config, dial_options
from osmo_router.io.memtune import tune_for_bulk
from osmo_router.wire.protocol import MAX_STANDBY_STREAMS

# The agent's own modules (the agent, port-forward, the WebSocket backend) are imported where they are
# used: every `osmo-router` command imports this module (cli/main.py), `serve` and `local` too.


@click.command()
@dial_options
@click.option("--workflow-id", envvar="OSMO_WORKFLOW_ID", required=True, help="Workflow this agent serves.")
@click.option("--task", envvar="OSMO_TASK", default="", help="Task within the workflow this agent serves.")
@click.option("--agent-id", envvar="OSMO_AGENT_ID", default="", help="Stable id (default: random per process).")
@click.option("--shell", default=None, help="Command for exec without a command (default /bin/bash, else /bin/sh).")
@click.option("--workdir", default=None, help="Working directory of exec'd commands.")
@click.option("--allow-ports", multiple=True, help="Ports (or ranges a-b) that port-forward may reach; default all.")
@click.option(
    "--rsync-root",
    "rsync_roots",
    multiple=True,
    help="Directory rsync may read and write (repeatable); default anywhere.",
)
@click.option("--rsync-binary", default="rsync", show_default=True, help="rsync executable in the container.")
@click.option(
    "--standby-streams",
    envvar="OSMO_STANDBY_STREAMS",
    type=click.IntRange(0, MAX_STANDBY_STREAMS),
    default=2,
    show_default=True,
    help="Connect streams kept open on the router ahead of sessions, so a session starts without a "
    "request round trip (a used one is replaced at once); 0: none; the router parks at most 8 "
    "[env OSMO_STANDBY_STREAMS].",
)
@click.option(
    "--max-udp-sockets-per-session",
    envvar="OSMO_MAX_UDP_SOCKETS_PER_SESSION",
    type=click.IntRange(1, None),
    default=256,
    show_default=True,
    help="UDP sockets (one per client-side sender) one UDP port-forward may hold; a new sender beyond "
    "it takes the place of the session's least recently used one [env OSMO_MAX_UDP_SOCKETS_PER_SESSION].",
)
@click.option(
    "--max-udp-sockets",
    envvar="OSMO_MAX_UDP_SOCKETS",
    type=click.IntRange(1, None),
    default=1024,
    show_default=True,
    help="UDP sockets of all UDP port-forwards of this agent; when reached, a new sender takes the place "
    "of its own session's least recently used one, or its datagram is dropped (counted, logged) "
    "[env OSMO_MAX_UDP_SOCKETS].",
)
@agent_resume_options
@ws_agent_options
@log_options
def agent(log_level: str, log_format: str, **options: Any) -> None:
    """Run the agent inside a workload container."""
    setup_logging(log_level, log_format)
    from osmo_router.agent.forward import parse_port_ranges

    ws = ws_agent_settings(options)
    try:
        parse_port_ranges(tuple(options["allow_ports"]))
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    dial = dial_config(options)
    config = AgentConfig(
        dial=dial,
        workflow_id=options["workflow_id"],
        task=options["task"],
        agent_id=options["agent_id"],
        shell=options["shell"],
        workdir=options["workdir"],
        allow_ports=tuple(options["allow_ports"]),
        rsync_roots=tuple(options["rsync_roots"]),
        rsync_binary=options["rsync_binary"],
        standby_streams=options["standby_streams"],
        max_udp_sockets_per_session=options["max_udp_sockets_per_session"],
        max_udp_sockets=options["max_udp_sockets"],
        resume_grace=options["resume_grace"],
        replay_buffer_bytes=options["replay_buffer_bytes"],
        replay_total_bytes=options["replay_total_bytes"],
    )
    tune_for_bulk()  # exec, port-forward and rsync move 1 MiB frames (memtune), on either transport
    default_signals_for_commands()
    if ws is not None:
        from osmo_router.agent.ws_backend import WsBackendConfig, serve_ws_session

        sys.exit(run_async(serve_ws_session(WsBackendConfig(agent=config, **ws))))
    run_async(_run_agent(config), prefer_uvloop=prefers_uvloop(dial.grpc_channel))


async def _run_agent(config: AgentConfig) -> None:
    from osmo_router.agent.agent import Agent

    agent = Agent(config)
    runner = asyncio.create_task(agent.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    await agent.close()
    runner.cancel()
    stopper.cancel()
    with contextlib.suppress(BaseException):
        await runner
