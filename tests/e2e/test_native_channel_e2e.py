"""The native client channel (--grpc-channel native, h2/channel.py) end to end: a real client and agent on it,
through the router's grpc.aio server and its native server, plaintext and TLS; errors as with grpcio."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forward_servers import recv_exactly, start_forward
from tests.harness import AgentProc, Router, run_client
from tests.security_kit import CertificateAuthority, Pki

NATIVE = {"OSMO_GRPC_CHANNEL": "native"}


@pytest.fixture(params=["grpcio", "native"])
def router(request: pytest.FixtureRequest) -> Iterator[Router]:
    """The router with the given gRPC server."""
    proc = Router("--grpc-server", request.param)
    yield proc
    proc.stop()


@pytest.fixture
def native_agent(router: Router, workflow: str) -> Iterator[AgentProc]:
    """An agent on the native channel."""
    proc = AgentProc(router.address, workflow, env=NATIVE)
    yield proc
    proc.stop()


def native_args(router: Router, workflow: str) -> list[str]:
    return ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", "--grpc-channel", "native"]


def test_exec_both_ends_native(native_agent: AgentProc, router: Router, workflow: str) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB, crosses many windows and frames
    script = "cat; echo to-err >&2; exit 3"
    result = run_client("exec", *native_args(router, workflow), "--", "sh", "-c", script, input=blob)
    assert result.returncode == 3, result.stderr
    assert result.stdout == blob
    assert result.stderr == b"to-err\n"


def test_port_forward_both_ends_native(native_agent: AgentProc, router: Router, workflow: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        proc, (local,) = start_forward(native_args(router, workflow), f":{port}")
        try:
            with socket.create_connection(("127.0.0.1", local), timeout=30) as conn:
                served, _ = target.accept()
                with served:
                    served.settimeout(30)
                    conn.sendall(b"ping through h2")
                    assert recv_exactly(served, 15) == b"ping through h2"
                    served.sendall(b"pong")
                    assert recv_exactly(conn, 4) == b"pong"
        finally:
            proc.stop()


def test_a_refusal_reads_as_with_grpcio(router: Router) -> None:
    """No agent for the workflow: the router's status reaches the user the same way on both channels."""
    base = ["--router-address", router.address, "--workflow-id", "wf-nobody-home", "--tls=false"]
    base += ["--connect-timeout", "2"]
    native = run_client("exec", *base, "--grpc-channel", "native", "--", "true")
    grpcio = run_client("exec", *base, "--grpc-channel", "grpcio", "--", "true")
    assert native.returncode == grpcio.returncode != 0
    assert native.stderr == grpcio.stderr, (native.stderr, grpcio.stderr)


@pytest.mark.parametrize(
    ("valid", "said"),
    [
        ((datetime.timedelta(days=-2), datetime.timedelta(days=-1)), b"the router's certificate has expired"),
        ((datetime.timedelta(days=1), datetime.timedelta(days=2)), b"the router's certificate is not valid yet"),
    ],
)
def test_a_router_certificate_out_of_its_dates_is_named_as_such(
    tmp_path: Path, workflow: str, valid: tuple[datetime.timedelta, datetime.timedelta], said: bytes
) -> None:
    """A certificate of the trusted CA that expired (renewal failed) is not "does not chain to --tls-ca"."""
    ca = CertificateAuthority.create("osmo test CA")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    cert, key = ca.issue("osmo-router", server=True, valid=valid)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    router = Router(
        "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"), "--auth=none", secure=True
    )
    try:
        args = ["--router-address", router.address, "--workflow-id", workflow, "--tls-ca", str(tmp_path / "ca.pem")]
        for channel in ("native", "grpcio"):
            result = run_client("exec", *args, "--grpc-channel", channel, "--", "true")
            assert result.returncode == 255, (channel, result.stderr)
            assert said in result.stderr, (channel, result.stderr)
            assert b"does not chain" not in result.stderr, (channel, result.stderr)
    finally:
        router.stop()


def test_tls_with_the_ca_and_server_name(tmp_path: Path, workflow: str) -> None:
    pki = Pki.create(tmp_path)
    router = Router("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--auth=none", secure=True)
    try:
        tls = ["--tls-ca", str(pki.ca), "--tls-server-name", "localhost"]
        agent = AgentProc(router.address, workflow, *tls, tls=True, env=NATIVE)
        try:
            args = ["--router-address", router.address, "--workflow-id", workflow, *tls, "--grpc-channel", "native"]
            result = run_client("exec", *args, "--", "echo", "over tls")
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"over tls\n"
            system_store = ["--router-address", router.address, "--workflow-id", workflow, "--grpc-channel", "native"]
            untrusted = run_client("exec", *system_store, "--", "true")
            assert untrusted.returncode != 0
            assert b"certificate not trusted" in untrusted.stderr
            # A name the certificate does not hold is named as such, by both channels (Python's ssl words it as
            # a failed verification: the native channel said "certificate not trusted ... --tls-ca").
            misnamed = ["--router-address", router.address, "--workflow-id", workflow, "--tls-ca", str(pki.ca)]
            misnamed += ["--tls-server-name", "wrong.example"]
            for channel in ("native", "grpcio"):
                wrong = run_client("exec", *misnamed, "--grpc-channel", channel, "--", "true")
                assert wrong.returncode == 255, (channel, wrong.stderr)
                assert b"certificate does not name wrong.example" in wrong.stderr, (channel, wrong.stderr)
        finally:
            agent.stop()
    finally:
        router.stop()
