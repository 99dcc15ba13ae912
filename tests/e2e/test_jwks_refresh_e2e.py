"""Tokens with made-up key ids cannot turn into a stream of fetches from the identity provider.

A router with only `--jwks-url` looks a token's `kid` up in the key set it fetched; a kid it does not
know triggers a refresh, at most one per min_refresh_interval (router/auth/jwks.py, 10 s), and a
failed refresh keeps the keys it had. Real router and agent, a real JWKS endpoint on loopback
(tests/security_kit.py JwksServer, counting its requests, able to answer 503). Mallory sends rounds
of streams whose tokens name unknown key ids, with the provider up and then down; the provider sees
at most one fetch per interval, and alice's token (a known kid) is accepted and her exec runs meanwhile.
The other path of that limit, a known kid in a set past its lifespan while the provider is down, is
tested with a clock of the test's in tests/unit/test_jwt_auth.py. A key rotated out at the provider is
refused once the set's lifespan (`--jwks-cache-ttl`) has passed and the set was fetched again.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Iterator

import grpc
import pytest

from osmo_router.router.auth.jwks import JwksKeys
from tests.harness import AgentProc, Router, run_client
from tests.raw_grpc import EXEC, exchange, exec_init, raw_channel
from tests.security_kit import JwksServer, Signer

WF = "wf-jwks-refresh"
#: The router's pace of refreshes (JwksKeys' default min_refresh_interval: no flag sets it).
REFRESH_INTERVAL: float = inspect.signature(JwksKeys).parameters["min_refresh_interval"].default
#: Rounds of mallory's streams per phase, each round a few streams at once (each round would be a fetch
#: without the limit).
ROUNDS, AT_ONCE = 25, 4


@pytest.fixture
def setup() -> Iterator[tuple[JwksServer, Signer, Router]]:
    signer = Signer.rs256("idp-key-1")
    jwks = JwksServer([signer])
    router = Router("--tls-enabled=false", "--auth=jwt", "--jwks-url", jwks.url, secure=True)
    agent = AgentProc(router.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
    try:
        yield jwks, signer, router
    finally:
        agent.stop()
        router.stop()
        jwks.close()


class Mallory:
    """Streams whose tokens name key ids nobody published (one signing key, a new `kid` each token)."""

    def __init__(self) -> None:
        self.key = Signer.rs256().key
        self.sent = 0
        self.details: set[str] = set()

    async def rounds(self, channel: grpc.aio.Channel, count: int) -> None:
        """`count` rounds of AT_ONCE Exec streams at once; each is refused UNAUTHENTICATED."""
        for _ in range(count):
            tokens = []
            for _ in range(AT_ONCE):
                self.sent += 1
                tokens.append(Signer("RS256", self.key, f"made-up-{self.sent}").token("mallory", workflows=[WF]))
            outcomes = await asyncio.gather(*(exchange(channel, EXEC, t, exec_init(WF, ["true"])) for t in tokens))
            assert {o.code for o in outcomes} == {grpc.StatusCode.UNAUTHENTICATED}, outcomes
            self.details |= {o.details for o in outcomes}


def _alice_execs(router: Router, signer: Signer, word: str) -> None:
    """Alice's exec with a token of the known key, one the router never saw (no cache in play)."""
    token = signer.token("alice", workflows=[WF], nonce=word)
    flags = ["--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", token]
    result = run_client("exec", *flags, "--", "echo", word)
    assert (result.returncode, result.stdout) == (0, f"{word}\n".encode()), result.stderr


def _bound(elapsed: float) -> int:
    """Most refreshes in `elapsed` seconds: one at once, then one per interval."""
    return 1 + math.ceil(elapsed / REFRESH_INTERVAL)


@pytest.mark.asyncio
async def test_unknown_key_ids_fetch_at_most_once_per_interval_and_a_known_key_keeps_working(
    setup: tuple[JwksServer, Signer, Router],
) -> None:
    jwks, signer, router = setup
    assert jwks.fetches == 1  # the agent's token: the first look-up fetched the set
    mallory = Mallory()
    async with raw_channel(router.address) as channel:
        # The provider is up: each round names new key ids.
        start, before = time.monotonic(), jwks.fetches
        await mallory.rounds(channel, ROUNDS)
        fetched, elapsed = jwks.fetches - before, time.monotonic() - start
        assert fetched <= _bound(elapsed), f"{fetched} fetches for {ROUNDS} rounds in {elapsed:.1f}s"
        await asyncio.to_thread(_alice_execs, router, signer, "while-up")

        # The provider is down: mallory goes on until a refresh was tried (and failed), then some more.
        # A failed refresh is not tried again per token either, and the keys fetched before serve alice.
        jwks.failing = True
        start, before = time.monotonic(), jwks.fetches
        async with asyncio.timeout(3 * REFRESH_INTERVAL):
            while jwks.fetches == before:
                await mallory.rounds(channel, 1)
        await mallory.rounds(channel, ROUNDS)
        fetched, elapsed = jwks.fetches - before, time.monotonic() - start
        assert fetched <= _bound(elapsed), f"{fetched} fetches (provider down) in {elapsed:.1f}s"
    router.wait_for(lambda r: "cannot fetch signing keys" in str(r.get("msg")), timeout=10)
    await asyncio.to_thread(_alice_execs, router, signer, "while-down")
    # Every refusal says what is wrong with mallory's tokens (not that no keys could be fetched).
    assert mallory.details and all("unknown key" in d for d in mallory.details), mallory.details


def _exec_with(router: Router, signer: Signer, word: str) -> tuple[int, str]:
    """Alice's exec with a fresh token of `signer`'s key: its exit code and stderr."""
    token = signer.token("alice", workflows=[WF], nonce=word)
    flags = ["--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", token]
    result = run_client("exec", *flags, "--", "echo", word)
    return result.returncode, result.stderr.decode(errors="replace")


def test_a_key_rotated_out_is_refused_after_the_cache_ttl() -> None:
    old, new = Signer.rs256("idp-old"), Signer.rs256("idp-new")
    jwks = JwksServer([old, new])
    router = Router("--tls-enabled=false", "--auth=jwt", "--jwks-url", jwks.url, "--jwks-cache-ttl=1s", secure=True)
    agent = AgentProc(router.address, WF, "--token", new.token("pod", workflows=[WF], role="agent"))
    try:
        assert _exec_with(router, old, "before")[0] == 0
        jwks.keys = [new.jwk()]  # the provider rotated the old key out
        deadline, tries = time.monotonic() + 30, 0
        while (outcome := _exec_with(router, old, f"after-{tries}"))[0] == 0:
            tries += 1
            assert time.monotonic() < deadline, f"the rotated-out key still accepted after {tries} execs"
        code, stderr = outcome
        assert code != 0 and "unknown key" in stderr, (code, stderr)
        assert _exec_with(router, new, "new-key") == (0, "")
        # Refused for good, not by chance: the set the router holds no longer has the key.
        assert _exec_with(router, old, "again")[0] != 0
    finally:
        agent.stop()
        router.stop()
        jwks.close()
