"""Units of port-forward: SPEC and address parsing, --allow-ports, targets, peers, the data-frame codec."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from osmo_router.agent.forward import parse_port_ranges, port_allowed, target_hosts
from osmo_router.client.binds import LOCALHOST, Bind, parse_address, parse_binds
from osmo_router.client.forward import PortSpec, parse_spec, parse_specs
from osmo_router.io.forwarding import format_peer, parse_peer
from osmo_router.wire.codec import decode_data_message, encode_data_message, fast_deserializer, raw_serializer
from osmo_router.wire.protocol import pb


@pytest.mark.parametrize(
    ("text", "spec"),
    [("8080:80", PortSpec(8080, 80)), ("5432", PortSpec(5432, 5432)), (":443", PortSpec(0, 443))],
)
def test_spec_forms(text: str, spec: PortSpec) -> None:
    assert parse_spec(text) == spec


@pytest.mark.parametrize("text", ["", ":", "abc", "80:", "0", "70000", "1:2:3", "-1:80", "80:0"])
def test_bad_specs_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(text)


def test_a_local_port_given_twice_is_refused_before_anything_listens() -> None:
    assert parse_specs([":80", ":81", "8080:80"]) == [PortSpec(0, 80), PortSpec(0, 81), PortSpec(8080, 80)]
    with pytest.raises(ValueError, match="local port 18007 is given twice"):
        parse_specs(["18007:18001", "18007:18002"])


def test_addresses() -> None:
    assert parse_address("127.0.0.1") == (Bind("127.0.0.1"),)
    assert parse_address("[::1]") == (Bind("::1"),)
    assert parse_address("localhost") == (Bind("127.0.0.1", best_effort=True), Bind("::1", best_effort=True))
    with pytest.raises(ValueError, match="not an IPv4 or IPv6"):
        parse_address("example.com")


def test_comma_separated_addresses_as_kubectl_takes_them() -> None:
    assert parse_binds(["127.0.0.1,::1", "[::1]"]) == [Bind("127.0.0.1"), Bind("::1")]
    assert parse_binds(["127.0.0.2, 127.0.0.3"]) == [Bind("127.0.0.2"), Bind("127.0.0.3")]
    with pytest.raises(ValueError, match="empty entry"):
        parse_binds(["127.0.0.1,"])
    with pytest.raises(ValueError, match="'host' is not an IPv4"):
        parse_binds(["127.0.0.1,host"])


def test_an_address_named_literally_must_bind_even_beside_localhost() -> None:
    assert parse_binds(["localhost"]) == list(LOCALHOST)
    assert parse_binds(["localhost,::1"]) == [Bind("127.0.0.1", best_effort=True), Bind("::1")]
    assert parse_binds(["::1", "localhost"]) == [Bind("::1"), Bind("127.0.0.1", best_effort=True)]


def test_allow_ports() -> None:
    assert port_allowed(1, ())  # no list: every port
    allow = ("8080", "9000-9002,22")
    assert [p for p in (22, 8080, 8999, 9000, 9002, 9003) if port_allowed(p, allow)] == [22, 8080, 9000, 9002]
    for bad in ("x", "0", "9-1", "1-70000", "80-"):
        with pytest.raises(ValueError, match="--allow-ports"):
            parse_port_ranges((bad,))


def test_only_loopback_targets() -> None:
    assert target_hosts("") == ["127.0.0.1", "::1"]
    assert target_hosts("127.0.0.5") == ["127.0.0.5"]
    assert target_hosts("[::1]") == ["::1"]
    assert target_hosts("10.0.0.1") is None
    assert target_hosts("example.com") is None


def test_peer_text_round_trip() -> None:
    assert format_peer(("127.0.0.1", 5353)) == "127.0.0.1:5353"
    assert format_peer(("::1", 5353, 0, 0)) == "[::1]:5353"
    assert parse_peer("[::1]:5353") == ("::1", 5353)
    assert parse_peer("127.0.0.1:9") == ("127.0.0.1", 9)
    with pytest.raises(ValueError):
        parse_peer("nonsense")


@given(st.binary(max_size=70_000))
def test_codec_matches_protobuf(payload: bytes) -> None:
    encoded = encode_data_message(payload)
    assert encoded == pb.ConnectRequest(frame=pb.Frame(data=payload)).SerializeToString()
    assert decode_data_message(encoded) == payload
    message = fast_deserializer(pb.PortForwardResponse)(encoded)
    assert message.WhichOneof("kind") == "frame"
    assert message.frame.WhichOneof("kind") == "data" and message.frame.data == payload


def test_codec_leaves_other_messages_to_protobuf() -> None:
    deserialize = fast_deserializer(pb.PortForwardResponse)
    for message in (
        pb.PortForwardResponse(frame=pb.Frame(half_close=pb.HalfClose())),
        pb.PortForwardResponse(frame=pb.Frame(stderr=b"err")),
        pb.PortForwardResponse(frame=pb.Frame(datagram=pb.Datagram(payload=b"d", peer="p"))),
        pb.PortForwardResponse(end=pb.SessionEnd()),
        pb.PortForwardResponse(ready=pb.SessionReady(session_key="k")),
    ):
        raw = message.SerializeToString()
        assert decode_data_message(raw) is None
        assert deserialize(raw) == message
    # Truncated or padded data messages are not taken for data frames.
    good = encode_data_message(b"abc")
    for broken in (good[:-1], good + b"x", good[:2], b"\x12\xff"):
        assert decode_data_message(broken) is None
    assert raw_serializer(b"raw") == b"raw"
    assert raw_serializer(pb.PortForwardRequest(frame=pb.Frame(data=b"x"))) == encode_data_message(b"x")


def test_a_protocol_suffix_is_refused_with_the_option_named() -> None:
    with pytest.raises(ValueError, match="--protocol"):
        parse_spec("5353:53/udp")


def test_udp_target_host_follows_the_containers_socket_table(tmp_path: Path) -> None:
    from osmo_router.agent.forward_udp import udp_target_host

    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"

    def tables(v4: list[str], v6: list[str]) -> str:
        (tmp_path / "udp").write_text(header + "".join(f"   0: {a} 00000000:0000 07 0 0 0\n" for a in v4))
        (tmp_path / "udp6").write_text(header + "".join(f"   0: {a} {'0' * 32}:0000 07 0 0 0\n" for a in v6))
        return str(tmp_path)

    both = ["127.0.0.1", "::1"]
    assert udp_target_host(both, 5353, tables([], ["00000000000000000000000001000000:14E9"])) == "::1"
    assert udp_target_host(both, 5353, tables(["0100007F:14E9"], [f"{'0' * 32}:14E9"])) == "127.0.0.1"
    assert udp_target_host(both, 5353, tables(["00000000:14E9"], [])) == "127.0.0.1"  # 0.0.0.0
    assert udp_target_host(both, 5353, tables([], [f"{'0' * 32}:14E9"])) == "::1"  # [::]
    assert udp_target_host(both, 5353, tables(["0100007F:14EA"], [])) == "127.0.0.1"  # nobody: the first
    assert udp_target_host(both, 5353, str(tmp_path / "missing")) == "127.0.0.1"
    assert udp_target_host(["::1"], 5353, tables(["0100007F:14E9"], [])) == "::1"  # one host named: that one
