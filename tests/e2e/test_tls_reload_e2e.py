"""A renewed certificate is served without a restart (router/ops/tls_reload.py).

cert-manager renews a Kubernetes TLS secret in place; a router that loaded its files once served the
old certificate until restarted, and once that expired every client and agent failed. Here the files
are replaced under a running router (real certificates from a test CA): a pair that does not load yet
(the new certificate beside the old key) is reported and the old one kept; the whole new pair is then
served on the gRPC and WebSocket ports to new handshakes, and a client trusting the CA still gets in.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import pytest

from tests.harness import Router, run_client
from tests.security_kit import CertificateAuthority

WAIT = 30.0


def served_certificate(port: int) -> bytes:
    """The DER certificate a TLS handshake on a loopback port gets (not verified: it is only read)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def replace(path: Path, data: bytes) -> None:
    """Write a file as a secret volume update does: a new file moved over the old one."""
    temporary = path.with_suffix(".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.mark.parametrize("server", ["native", "grpcio"])
def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path, workflow: str, server: str) -> None:
    ca = CertificateAuthority.create("osmo test CA")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    old_cert, old_key = ca.issue("osmo-router", server=True)
    new_cert, new_key = ca.issue("osmo-router", server=True)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(old_cert)
    key.write_bytes(old_key)
    router = Router(
        "--tls-cert", str(cert), "--tls-key", str(key), "--auth=none", "--grpc-server", server,
        "--tls-reload-interval", "0.1s", secure=True,
    )  # fmt: skip
    try:
        assert served_certificate(router.port) == der(old_cert)
        assert served_certificate(router.ws_port) == der(old_cert)
        # The new certificate lands before its key: it does not load with the old key, and is not served.
        replace(cert, new_cert)
        router.wait_for(lambda r: r.get("event") == "tls reload failed", timeout=WAIT)
        assert served_certificate(router.port) == der(old_cert)
        replace(key, new_key)
        router.wait_for(lambda r: r.get("event") == "tls reloaded", timeout=WAIT)
        assert served_certificate(router.ws_port) == der(new_cert)
        assert served_certificate(router.port) == der(new_cert)  # (grpcio: gRPC core asks at this handshake)
        args = ["--router-address", router.address, "--workflow-id", workflow, "--tls-ca", str(tmp_path / "ca.pem")]
        # A client that verifies against the CA gets through the handshake: the router itself answers.
        result = run_client("sessions", *args)
        assert b"no agent is registered" in result.stderr, result.stderr
    finally:
        router.stop()
