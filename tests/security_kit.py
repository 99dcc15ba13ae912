"""Test material made on the spot: certificate authorities, certificates, signing keys and tokens.

Nothing here is a fixture of the product: the tests generate real X.509 certificates and real
signed JWTs with `cryptography` and PyJWT, exactly as an operator's PKI and identity provider would.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness import Router

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: PrivateKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a private key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> CertificateAuthority:
        """A fresh CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        valid: tuple[datetime.timedelta, datetime.timedelta] | None = None,
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server (127.0.0.1, ::1, localhost) or a client.

        `valid`: (not before, not after) from now; by default from 5 minutes ago to a day from now.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_before, not_after = valid or (datetime.timedelta(minutes=-5), datetime.timedelta(days=1))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + not_before)
            .not_valid_after(now + not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    @property
    def pem(self) -> bytes:
        """The CA certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


def loopback_tls(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for "localhost" (files in `directory`) and a client context
    that trusts its new CA: TLS between two ends of one test over loopback."""
    ca = CertificateAuthority.create("test-ca")
    cert, key = ca.issue("localhost", server=True)
    (directory / "cert.pem").write_bytes(cert)
    (directory / "key.pem").write_bytes(key)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return server_tls, ssl.create_default_context(cadata=ca.pem.decode())


@dataclass
class Pki:
    """Files on disk: a trusted CA with a server certificate, a client certificate, and an untrusted CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    rogue_server_cert: Path
    rogue_server_key: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        """Generate everything into `directory`."""
        trusted = CertificateAuthority.create("osmo test CA")
        untrusted = CertificateAuthority.create("some other CA")
        files: dict[str, bytes] = {"ca": trusted.pem, "other_ca": untrusted.pem}
        files["server_cert"], files["server_key"] = trusted.issue("osmo-router", server=True)
        files["client_cert"], files["client_key"] = trusted.issue("agent-1", server=False)
        files["rogue_server_cert"], files["rogue_server_key"] = untrusted.issue("osmo-router", server=True)
        paths = {}
        for name, data in files.items():
            path = directory / f"{name}.pem"
            path.write_bytes(data)
            paths[name] = path
        return cls(**paths)


@dataclass
class Signer:
    """A token issuer: a private key, its algorithm and key id."""

    algorithm: str
    key: PrivateKey | bytes
    kid: str = ""

    @classmethod
    def rs256(cls, kid: str = "rsa-1") -> Signer:
        """A fresh RSA-2048 signer."""
        return cls("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048), kid)

    @classmethod
    def es256(cls, kid: str = "ec-1") -> Signer:
        """A fresh P-256 signer."""
        return cls("ES256", ec.generate_private_key(ec.SECP256R1()), kid)

    def public_pem(self) -> bytes:
        """The verification key as PEM."""
        assert not isinstance(self.key, bytes)
        return public_pem(self.key)

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK (for a JWKS document)."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            text = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key())
        else:
            assert isinstance(self.key, ec.EllipticCurvePrivateKey)
            text = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key())
        jwk: dict[str, Any] = json.loads(text)
        jwk.update(kid=self.kid, alg=self.algorithm, use="sig")
        return jwk

    def token(
        self,
        sub: str | None = "alice",
        *,
        workflows: Any = None,
        role: str | None = None,
        aud: str | None = "osmo-router",
        ttl: float = 3600.0,
        **extra: Any,
    ) -> str:
        """A signed token; pass ttl < 0 for an expired one, aud=None (sub=None) to leave `aud` (`sub`) out."""
        claims: dict[str, Any] = {"exp": int(time.time() + ttl), "iat": int(time.time())}
        if sub is not None:
            claims["sub"] = sub
        if aud is not None:
            claims["aud"] = aud
        if workflows is not None:
            claims["workflows"] = workflows
        if role is not None:
            claims["role"] = role
        claims.update(extra)
        headers = {"kid": self.kid} if self.kid else None
        return jwt.encode(claims, self.key, algorithm=self.algorithm, headers=headers)


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 (a thread), counting how often it was fetched."""

    def __init__(self, signers: list[Signer]) -> None:
        self.keys = [s.jwk() for s in signers]
        self.fetches = 0
        #: Answer 503 (an identity provider that is down) while set.
        self.failing = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                if owner.failing:
                    self.send_error(503)
                    return
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def jwt_router(tmp_path: Path, signer: Signer, *flags: str) -> Router:
    """A plaintext loopback router taking `signer`'s JWTs (the public key written to tmp_path/jwt.pem)."""
    key = tmp_path / "jwt.pem"
    key.write_bytes(signer.public_pem())
    return Router("--tls-enabled=false", "--auth=jwt", "--jwt-public-key", str(key), *flags, secure=True)
