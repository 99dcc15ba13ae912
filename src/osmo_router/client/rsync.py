"""`osmo-net-client rsync` (placeholder until the rsync work lands)."""

from __future__ import annotations

import sys

from osmo_router.client.config import ClientConfig


def run_rsync(
    config: ClientConfig,
    paths: list[str],
    *,
    delete: bool,
    exclude: list[str],
    progress: bool,
    bwlimit: str | None,
    rsync_binary: str,
) -> int:
    """Not implemented yet."""
    print("osmo-net-client: rsync is not implemented yet", file=sys.stderr)
    return 2
