"""`osmo-router session create|get|terminate`: RouterControlService from the command line.

What an orchestrator (OSMO's service) does through the API, for operators and scripts: create a
session ahead of time (its key, workflow and aliases, task, operation and what an old URL cannot
say), read it, terminate it. Calls need a service token (`role: service`) under --auth=jwt. Each
command prints the answer as one JSON object; a refusal prints `CODE: message` and exits 1.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message

from osmo.router.v1 import control_pb2 as cpb
from osmo.router.v1 import control_pb2_grpc as cpb_grpc
from osmo_router.cli.options import DURATION
from osmo_router.dial.channel import open_channel
from osmo_router.dial.config import DialConfig
from osmo_router.dial.options import dial_config, dial_options
from osmo_router.wire.protocol import pb

OPERATIONS = {"exec": pb.OPERATION_EXEC, "portforward": pb.OPERATION_PORT_FORWARD, "rsync": pb.OPERATION_RSYNC}


def _call(dial: DialConfig, method: Callable[[Any], Awaitable[Message]]) -> None:
    """Run one control call; print its answer as JSON, or the refusal and exit 1."""

    async def run() -> Message:
        async with open_channel(dial) as channel:
            stub = cpb_grpc.RouterControlServiceStub(channel)
            return await method(stub)

    try:
        answer = asyncio.run(run())
    except grpc.RpcError as err:
        click.echo(f"{err.code().name}: {err.details()}", err=True)
        sys.exit(1)
    click.echo(MessageToJson(answer, indent=None, preserving_proto_field_name=True))


def created_session(options: dict[str, Any], command: tuple[str, ...]) -> cpb.CreatedSession:
    """The CreatedSession the flags describe (UsageError for parameters of another operation)."""
    operation = options["operation"]
    session = cpb.CreatedSession(
        session_key=options["session_key"] or "",
        workflow_id=options["workflow_id"],
        workflow_aliases=list(options["alias"]),
        task=options["task"],
        operation=OPERATIONS[operation],
        ttl_seconds=int(options["ttl"] or 0),
    )
    given = {
        "exec": bool(command) or options["tty"],
        "portforward": options["port"] is not None,
        "rsync": options["path"] is not None,
    }
    if any(value for name, value in given.items() if name != operation):
        raise click.UsageError(f"a {operation} session takes no parameters of another operation")
    if operation == "exec" and given["exec"]:
        session.exec.command.extend(command)
        session.exec.tty = options["tty"]
    elif operation == "portforward" and given["portforward"]:
        session.port_forward.port = options["port"]
        session.port_forward.protocol = pb.PROTOCOL_UDP if options["protocol"] == "udp" else pb.PROTOCOL_TCP
    elif operation == "rsync" and given["rsync"]:
        session.rsync.module, session.rsync.path = options["module"], options["path"]
        session.rsync.writable = not options["read_only"]
    return session


#: Seconds one control call may take.
CALL_TIMEOUT = 30.0

#: What `session create` takes beyond the dial flags.
CREATE_OPTIONS = (
    click.option("--workflow-id", required=True, help="The workflow's id, as its backends name it."),
    click.option("--alias", multiple=True, help="Another name of the workflow a user may type (repeatable)."),
    click.option("--task", default="", help="The task (default: any agent of the workflow)."),
    click.option(
        "--operation", type=click.Choice(sorted(OPERATIONS)), required=True, help="What the session will run."
    ),
    click.option("--session-key", default=None, help="The key (default: the router makes one)."),
    click.option("--ttl", type=DURATION, default=None, help="How long it may wait unused (default: the router's)."),
    click.option("--tty", is_flag=True, help="exec: run the command in a terminal."),
    click.option("--port", type=click.IntRange(1, 65535), default=None, help="portforward: the port in the container."),
    click.option(
        "--protocol",
        type=click.Choice(["tcp", "udp"]),
        default="tcp",
        show_default=True,
        help="portforward: what the port carries.",
    ),
    click.option("--module", default="osmo", show_default=True, help="rsync: the module the client names."),
    click.option("--path", default=None, help="rsync: the directory in the container the module serves."),
    click.option("--read-only", is_flag=True, help="rsync: the module may not be written to."),
    click.argument("command", nargs=-1),
)


@click.group()
def session() -> None:
    """Create, read and terminate sessions ahead of time (RouterControlService; a service token)."""


def _control_command(*params: Callable[[Any], Any]) -> Callable[[Callable[..., None]], click.Command]:
    """A `session` subcommand: the dial flags, then `params` (click options and arguments) in order."""

    def make(func: Callable[..., None]) -> click.Command:
        for param in reversed(params):
            func = param(func)
        return session.command()(dial_options(func))

    return make


def _send(options: dict[str, Any], rpc: str, request: Message) -> None:
    """Call RouterControlService.`rpc` with `request` on the router the dial flags name."""
    dial = dial_config(options)
    _call(dial, lambda stub: getattr(stub, rpc)(request, metadata=dial.metadata(), timeout=CALL_TIMEOUT))


@_control_command(*CREATE_OPTIONS)
def create(command: tuple[str, ...], **options: Any) -> None:
    """Create a session; COMMAND (after --) is an exec session's command."""
    _send(options, "CreateSession", cpb.CreateSessionRequest(session=created_session(options, command)))


@_control_command(click.argument("key"))
def get(key: str, **options: Any) -> None:
    """What the router holds for the created session KEY."""
    _send(options, "GetSession", cpb.GetSessionRequest(session_key=key))


@_control_command(click.argument("key"))
def terminate(key: str, **options: Any) -> None:
    """Forget the created session KEY and end what runs on it."""
    _send(options, "TerminateSession", cpb.TerminateSessionRequest(session_key=key))
