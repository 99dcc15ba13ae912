"""The client's and agent's TLS flags are checked at start (dial/config.py tls_files_problem), with real files."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from osmo_router.dial.config import DialConfig, tls_files_problem
from osmo_router.dial.options import dial_config
from tests.security_kit import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def _dial(**files: object) -> DialConfig:
    return DialConfig(address="127.0.0.1:1", **files)  # type: ignore[arg-type]


def test_usable_files_and_tls_off_pass(pki: Pki) -> None:
    assert tls_files_problem(_dial(tls_ca=str(pki.ca))) is None
    assert (
        tls_files_problem(_dial(tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))) is None
    )
    assert tls_files_problem(_dial(tls=False, tls_ca="/nonexistent/ca.pem")) is None  # not used without TLS


def test_each_unusable_file_is_named(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (_dial(tls_ca="/nonexistent/ca.pem"), "--tls-ca /nonexistent/ca.pem cannot be read: No such file or directory"),
        (_dial(tls_ca=str(garbage)), f"--tls-ca {garbage} holds no PEM certificate"),
        (_dial(tls_key=str(pki.client_key)), "--tls-key needs --tls-cert"),
        (
            _dial(tls_cert=str(pki.client_cert), tls_key="/nonexistent/k.pem"),
            "--tls-key /nonexistent/k.pem cannot be read",
        ),
        # A key that is not the certificate's: the server's key with the client's certificate.
        (
            _dial(tls_cert=str(pki.client_cert), tls_key=str(pki.server_key)),
            f"--tls-cert {pki.client_cert} with --tls-key {pki.server_key} is not a PEM certificate and its key",
        ),
    ]
    for dial, expected in cases:
        problem = tls_files_problem(dial)
        assert problem is not None and problem.startswith(expected), (dial, problem)


def test_the_cli_turns_a_problem_into_a_usage_error() -> None:
    options = {
        "router_address": "127.0.0.1:1",
        "tls": True,
        "tls_ca": "/nonexistent/ca.pem",
        "tls_cert": None,
        "tls_key": None,
        "tls_server_name": None,
        "token": None,
    }
    with pytest.raises(click.UsageError, match=re.escape("--tls-ca /nonexistent/ca.pem cannot be read")):
        dial_config(options)


def test_a_token_file_that_gives_no_token_is_named_with_what_is_sent(tmp_path: Path) -> None:
    from osmo_router.dial.config import token_file_problem

    token, empty = tmp_path / "token", tmp_path / "empty"
    token.write_text("eyJ.x.y\n")
    empty.write_text("\n")
    assert token_file_problem(_dial(token_file=str(token))) is None
    assert token_file_problem(_dial()) is None
    missing = "/nonexistent/token"
    assert token_file_problem(_dial(token_file=missing)) == (
        f"--token-file {missing} cannot be read (No such file or directory): no token is sent"
    )
    assert token_file_problem(_dial(token_file=str(empty), token="t")) == (
        f"--token-file {empty} is empty: --token is sent instead"
    )


def test_the_routers_unreadable_tls_files_are_named_with_the_right_advice(pki: Pki) -> None:
    """The certificate and key have default paths: their message says how to give them or turn TLS off;
    the client CA is only ever asked for by name: its message says nothing of defaults."""
    from osmo_router.router.config import RouterConfig
    from osmo_router.router.ops.grpc_server import native_tls

    missing_cert = RouterConfig(tls_cert="/nonexistent/tls.crt", tls_key=str(pki.server_key))
    with pytest.raises(ValueError, match=re.escape("TLS is on by default and --tls-cert /nonexistent/tls.crt")):
        native_tls(missing_cert)
    missing_ca = RouterConfig(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca="/nonexistent/ca.pem"
    )
    with pytest.raises(
        ValueError, match="^" + re.escape("--tls-client-ca /nonexistent/ca.pem cannot be read: No such file")
    ):
        native_tls(missing_ca)
