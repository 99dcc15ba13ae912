"""JWT authentication (placeholder until the security work lands): refuses to start."""

from __future__ import annotations

from collections.abc import Sequence

from osmo_router.router.auth import Identity
from osmo_router.router.config import RouterConfig


class JwtAuthenticator:
    """Verifies bearer tokens."""

    @classmethod
    def from_config(cls, config: RouterConfig) -> JwtAuthenticator:
        """Not implemented yet."""
        raise ValueError("--auth=jwt is not implemented yet; use --auth=none on loopback")

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """Not implemented yet."""
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing to release."""
