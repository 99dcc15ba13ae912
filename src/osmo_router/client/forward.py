"""`osmo-net-client port-forward` (placeholder until the port-forward work lands)."""

from __future__ import annotations

import sys

from osmo_router.client.config import ClientConfig


async def run_port_forward(
    config: ClientConfig, specs: list[str], *, protocol: str, addresses: list[str], json_output: bool, reconnect: bool
) -> int:
    """Not implemented yet."""
    print("osmo-net-client: port-forward is not implemented yet", file=sys.stderr)
    return 2
