"""The flags that turn `osmo-router agent` into a WebSocket backend for one orchestrator-keyed session."""

from __future__ import annotations

from typing import Any

import click

from osmo_router.wire.wsproto import OPERATIONS


def ws_agent_options(f: Any) -> Any:
    """The flags of `osmo-router agent --transport ws`."""
    for decorator in reversed(
        [
            click.option(
                "--transport",
                type=click.Choice(["grpc", "ws"]),
                default="grpc",
                show_default=True,
                help="grpc: register and serve every session; ws: serve the one session --session-key names "
                "as a WebSocket backend of the old protocol.",
            ),
            click.option(
                "--session-key",
                envvar="OSMO_SESSION_KEY",
                default=None,
                help="With --transport ws: the key an orchestrator issued for the session.",
            ),
            click.option(
                "--operation",
                type=click.Choice(sorted(OPERATIONS)),
                default="exec",
                show_default=True,
                help="With --transport ws: the session's operation.",
            ),
            click.option(
                "--ws-address",
                envvar="OSMO_WS_ADDRESS",
                default=None,
                help="With --transport ws: the router's WebSocket endpoint [default: router host, port 8000].",
            ),
        ]
    ):
        f = decorator(f)
    return f


def ws_agent_settings(options: dict[str, Any]) -> dict[str, Any] | None:
    """The WebSocket backend's settings (popped from `options`) for WsBackendConfig, or None for gRPC."""
    transport, key = options.pop("transport"), options.pop("session_key")
    operation, ws_address = options.pop("operation"), options.pop("ws_address")
    if transport != "ws":
        return None
    if not key:
        raise click.UsageError("--transport ws needs --session-key (issued by an orchestrator)")
    return {"session_key": key, "operation": OPERATIONS[operation], "ws_address": ws_address}
