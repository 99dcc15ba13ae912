"""Long-lived agent streams are checked again: a key removed from the JWKS ends the registration in bounded time.

An in-process router verifying tokens against a JWKS served on loopback (keys looked up afresh
every second), re-checking Register streams every half second; a raw agent registers, then its
signing key is withdrawn from the JWKS.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio

from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.auth.jwks import JwksKeys
from osmo_router.router.auth.jwt import JwtAuthenticator
from osmo_router.router.auth.recheck import CredentialWatch
from osmo_router.router.config import RouterConfig
from osmo_router.router.server import RouterServer
from osmo_router.wire.errors import Unauthenticated
from osmo_router.wire.protocol import pb
from tests.raw_grpc import REGISTER, RawCall, hello, raw_channel
from tests.security_kit import JwksServer, Signer

WF = "wf-revoke"


@pytest.fixture
def signer_and_jwks() -> Iterator[tuple[Signer, JwksServer]]:
    signer = Signer.rs256(kid="agent-key")
    jwks = JwksServer([signer])
    yield signer, jwks
    jwks.close()


@pytest_asyncio.fixture
async def router(signer_and_jwks: tuple[Signer, JwksServer]) -> AsyncIterator[RouterServer]:
    _signer, jwks = signer_and_jwks
    auth = JwtAuthenticator(jwks=JwksKeys(jwks.url, lifespan=1.0, min_refresh_interval=0.2))
    config = RouterConfig(port=0, metrics_port=-1, ws_port=-1, tls_enabled=False, auth="none", credential_recheck=0.5)
    server = RouterServer(config, authenticator=auth)
    await server.start()
    yield server
    await server.close()


@pytest.mark.asyncio
async def test_a_key_removed_from_the_jwks_ends_the_registration(
    router: RouterServer, signer_and_jwks: tuple[Signer, JwksServer]
) -> None:
    signer, jwks = signer_and_jwks
    token = signer.token("pod-1", workflows=[WF], role="agent")
    async with raw_channel(f"127.0.0.1:{router.port}") as channel:
        register = RawCall(channel, REGISTER, token)
        await register.send(hello(WF))
        first = pb.RegisterResponse.FromString(await register.read() or b"")
        assert first.WhichOneof("kind") == "registered" and len(router.registry) == 1
        # The identity provider withdraws the key (rotated out for another one; an empty set would be
        # taken for a failed fetch, which keeps the keys it had).
        jwks.keys[:] = [Signer.rs256(kid="next-key").jwk()]
        withdrawn = time.monotonic()
        outcome = await register.finish(half_close=False, timeout=15)
        took = time.monotonic() - withdrawn
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, outcome
    assert "no longer valid" in outcome.details
    # Bounded by the JWKS lifespan (1 s) and the recheck interval (0.5 s), with room for a loaded machine.
    assert took < 10
    assert len(router.registry) == 0


class _Flip:
    """An authenticator that verifies until told otherwise."""

    def __init__(self) -> None:
        self.valid = True

    async def authenticate(self, metadata: object) -> Identity:
        return await self.revalidate(metadata)

    async def revalidate(self, metadata: object) -> Identity:
        if not self.valid:
            raise Unauthenticated("token revoked")
        return Identity("pod", role=ROLE_AGENT, expires=time.time() + 3600)

    async def close(self) -> None:
        """Nothing to release."""


@pytest.mark.asyncio
async def test_credential_watch_schedules_and_fails_on_expiry_or_revocation() -> None:
    clock = [1000.0]
    auth = _Flip()
    identity = Identity("pod", role=ROLE_AGENT, expires=1010.0)
    watch = CredentialWatch(auth, (), identity, interval=60, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert watch.due_in() == 10  # the expiry comes before the next recheck
    clock[0] = 1005.0
    await watch.check()  # re-verified: a renewed expiry (an hour on) and the next recheck in 60 s
    assert watch.due_in() == 60
    auth.valid = False
    clock[0] = 1065.0
    with pytest.raises(Unauthenticated, match="no longer valid"):
        await watch.check()
    expired = CredentialWatch(auth, (), Identity("pod", expires=1000.0), interval=60, clock=lambda: 1001.0)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="expired"):
        await expired.check()
