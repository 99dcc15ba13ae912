"""What the agent serves: a handler per kind of session, a refusal, and the bound on what sessions open with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from osmo_router.agent.config import AgentConfig
from osmo_router.agent.exec import run_exec
from osmo_router.agent.forward import serve_port_forward
from osmo_router.agent.rsync import serve_rsync
from osmo_router.transport import SessionStream
from osmo_router.wire.protocol import pb

#: What the opening messages (command, environment...) of one user's sessions may add up to while
#: their handlers run, and of everyone's: the agent keeps about four copies of each (the message,
#: argv, the process's Popen, a held session's summary) for the session's life. 20 sessions whose
#: command carried 1.5 MiB of arguments grew the agent by 117 MiB. Ordinary inits are a few hundred bytes.
OPEN_USER_BYTES = 16 * 1024 * 1024
OPEN_TOTAL_BYTES = 64 * 1024 * 1024

SessionHandler = Callable[[SessionStream, pb.SessionOpen, AgentConfig], Awaitable[None]]


async def _serve_exec(stream: SessionStream, open_msg: pb.SessionOpen, config: AgentConfig) -> None:
    await run_exec(stream, open_msg.exec, shell=config.shell, workdir=config.workdir)


def default_handlers() -> dict[str, SessionHandler]:
    """Session handlers by the name of the SessionOpen init they serve."""
    return {"exec": _serve_exec, "port_forward": serve_port_forward, "rsync": serve_rsync}


async def refuse(stream: SessionStream, code: grpc.StatusCode, message: str) -> None:
    """End a session before serving it: the error, then this side's end."""
    await stream.send_error(code, message)
    await stream.send(pb.Frame(half_close=pb.HalfClose()))
    await stream.close()
