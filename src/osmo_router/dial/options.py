"""The dial flags (router address, TLS, token) shared by `osmo-router agent` and `osmo-net-client`."""

from __future__ import annotations

import logging
from typing import Any

import click

from osmo_router.dial.config import (
    DEFAULT_GRPC_CHANNEL,
    DialConfig,
    address_problem,
    split_addresses,
    tls_files_problem,
    token_file_problem,
)

log = logging.getLogger(__name__)

#: The values of --grpc-channel.
GRPC_CHANNELS = ("grpcio", "native")


def _check_router_address(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    for address in split_addresses(value):
        if (problem := address_problem(address)) is not None:
            raise click.BadParameter(problem)
    return value


def dial_options(f: Any) -> Any:
    """Add the dial flags to a click command."""
    for decorator in reversed(
        [
            click.option(
                "--router-address",
                envvar="OSMO_ROUTER_ADDRESS",
                required=True,
                callback=_check_router_address,
                help="host:port of the router; several may be listed, comma-separated (replicas of one "
                "router): the agent registers with the next one when it reconnects, a client opens its "
                "sessions (and resumes them) on the next one when one is unreachable or draining "
                "[env OSMO_ROUTER_ADDRESS].",
            ),
            click.option(
                "--tls/--no-tls", default=True, show_default=True, envvar="OSMO_TLS", help="Dial the router over TLS."
            ),
            click.option(
                "--tls-ca",
                envvar="OSMO_TLS_CA",
                default=None,
                help="CA bundle to verify the router with (default: system store).",
            ),
            click.option("--tls-cert", envvar="OSMO_TLS_CERT", default=None, help="Client certificate (mutual TLS)."),
            click.option("--tls-key", envvar="OSMO_TLS_KEY", default=None, help="Client key (mutual TLS)."),
            click.option(
                "--tls-server-name",
                envvar="OSMO_TLS_SERVER_NAME",
                default=None,
                help="Name to verify in the router's certificate, if not the address's host.",
            ),
            click.option("--token", envvar="OSMO_TOKEN", default=None, help="Bearer token [env OSMO_TOKEN]."),
            click.option(
                "--token-file",
                envvar="OSMO_TOKEN_FILE",
                default=None,
                help="File holding the bearer token, read at every call, so a renewed token is picked up "
                "[env OSMO_TOKEN_FILE]; --token is the fallback when it cannot be read.",
            ),
            click.option(
                "--grpc-channel",
                type=click.Choice(GRPC_CHANNELS),
                default=DEFAULT_GRPC_CHANNEL,
                show_default=True,
                envvar="OSMO_GRPC_CHANNEL",
                help="gRPC client implementation: grpcio (grpc.aio) or native (asyncio HTTP/2, cheaper per "
                "message) [env OSMO_GRPC_CHANNEL].",
            ),
        ]
    ):
        f = decorator(f)
    return f


def dial_config(options: dict[str, Any]) -> DialConfig:
    """A DialConfig from the common dial flags (popped from `options`); UsageError for TLS files it cannot use."""
    dial = DialConfig(
        address=options.pop("router_address"),
        tls=options.pop("tls"),
        tls_ca=options.pop("tls_ca"),
        tls_cert=options.pop("tls_cert"),
        tls_key=options.pop("tls_key"),
        tls_server_name=options.pop("tls_server_name"),
        token=options.pop("token"),
        token_file=options.pop("token_file", None),
        cookie=options.pop("cookie", None),
        grpc_channel=options.pop("grpc_channel", None) or DEFAULT_GRPC_CHANNEL,
    )
    if (problem := tls_files_problem(dial)) is not None:
        raise click.UsageError(problem)
    if (problem := token_file_problem(dial)) is not None:
        log.warning(problem)
    return dial
