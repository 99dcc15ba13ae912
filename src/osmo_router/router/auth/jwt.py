"""JWT bearer-token authentication: every stream carries `authorization: Bearer <token>`.

Accepted tokens are RS256 or ES256, verified with the key of `--jwt-public-key` (a PEM public key or
certificate) or with the key named by the token's `kid` at `--jwks-url`; HS256 only with the
development flag `--jwt-hs256-secret`. Each token must carry `exp` and `sub` and name this router in
`aud`; clocks may disagree by LEEWAY seconds. The algorithm is taken from the trusted key, never
from the token alone, so a token cannot pick a weaker check ("none", HS256 with a public key).

Claims become an Identity: `sub`, `workflows` (ids the bearer may reach, `["*"]` for all; missing
means none), `role` (`agent` for agents, `service` for orchestrators calling RouterControlService, anything else
is a user). Verified tokens are cached by
their text for a short while, bounded in size, so a stream costs one dictionary lookup.

With `--ws-backend-role R` (a `LegacyBackendRule`), a token whose `roles` list (or `role`) holds R,
and whose `iss` is `--ws-backend-issuer` when that is set, is an OSMO backend's workflow token
(OSMO's `create_idtoken_jwt` with `ctrl_roles`, e.g. `["osmo-user", "osmo-ctrl"]`): it names its
one workflow in `--ws-backend-workflow-claim` (`osmo_workflow_id`), may lack `sub` (its subject is
then `unique_name`), and becomes a ROLE_LEGACY_BACKEND identity for that workflow alone, which only
the WebSocket backend endpoint accepts (identity.py `as_legacy_backend`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import exceptions as jwt_errors

from osmo_router.router.auth.identity import ROLE_AGENT, ROLE_LEGACY_BACKEND, ROLE_SERVICE, ROLE_USER, Identity
from osmo_router.router.auth.jwks import JwksKeys
from osmo_router.router.config import RouterConfig
from osmo_router.wire.errors import Unauthenticated
from osmo_router.wire.protocol import AUTHORIZATION_HEADER

#: Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
LEEWAY = 30.0
#: How long a verified token is served from the cache (never past its `exp`).
CACHE_TTL = 60.0
#: Most tokens kept in the cache.
CACHE_SIZE = 4096
#: Longest token considered at all (bounds parsing work and cache memory).
MAX_TOKEN_LENGTH = 16 * 1024
#: Shortest HS256 secret accepted (RFC 7518: a key at least as long as the hash).
MIN_HS256_SECRET = 32


def load_public_key(pem: bytes) -> tuple[str, Any]:
    """(algorithm, key) for a PEM public key or certificate: RSA gives RS256, EC P-256 gives ES256."""
    try:
        if b"BEGIN CERTIFICATE" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as err:
        raise ValueError(f"--jwt-public-key is not a PEM public key or certificate: {err}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ValueError("--jwt-public-key must be an RSA key (RS256) or an EC P-256 key (ES256)")


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The token of the call's `authorization: Bearer T` metadata; raises Unauthenticated without one."""
    for key, value in metadata:
        if key != AUTHORIZATION_HEADER:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata is not a bearer token ('Bearer <token>')")
        token = token.strip()
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(f"bearer token longer than {MAX_TOKEN_LENGTH} characters")
        return token
    raise Unauthenticated("no bearer token: pass --token or set OSMO_TOKEN")


@dataclass(frozen=True)
class LegacyBackendRule:
    """Which verified tokens are OSMO backends' workflow tokens (see the module docstring)."""

    #: The role value that marks them, in the `roles` list claim or the `role` claim.
    role: str
    #: The claim that names the one workflow the token serves.
    workflow_claim: str = "osmo_workflow_id"
    #: When set, only tokens of this issuer (`iss`) are backend tokens.
    issuer: str | None = None

    def matches(self, claims: dict[str, Any]) -> bool:
        """Whether verified claims are a backend token under this rule."""
        roles = claims.get("roles")
        marked = claims.get("role") == self.role or (isinstance(roles, list) and self.role in roles)
        return marked and (self.issuer is None or claims.get("iss") == self.issuer)

    def identity(self, claims: dict[str, Any]) -> Identity:
        """The ROLE_LEGACY_BACKEND identity of a matching token; Unauthenticated when it names no workflow."""
        workflow = claims.get(self.workflow_claim)
        if not isinstance(workflow, str) or not workflow or workflow == "*":
            raise Unauthenticated(f"OSMO backend token has no {self.workflow_claim!r} claim naming its workflow")
        subject = claims.get("sub") or claims.get("unique_name")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("OSMO backend token has neither a 'sub' nor a 'unique_name' claim")
        return Identity(subject, ROLE_LEGACY_BACKEND, (workflow,), claims, expires=_expires(claims))


def identity_from_claims(claims: dict[str, Any], legacy_backend: LegacyBackendRule | None = None) -> Identity:
    """The Identity that verified claims describe; raises Unauthenticated on malformed claims."""
    if legacy_backend is not None and legacy_backend.matches(claims):
        return legacy_backend.identity(claims)
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token has no 'sub' claim")
    workflows = claims.get("workflows", [])
    if isinstance(workflows, str):
        workflows = [workflows]
    if not isinstance(workflows, list) or not all(isinstance(w, str) for w in workflows):
        raise Unauthenticated("token's 'workflows' claim must be a list of workflow ids")
    raw_role = claims.get("role")
    role = ROLE_AGENT if raw_role == ROLE_AGENT else ROLE_SERVICE if raw_role == ROLE_SERVICE else ROLE_USER
    task, instance = claims.get("task"), claims.get("agent_id")
    if task is not None and not isinstance(task, str):
        raise Unauthenticated("token's 'task' claim must be a task name")
    if instance is not None and not isinstance(instance, str):
        raise Unauthenticated("token's 'agent_id' claim must be an agent id")
    return Identity(subject, role, tuple(workflows), claims, task=task, instance=instance, expires=_expires(claims))


def _expires(claims: dict[str, Any]) -> float | None:
    """The `exp` claim as a Unix time; Unauthenticated when it is there but not a number.

    PyJWT checks a string `exp` ("1764000000") as int(exp) and lets it through, but an Identity
    without `expires` would keep a Register stream past its token's end (auth/recheck.py): such a
    token is refused, as RFC 7519 makes `exp` a NumericDate.
    """
    exp = claims.get("exp")
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise Unauthenticated("token's 'exp' claim must be a number (seconds since the epoch)")
    return float(exp)


def _describe(err: jwt_errors.PyJWTError, audience: str) -> str:
    """A clear reason for a refused token."""
    if isinstance(err, jwt_errors.ExpiredSignatureError):
        return "token expired"
    if isinstance(err, jwt_errors.InvalidAudienceError):
        return f"token audience is not {audience!r}"
    if isinstance(err, jwt_errors.MissingRequiredClaimError):
        return f"token has no {err.claim!r} claim"
    if isinstance(err, jwt_errors.InvalidSignatureError):
        return "token signature is not valid (signed by a key this router does not trust)"
    if isinstance(err, jwt_errors.ImmatureSignatureError):
        return "token is not valid yet"
    if isinstance(err, jwt_errors.InvalidKeyError | jwt_errors.InvalidAlgorithmError):
        return "token algorithm does not match the router's key"
    if isinstance(err, jwt_errors.DecodeError):
        return "malformed token"
    return f"invalid token: {err}"


def _matching(entry: tuple[str, Any], algorithm: str) -> Any:
    """The key of a trusted (algorithm, key) pair, if the token claims that algorithm."""
    key_algorithm, key = entry
    if key_algorithm != algorithm:
        raise Unauthenticated(f"token algorithm {algorithm} does not match the router's key ({key_algorithm})")
    return key


class TokenCache:
    """Verified tokens by their text: least recently used out first, entries live at most `ttl`."""

    def __init__(self, size: int = CACHE_SIZE, ttl: float = CACHE_TTL) -> None:
        self._size = size
        self._ttl = ttl
        self._entries: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float) -> Identity | None:
        """The cached identity, if the entry has not expired."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        identity, valid_until = entry
        if now >= valid_until:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return identity

    def put(self, token: str, identity: Identity, now: float, expires: float) -> None:
        """Remember a verified token until min(now + ttl, its expiry)."""
        self._entries[token] = (identity, min(now + self._ttl, expires))
        self._entries.move_to_end(token)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class JwtAuthenticator:
    """Verifies bearer tokens (see the module docstring for what is accepted)."""

    def __init__(
        self,
        *,
        audience: str = "osmo-router",
        public_key_pem: bytes | None = None,
        jwks: JwksKeys | None = None,
        hs256_secret: str | None = None,
        leeway: float = LEEWAY,
        cache: TokenCache | None = None,
        clock: Callable[[], float] = time.time,
        legacy_backend: LegacyBackendRule | None = None,
    ) -> None:
        if public_key_pem is None and jwks is None and hs256_secret is None:
            raise ValueError(
                "--auth=jwt needs --jwt-public-key or --jwks-url (or, for development, --jwt-hs256-secret)"
            )
        if hs256_secret is not None and len(hs256_secret.encode()) < MIN_HS256_SECRET:
            raise ValueError(f"--jwt-hs256-secret must be at least {MIN_HS256_SECRET} bytes")
        self.audience = audience
        self._static = load_public_key(public_key_pem) if public_key_pem is not None else None
        self._jwks = jwks
        self._hs256_secret = hs256_secret
        self._leeway = leeway
        self._cache = cache if cache is not None else TokenCache()
        self._clock = clock
        self._legacy_backend = legacy_backend

    @classmethod
    def from_config(cls, config: RouterConfig) -> JwtAuthenticator:
        """The authenticator for --jwt-public-key / --jwks-url / --jwt-hs256-secret / --jwt-audience."""
        pem = None
        if config.jwt_public_key:
            try:
                with open(config.jwt_public_key, "rb") as f:
                    pem = f.read()
            except OSError as err:
                raise ValueError(f"--jwt-public-key {config.jwt_public_key} cannot be read: {err.strerror}") from None
        return cls(
            audience=config.jwt_audience,
            public_key_pem=pem,
            jwks=JwksKeys.for_ttl(config.jwks_url, config.jwks_cache_ttl) if config.jwks_url else None,
            hs256_secret=config.jwt_hs256_secret,
            legacy_backend=LegacyBackendRule(
                config.ws_backend_role, config.ws_backend_workflow_claim, config.ws_backend_issuer or None
            )
            if config.ws_backend_role
            else None,
        )

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The identity of the call's bearer token; raises Unauthenticated with the reason otherwise."""
        token = bearer_token(metadata)
        now = self._clock()
        cached = self._cache.get(token, now)
        if cached is not None:
            return cached
        claims = await self.verify(token)
        identity = identity_from_claims(claims, self._legacy_backend)
        self._cache.put(token, identity, now, float(claims["exp"]) + self._leeway)
        return identity

    async def revalidate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        """The identity of the call's bearer token verified afresh: keys removed from the JWKS now fail it."""
        return identity_from_claims(await self.verify(bearer_token(metadata)), self._legacy_backend)

    async def verify(self, token: str) -> dict[str, Any]:
        """The verified claims of a token; raises Unauthenticated with the reason otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt_errors.PyJWTError:
            raise Unauthenticated("malformed token") from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        key = await self._key_for(algorithm, kid if isinstance(kid, str) else None)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                audience=self.audience,
                leeway=self._leeway,
                # OSMO's backend tokens carry no `sub` (identity_from_claims requires it of the others).
                options={"require": ["exp", "aud"] if self._legacy_backend else ["exp", "sub", "aud"]},
            )
        except jwt_errors.PyJWTError as err:
            raise Unauthenticated(_describe(err, self.audience)) from None
        return claims

    async def _key_for(self, algorithm: object, kid: str | None) -> Any:
        if algorithm == "HS256":
            if self._hs256_secret is None:
                raise Unauthenticated("HS256 tokens are not accepted (use RS256 or ES256)")
            return self._hs256_secret
        if algorithm not in ("RS256", "ES256"):
            raise Unauthenticated(f"token algorithm {str(algorithm)[:16]!r} is not accepted (use RS256 or ES256)")
        if self._jwks is None and self._static is None:
            raise Unauthenticated(f"{algorithm} tokens are not accepted (no --jwt-public-key or --jwks-url)")
        if self._jwks is not None and kid:
            entry = await self._jwks.find(kid)
            # A kid the JWKS does not list falls back to --jwt-public-key when there is one.
            if entry is None and self._static is None:
                raise self._jwks.missing(kid)
            if entry is not None:
                return _matching(entry, str(algorithm))
        if self._static is not None:
            return _matching(self._static, str(algorithm))
        raise Unauthenticated("token has no key id ('kid') to look its key up with")

    async def close(self) -> None:
        """Let a key refresh in flight finish."""
        if self._jwks is not None:
            await self._jwks.close()
