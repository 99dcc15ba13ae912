"""What `osmo-net-client port-forward` tells the user: text lines, or one JSON object per line.

Readiness (`Forwarding from ...`) goes to stdout, flushed at once, so scripts can wait for it.
Problems go to stderr as one line each; with --json they are also JSON events on stdout.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any, Protocol

from osmo_router.client.notice import say
from osmo_router.io.forwarding import format_peer
from osmo_router.transport import SessionStream
from osmo_router.wire.errors import RouterError


class SessionOpener(Protocol):
    """Opens PortForward sessions on the shared channel."""

    async def open_stream(self, protocol: int, remote_port: int) -> SessionStream:
        """A session whose agent has joined; raises RouterError on refusal."""
        ...

    async def start_stream(self, protocol: int, remote_port: int) -> SessionStream:
        """A session whose init is sent; `wait_ready` follows (frames may be sent before it)."""
        ...

    async def wait_ready(self, stream: SessionStream) -> None:
        """Wait until the agent of a started session joined; raises RouterError on refusal."""
        ...


#: Signals that stop a forward cleanly (exit 0): Ctrl-C, SIGTERM, and its terminal closing (SIGHUP),
#: which used to kill it outright and leave every connection in flight held by the agent for its
#: resume grace, connected to its target.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def host_port(address: str, port: int) -> str:
    """ "127.0.0.1:8080" or "[::1]:8080"."""
    return format_peer((address, port))


class Reporter:
    """Prints events as text or JSON lines."""

    def __init__(self, json_output: bool) -> None:
        self.json_output = json_output

    def _emit(self, event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def forwarding(self, protocol: str, address: str, local_port: int, remote_port: int) -> None:
        """A listener is ready."""
        if self.json_output:
            self._emit(
                {
                    "event": "forwarding",
                    "protocol": protocol,
                    "local_address": address,
                    "local_port": local_port,
                    "remote_port": remote_port,
                }
            )
        else:
            sys.stdout.write(f"Forwarding from {host_port(address, local_port)} -> {remote_port}\n")
            sys.stdout.flush()

    def connection_error(self, protocol: str, local: str, remote_port: int, err: RouterError) -> None:
        """One forwarded connection (or UDP session) failed; the forward goes on."""
        say(f"{protocol} {local} -> {remote_port}: {err.message} [{err.code.name}]", "port-forward", tty=False)
        if self.json_output:
            self._emit(
                {
                    "event": "connection_error",
                    "protocol": protocol,
                    "local": local,
                    "remote_port": remote_port,
                    "code": err.code.name,
                    "message": err.message,
                }
            )

    def fatal(self, err: RouterError, what: str) -> None:
        """The forward cannot start or go on."""
        say(f"{what}: {err.message} [{err.code.name}]", "port-forward", tty=False)
        if self.json_output:
            self._emit({"event": "error", "what": what, "code": err.code.name, "message": err.message})

    def notice(self, event: str, message: str) -> None:
        """A change of state worth a line (agent lost, agent back, waiting)."""
        say(message, "port-forward", tty=False)
        if self.json_output:
            self._emit({"event": event, "message": message})
