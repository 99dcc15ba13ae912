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


def two_client_cas(directory: Path) -> tuple[CertificateAuthority, dict[str, Path]]:
    """A router's certificate and a client CA file trusting two CAs, "kept" and "removed", each with a
    client certificate, written to `directory`: the kept CA and the files by name."""
    server_ca, kept_ca, removed_ca = (CertificateAuthority.create(name) for name in ("server CA", "kept", "removed"))
    files = {"server_ca.pem": server_ca.pem, "client_ca.pem": kept_ca.pem + removed_ca.pem}
    files["tls.crt"], files["tls.key"] = server_ca.issue("osmo-router", server=True)
    files["kept.crt"], files["kept.key"] = kept_ca.issue("agent-kept", server=False)
    files["removed.crt"], files["removed.key"] = removed_ca.issue("agent-removed", server=False)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return kept_ca, {name: directory / name for name in files}


def ws_answers(port: int, ca: Path, cert: Path, key: Path) -> bool:
    """Whether the WebSocket port answers an HTTP request over TLS with this client certificate."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return tls.recv(16).startswith(b"HTTP/1.1")  # (TLS 1.3: a refused certificate shows here)
    except (ssl.SSLError, ConnectionResetError):
        return False


@pytest.mark.parametrize("server", ["native", "grpcio"])
def test_a_client_ca_removed_from_the_file_is_no_longer_trusted(tmp_path: Path, workflow: str, server: str) -> None:
    """A compromised client CA rotated out of --tls-client-ca stops being trusted without a restart; the
    CA kept in the file still is (before the fix, loading the file again only added to the trusted CAs)."""
    kept_ca, path = two_client_cas(tmp_path)
    router = Router(
        "--tls-cert", str(path["tls.crt"]), "--tls-key", str(path["tls.key"]),
        "--tls-client-ca", str(path["client_ca.pem"]), "--auth=none", "--grpc-server", server,
        "--tls-reload-interval", "0.1s", secure=True,
    )  # fmt: skip
    base = ["--router-address", router.address, "--workflow-id", workflow, "--tls-ca", str(path["server_ca.pem"])]

    def through_grpc(who: str) -> bool:
        result = run_client(
            "exec", *base, "--tls-cert", str(path[f"{who}.crt"]), "--tls-key", str(path[f"{who}.key"]), "--", "true"
        )
        if b"no agent is registered" in result.stderr:
            return True  # past the handshake: the router itself answered
        assert b"does not trust this client certificate" in result.stderr, result.stderr
        return False

    def through_ws(who: str) -> bool:
        return ws_answers(router.ws_port, path["server_ca.pem"], path[f"{who}.crt"], path[f"{who}.key"])

    try:
        assert [through_grpc("kept"), through_grpc("removed")] == [True, True]
        assert [through_ws("kept"), through_ws("removed")] == [True, True]
        replace(path["client_ca.pem"], kept_ca.pem)
        router.wait_for(lambda r: r.get("event") == "tls reloaded", timeout=WAIT)
        assert [through_grpc("kept"), through_grpc("removed")] == [True, False]
        assert [through_ws("kept"), through_ws("removed")] == [True, False]
    finally:
        router.stop()


def answers_resuming(
    port: int, context: ssl.SSLContext, alpn: str, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None, bool]:
    """Whether the port answers a TLS connection made with `context` (its client certificate), offering
    `session` for resumption; the session to resume later, and whether this one was resumed."""
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" if alpn == "http/1.1" else H2_PREFACE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(request)
                answered = len(tls.recv(16)) > 0  # (TLS 1.3: a refused certificate shows here)
                return answered, tls.session, tls.session_reused
    except (ssl.SSLError, ConnectionResetError):
        return False, None, False


#: The HTTP/2 client preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def test_a_session_resumed_from_before_the_reload_is_not_let_in_by_a_removed_ca(tmp_path: Path, workflow: str) -> None:
    """A TLS session of a certificate from a CA since removed from --tls-client-ca is not resumed: the
    ticket from before the reload skipped the certificate check (the session ticket keys are the
    listening context's, which the reload does not replace), so such a client got in for the
    ticket's lifetime (OpenSSL: 2 hours) after the CA was rotated out."""
    kept_ca, path = two_client_cas(tmp_path)
    router = Router(
        "--tls-cert", str(path["tls.crt"]), "--tls-key", str(path["tls.key"]),
        "--tls-client-ca", str(path["client_ca.pem"]), "--auth=none", "--tls-reload-interval", "0.1s",
        secure=True,
    )  # fmt: skip
    ports = {"h2": router.port, "http/1.1": router.ws_port}
    contexts = {}
    for alpn in ports:
        contexts[alpn] = ssl.create_default_context(cafile=str(path["server_ca.pem"]))
        contexts[alpn].load_cert_chain(str(path["removed.crt"]), str(path["removed.key"]))
        contexts[alpn].set_alpn_protocols([alpn])
    try:
        sessions = {}
        for alpn, port in ports.items():
            answered, sessions[alpn], _ = answers_resuming(port, contexts[alpn], alpn, None)
            assert answered, alpn
        replace(path["client_ca.pem"], kept_ca.pem)
        router.wait_for(lambda r: r.get("event") == "tls reloaded", timeout=WAIT)
        for alpn, port in ports.items():
            answered, _, resumed = answers_resuming(port, contexts[alpn], alpn, sessions[alpn])
            assert (alpn, answered, resumed) == (alpn, False, False)
    finally:
        router.stop()
