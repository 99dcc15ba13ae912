"""OSMO's framing inside the old protocol (wsproto helpers) and the new CLI's `--legacy-backend` path mapping."""

from __future__ import annotations

import json

import click
import pytest

from osmo_router.client.rsync import legacy_module_path, plan_paths
from osmo_router.wire.errors import InvalidArgument
from osmo_router.wire.wsproto import (
    CONNECTION_KEY_PREFIX,
    VEOF,
    connection_key,
    control_message,
    parse_control_message,
    parse_udp_message,
    terminal_eof,
    udp_message,
)


def test_control_message_is_one_json_object() -> None:
    key = connection_key()
    assert key.startswith(CONNECTION_KEY_PREFIX) and len(key) == len(CONNECTION_KEY_PREFIX) + 32
    message = control_message(key, "lb=1")
    assert json.loads(message) == {"key": key, "cookie": "lb=1"}
    assert parse_control_message(message) == (key, "lb=1", "tcp")
    assert parse_control_message(b'{"key": "k", "cookie": "", "type": "ws"}') == ("k", "", "ws")


@pytest.mark.parametrize(
    "data",
    [b"", b'{"key": "a", "cookie": ""}{"key": "b", "cookie": ""}', b"[1]", b'{"cookie": ""}', b"\xff"],
    ids=["empty", "two-objects", "not-an-object", "no-key", "garbage"],
)
def test_control_message_as_strict_as_osmo_ctrl(data: bytes) -> None:
    """osmo-ctrl's json.Unmarshal fails on these, and the control channel ends there."""
    with pytest.raises(InvalidArgument):
        parse_control_message(data)


def test_udp_message_round_trip_and_limits() -> None:
    message = udp_message(b"payload", ("10.1.2.3", 5353))
    assert message[:6] == bytes([10, 1, 2, 3]) + (5353).to_bytes(2, "big")
    assert parse_udp_message(message) == (b"payload", ("10.1.2.3", 5353))
    assert parse_udp_message(udp_message(b"", ("127.0.0.1", 1))) == (b"", ("127.0.0.1", 1))
    with pytest.raises(InvalidArgument, match="IPv4"):
        udp_message(b"x", ("::1", 53))
    with pytest.raises(InvalidArgument, match="6-byte header"):
        parse_udp_message(b"\x7f\x00\x00")


@pytest.mark.parametrize(
    ("sent_any", "last", "eof"),
    [(False, None, VEOF), (True, ord("\n"), VEOF), (True, ord("\r"), VEOF), (True, ord("x"), VEOF + VEOF)],
)
def test_terminal_eof(sent_any: bool, last: int | None, eof: bytes) -> None:
    assert terminal_eof(sent_any, last) == eof


@pytest.mark.parametrize(
    ("remote", "module_path"),
    [
        ("/osmo/run/workspace", "osmo/"),
        ("/osmo/run/workspace/", "osmo/"),
        ("/osmo/run/workspace/data/", "osmo/data/"),
        ("/osmo/run/workspace/a/../b", "osmo/b"),
        ("data", "osmo/data"),
        ("data/", "osmo/data/"),
        ("", "osmo/"),
    ],
)
def test_legacy_module_path(remote: str, module_path: str) -> None:
    assert legacy_module_path(remote) == module_path


@pytest.mark.parametrize("remote", ["/etc", "/osmo/run/workspace2/x", "/osmo/run"])
def test_legacy_module_path_outside_the_module(remote: str) -> None:
    with pytest.raises(click.UsageError, match="outside module 'osmo'"):
        legacy_module_path(remote)


def test_plan_paths_legacy_uses_daemon_syntax() -> None:
    assert plan_paths(["src/", ":/osmo/run/workspace/data/"], legacy=True) == ["src/", "osmo::osmo/data/"]
    assert plan_paths([":out", "dst/"], legacy=True) == ["osmo::osmo/out", "dst/"]
    assert plan_paths(["src/", ":/tmp/x/"]) == ["src/", "osmo:/tmp/x/"]


def test_exec_env_travels_as_repeated_query_parameters() -> None:
    from multidict import MultiDict

    from osmo_router.router.ws.init import _env
    from osmo_router.wire.protocol import pb
    from osmo_router.wire.wsproto import client_query

    init = pb.ExecInit(command=["env"], env={"A": "1", "B": "x=y"}, workdir="/w d")
    query = MultiDict(client_query(init, want_exit=True))
    assert _env(query) == {"A": "1", "B": "x=y"}
    assert query["cwd"] == "/w d"
    with pytest.raises(InvalidArgument, match="is not NAME=VALUE"):
        _env(MultiDict([("env", "novalue")]))


def test_a_size_message_nested_past_the_json_parsers_depth_is_an_invalid_argument() -> None:
    from osmo_router.wire.errors import InvalidArgument
    from osmo_router.wire.wsproto import parse_size

    with pytest.raises(InvalidArgument, match="expected a terminal size"):
        parse_size(b"[" * 1000)  # under the 1 KiB cap of a size message; RecursionError before


def test_stderr_messages_are_base64_text_in_bounded_chunks_and_come_back_whole() -> None:
    from osmo_router.wire.wsproto import STDERR_CHUNK, stderr_frame, stderr_messages

    data = bytes(range(256)) * (2 * STDERR_CHUNK // 256 + 3)  # every byte value, not UTF-8; three chunks
    texts = list(stderr_messages(data))
    assert len(texts) == 3
    assert all(text.isascii() and len(text) <= 4 * STDERR_CHUNK // 3 for text in texts)
    assert b"".join(stderr_frame(text).stderr for text in texts) == data
    assert list(stderr_messages(b"")) == []


@pytest.mark.parametrize("text", ["not base64!", "abc", "é" * 4])
def test_a_stderr_message_that_is_not_base64_is_an_invalid_argument(text: str) -> None:
    from osmo_router.wire.wsproto import stderr_frame

    with pytest.raises(InvalidArgument, match="a stderr message must be base64"):
        stderr_frame(text)


def test_our_client_offers_stderr_apart_for_exec_and_rsync_only() -> None:
    from osmo_router.wire.protocol import pb
    from osmo_router.wire.wsproto import STDERR_SUBPROTOCOL, client_protocols

    for init in (pb.ExecInit(command=["true"]), pb.RsyncInit(server_args=["--server"])):
        assert client_protocols(init) == (STDERR_SUBPROTOCOL,)
    assert client_protocols(pb.PortForwardInit(remote_port=80)) == ()
