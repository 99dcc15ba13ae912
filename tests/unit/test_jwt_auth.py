"""JwtAuthenticator as pure logic: real keys and signed tokens, no router."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import jwt
import pytest

from osmo_router.router.auth.identity import ROLE_AGENT, ROLE_USER, Identity, NoAuth
from osmo_router.router.auth.jwks import JwksKeys
from osmo_router.router.auth.jwt import JwtAuthenticator, TokenCache, bearer_token, identity_from_claims
from osmo_router.router.config import RouterConfig
from osmo_router.wire.errors import PermissionDenied, Unauthenticated
from tests.security_kit import JwksServer, Signer

RSA = Signer.rs256()
EC = Signer.es256()
SECRET = "development-only-secret-of-32-bytes!"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def authenticate(auth: JwtAuthenticator, token: str) -> Identity:
    return asyncio.run(auth.authenticate(bearer(token)))


def refusal(auth: JwtAuthenticator, token: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        authenticate(auth, token)
    return info.value.message


@pytest.fixture
def rsa_auth() -> JwtAuthenticator:
    return JwtAuthenticator(public_key_pem=RSA.public_pem())


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer([RSA, EC])
    yield server
    server.close()


def test_rs256_user_token_gives_identity(rsa_auth: JwtAuthenticator) -> None:
    identity = authenticate(rsa_auth, RSA.token("alice", workflows=["wf-1", "wf-2"]))
    assert identity.subject == "alice"
    assert identity.role == ROLE_USER
    assert identity.workflows == ("wf-1", "wf-2")
    assert identity.may_reach("wf-2") and not identity.may_reach("wf-3")


def test_es256_agent_token_from_pem() -> None:
    auth = JwtAuthenticator(public_key_pem=EC.public_pem())
    identity = authenticate(auth, EC.token("pod-7", workflows=["*"], role="agent"))
    assert identity.role == ROLE_AGENT
    assert identity.may_reach("anything")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (RSA.token(ttl=-120), "token expired"),
        (Signer.rs256().token(), "signature is not valid"),
        (RSA.token(aud="another-service"), "audience is not 'osmo-router'"),
        (RSA.token(aud=None), "no 'aud' claim"),
        (jwt.encode({"sub": "x", "aud": "osmo-router"}, RSA.key, algorithm="RS256"), "no 'exp' claim"),
        (jwt.encode({"exp": time.time() + 60, "aud": "osmo-router"}, RSA.key, algorithm="RS256"), "no 'sub' claim"),
        (EC.token(), "does not match"),
        ("not.a.token", "malformed token"),
        (jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"), "HS256 tokens are not accepted"),
        (jwt.encode({"sub": "x"}, None, algorithm="none"), "'none' is not accepted"),  # type: ignore[arg-type]
        (RSA.token(workflows="wf", role="agent", nbf=int(time.time()) + 3600), "not valid yet"),
        (RSA.token(workflows=[1, 2]), "must be a list"),
    ],
)
def test_refusals_say_why(rsa_auth: JwtAuthenticator, token: str, reason: str) -> None:
    assert reason in refusal(rsa_auth, token)


def test_clock_skew_within_leeway_is_accepted(rsa_auth: JwtAuthenticator) -> None:
    assert authenticate(rsa_auth, RSA.token(ttl=-10)).subject == "alice"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_an_exp_that_is_not_a_number_is_refused(rsa_auth: JwtAuthenticator) -> None:
    """PyJWT lets `exp: "1764000000"` through; the router must not take it as a token without an end.

    An agent's Register stream ends at its identity's `expires` (auth/recheck.py): a string `exp`
    left it None, and the registration outlived the token until a recheck, with the 30 s leeway.
    """
    soon = int(time.time() + 5)
    token = RSA.token("pod", workflows=["wf"], role=ROLE_AGENT, exp=str(soon))
    assert refusal(rsa_auth, token) == "token's 'exp' claim must be a number (seconds since the epoch)"
    assert authenticate(rsa_auth, RSA.token("pod", role=ROLE_AGENT, exp=soon)).expires == float(soon)


def test_hs256_public_key_confusion_is_refused(rsa_auth: JwtAuthenticator) -> None:
    # The classic attack: an HS256 token whose "secret" is the router's public key.
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps({"sub": "mallory", "aud": "osmo-router", "exp": 9999999999, "workflows": ["*"]}).encode())
    signing_input = f"{header}.{payload}"
    signature = hmac.new(RSA.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    assert "HS256 tokens are not accepted" in refusal(rsa_auth, f"{signing_input}.{_b64(signature)}")


def test_hs256_only_with_the_development_secret() -> None:
    auth = JwtAuthenticator(hs256_secret=SECRET)
    token = jwt.encode({"sub": "dev", "aud": "osmo-router", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    assert authenticate(auth, token).subject == "dev"
    assert "RS256 tokens are not accepted" in refusal(auth, RSA.token())


def test_missing_and_malformed_authorization() -> None:
    with pytest.raises(Unauthenticated, match="no bearer token"):
        bearer_token([("other", "x")])
    with pytest.raises(Unauthenticated, match="not a bearer token"):
        bearer_token([("authorization", "Basic dXNlcjpwYXNz")])
    with pytest.raises(Unauthenticated, match="longer than"):
        bearer_token([("authorization", "Bearer " + "a" * 20_000)])
    assert bearer_token([("authorization", b"bearer  abc ")]) == "abc"


def test_claims_to_identity() -> None:
    assert identity_from_claims({"sub": "a"}).workflows == ()
    assert identity_from_claims({"sub": "a", "workflows": "wf"}).workflows == ("wf",)
    assert identity_from_claims({"sub": "a", "role": "admin"}).role == ROLE_USER
    with pytest.raises(Unauthenticated):
        identity_from_claims({"sub": ""})


def test_user_and_agent_roles_are_kept_apart() -> None:
    user = Identity("alice", ROLE_USER, ("wf",))
    agent = Identity("pod", ROLE_AGENT, ("wf",))
    with pytest.raises(PermissionDenied, match="not an agent"):
        user.require_agent()
    with pytest.raises(PermissionDenied, match="agents cannot open client sessions"):
        agent.require_user()
    with pytest.raises(PermissionDenied, match="no access"):
        user.require_workflow("other")
    anonymous = asyncio.run(NoAuth().authenticate([]))
    anonymous.require_agent()
    anonymous.require_user()


def test_verified_tokens_are_cached_and_bounded() -> None:
    calls = 0
    auth = JwtAuthenticator(public_key_pem=RSA.public_pem(), cache=TokenCache(size=2, ttl=60))
    original = auth.verify

    async def counting(token: str) -> dict[str, object]:
        nonlocal calls
        calls += 1
        return await original(token)

    auth.verify = counting  # type: ignore[method-assign]
    tokens = [RSA.token(f"user-{i}") for i in range(3)]
    for token in (tokens[0], tokens[0], tokens[1], tokens[2], tokens[0]):
        authenticate(auth, token)
    # tokens[0] verified, then served from the cache, then evicted by the third token and verified again.
    assert calls == 4


def test_cache_never_outlives_the_token() -> None:
    cache = TokenCache(size=10, ttl=60)
    identity = Identity("a")
    cache.put("t", identity, now=100.0, expires=105.0)
    assert cache.get("t", 104.0) is identity
    assert cache.get("t", 106.0) is None
    assert len(cache) == 0


def test_jwks_rs256_and_es256_by_kid(jwks: JwksServer) -> None:
    async def scenario() -> None:
        auth = JwtAuthenticator(jwks=JwksKeys(jwks.url))
        assert (await auth.authenticate(bearer(RSA.token("r")))).subject == "r"
        assert (await auth.authenticate(bearer(EC.token("e")))).subject == "e"
        assert jwks.fetches == 1
        await auth.close()

    asyncio.run(scenario())


def test_jwks_unknown_kid_refetches_at_most_once_per_interval(jwks: JwksServer) -> None:
    async def scenario() -> None:
        keys = JwksKeys(jwks.url, min_refresh_interval=3600)
        auth = JwtAuthenticator(jwks=keys)
        stranger = Signer.rs256(kid="unknown")
        results = await asyncio.gather(
            *(auth.authenticate(bearer(stranger.token())) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, Unauthenticated) and "unknown key" in r.message for r in results)
        assert jwks.fetches == 1
        # A rotated-in key shows up only after the interval; meanwhile still one fetch.
        jwks.keys.append(stranger.jwk())
        with pytest.raises(Unauthenticated):
            await auth.authenticate(bearer(stranger.token()))
        assert jwks.fetches == 1
        await auth.close()

    asyncio.run(scenario())


def test_jwks_a_stale_set_is_refreshed_once_per_interval_while_the_provider_is_down(jwks: JwksServer) -> None:
    now = [0.0]

    async def scenario() -> None:
        keys = JwksKeys(jwks.url, lifespan=300, min_refresh_interval=60, clock=lambda: now[0])
        auth = JwtAuthenticator(jwks=keys)
        assert (await auth.authenticate(bearer(RSA.token("first")))).subject == "first"
        assert jwks.fetches == 1
        jwks.failing = True
        now[0] = 400.0  # the set is stale; every refresh fails from now on
        for n in range(10):  # ten tokens (none cached): the keys they know keep serving
            assert (await auth.authenticate(bearer(RSA.token(f"user{n}")))).subject == f"user{n}"
            await keys.close()  # (the background refresh, if one started, is over)
        assert jwks.fetches == 2, "a failed refresh was tried again for every token"
        now[0] = 470.0  # one interval later: asked again, once
        assert (await auth.authenticate(bearer(RSA.token("later")))).subject == "later"
        await keys.close()
        assert jwks.fetches == 3
        await auth.close()

    asyncio.run(scenario())


def test_jwks_new_key_found_after_rotation(jwks: JwksServer) -> None:
    async def scenario() -> None:
        auth = JwtAuthenticator(jwks=JwksKeys(jwks.url, min_refresh_interval=0))
        assert (await auth.authenticate(bearer(RSA.token()))).subject == "alice"
        rotated = Signer.es256(kid="ec-2")
        jwks.keys = [rotated.jwk()]
        assert (await auth.authenticate(bearer(rotated.token("bob")))).subject == "bob"
        assert jwks.fetches == 2
        await auth.close()

    asyncio.run(scenario())


def test_jwks_unreachable_is_a_clear_refusal() -> None:
    async def scenario() -> None:
        auth = JwtAuthenticator(jwks=JwksKeys("http://127.0.0.1:9/jwks.json", timeout=2))
        with pytest.raises(Unauthenticated, match="could not be fetched"):
            await auth.authenticate(bearer(RSA.token()))
        await auth.close()

    asyncio.run(scenario())


def test_jwks_fetch_does_not_block_the_event_loop(jwks: JwksServer) -> None:
    async def scenario() -> None:
        auth = JwtAuthenticator(jwks=JwksKeys(jwks.url))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await auth.authenticate(bearer(RSA.token()))
        task.cancel()
        assert ticks > 1  # the loop kept running while the keys were fetched
        await auth.close()

    asyncio.run(scenario())


def test_config_refuses_jwt_without_keys_and_short_secrets() -> None:
    with pytest.raises(ValueError, match="needs --jwt-public-key or --jwks-url"):
        RouterConfig(auth="jwt").validate()
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtAuthenticator(hs256_secret="short")
    with pytest.raises(ValueError, match="not a PEM public key"):
        JwtAuthenticator(public_key_pem=b"garbage")
    missing = "/nonexistent/jwt.pem"
    with pytest.raises(ValueError, match=f"^--jwt-public-key {missing} cannot be read: No such file or directory$"):
        JwtAuthenticator.from_config(RouterConfig(auth="jwt", jwt_public_key=missing))
    with pytest.raises(ValueError, match="only allowed on a loopback"):
        RouterConfig(auth="none", host="0.0.0.0").validate()
    RouterConfig(auth="none", host="::1").validate()
    with pytest.raises(ValueError, match="--jwks-cache-ttl must be positive"):
        RouterConfig(auth="jwt", jwks_url="http://127.0.0.1:1/jwks", jwks_cache_ttl=0).validate()


def test_kid_unknown_to_jwks_falls_back_to_the_public_key() -> None:
    server = JwksServer([EC])
    try:

        async def scenario() -> None:
            auth = JwtAuthenticator(public_key_pem=RSA.public_pem(), jwks=JwksKeys(server.url))
            assert (await auth.authenticate(bearer(RSA.token("r")))).subject == "r"
            assert (await auth.authenticate(bearer(EC.token("e")))).subject == "e"
            with pytest.raises(Unauthenticated, match="signature is not valid"):
                await auth.authenticate(bearer(Signer.rs256(kid="rsa-1").token()))
            await auth.close()

        asyncio.run(scenario())
    finally:
        server.close()


# --- OSMO backend tokens (--ws-backend-role) ---------------------------------------------------


def osmo_ctrl_claims(workflow: str = "wf-1", **extra: object) -> dict[str, object]:
    """The verified claims of osmo-ctrl's token (OSMO auth.py create_idtoken_jwt with ctrl_roles): no `sub`."""
    claims: dict[str, object] = {
        "iss": "osmo",
        "aud": "osmo-router",
        "exp": int(time.time()) + 600,
        "unique_name": "alice",
        "roles": ["osmo-user", "osmo-ctrl"],
        "osmo_workflow_id": workflow,
    }
    claims.update(extra)
    return claims


def test_osmo_backend_token_serves_its_own_workflow_only() -> None:
    from osmo_router.router.auth.identity import ROLE_LEGACY_BACKEND
    from osmo_router.router.auth.jwt import LegacyBackendRule

    identity = identity_from_claims(osmo_ctrl_claims(), LegacyBackendRule("osmo-ctrl"))
    assert (identity.subject, identity.role, identity.workflows) == ("alice", ROLE_LEGACY_BACKEND, ("wf-1",))
    with pytest.raises(PermissionDenied):  # gRPC agent services and the placer call this
        identity.require_agent()
    with pytest.raises(PermissionDenied, match="OSMO backend token"):  # every client endpoint
        identity.require_user()
    with pytest.raises(PermissionDenied, match="no access to workflow 'wf-2'"):
        identity.as_legacy_backend("wf-2")
    backend = identity.as_legacy_backend("wf-1")  # the WebSocket backend endpoint only
    assert (backend.role, backend.workflows) == (ROLE_AGENT, ("wf-1",))
    backend.require_agent()
    with pytest.raises(PermissionDenied):
        backend.require_workflow("wf-2")


def test_osmo_backend_rule_needs_the_role_the_issuer_and_a_workflow() -> None:
    from osmo_router.router.auth.jwt import LegacyBackendRule

    rule = LegacyBackendRule("osmo-ctrl", issuer="osmo")
    # A user's OSMO token (user_roles: osmo-user only) is not a backend token: no `sub`, so refused.
    with pytest.raises(Unauthenticated, match="'sub'"):
        identity_from_claims(osmo_ctrl_claims(roles=["osmo-user"]), rule)
    # Another issuer's token with the role is not one either.
    with pytest.raises(Unauthenticated, match="'sub'"):
        identity_from_claims(osmo_ctrl_claims(iss="elsewhere"), rule)
    for workflow in ("", "*", None):
        with pytest.raises(Unauthenticated, match="osmo_workflow_id"):
            identity_from_claims(osmo_ctrl_claims(workflow=workflow), rule)  # type: ignore[arg-type]
    # `workflows` on a backend token widens nothing.
    identity = identity_from_claims(osmo_ctrl_claims(workflows=["*"], sub="ctrl"), rule)
    assert (identity.subject, identity.workflows) == ("ctrl", ("wf-1",))
    # Without the rule, the same token with a `sub` is a user's, limited to its `workflows`.
    assert identity_from_claims(osmo_ctrl_claims(sub="ctrl")).role == ROLE_USER


def test_jwt_authenticator_accepts_osmo_backend_tokens_only_with_the_rule() -> None:
    from osmo_router.router.auth.identity import ROLE_LEGACY_BACKEND
    from osmo_router.router.auth.jwt import LegacyBackendRule

    token = RSA.token(None, **{k: v for k, v in osmo_ctrl_claims().items() if k not in ("aud", "exp")})
    assert refusal(JwtAuthenticator(public_key_pem=RSA.public_pem()), token) == "token has no 'sub' claim"
    auth = JwtAuthenticator(public_key_pem=RSA.public_pem(), legacy_backend=LegacyBackendRule("osmo-ctrl"))
    assert authenticate(auth, token).role == ROLE_LEGACY_BACKEND
    # With the rule, other tokens still need `sub`.
    assert refusal(auth, RSA.token(None, workflows=["wf-1"])) == "token has no 'sub' claim"


def test_ws_backend_role_flags_are_validated() -> None:
    base = {"auth": "jwt", "jwt_public_key": "/k.pem"}
    RouterConfig(**base, ws_backend_role="osmo-ctrl").validate()  # type: ignore[arg-type]
    for bad in (
        {"ws_backend_role": "agent"},
        {"ws_backend_role": "*"},
        {"ws_backend_role": "x", "ws_backend_workflow_claim": ""},
    ):
        with pytest.raises(ValueError, match="ws-backend"):
            RouterConfig(**base, **bad).validate()  # type: ignore[arg-type]
