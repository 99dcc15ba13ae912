"""The peer layer without processes: wire identity of the peer messages, peer metadata, scale-out config."""

from __future__ import annotations

import pytest

from osmo_router.router.auth.identity import Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.scaleout.peers import PEER_IDENTITY_HEADER, peer_identity, peer_metadata
from osmo_router.wire.codec import ENCODED_HALF_CLOSE, ENCODED_SESSION_END
from osmo_router.wire.errors import InvalidArgument, Unauthenticated
from osmo_router.wire.protocol import pb

PAIRS = [
    (pb.ExecRequest, pb.RouterPeerServiceExecRequest),
    (pb.ExecResponse, pb.RouterPeerServiceExecResponse),
    (pb.PortForwardRequest, pb.RouterPeerServicePortForwardRequest),
    (pb.PortForwardResponse, pb.RouterPeerServicePortForwardResponse),
    (pb.RsyncRequest, pb.RouterPeerServiceRsyncRequest),
    (pb.RsyncResponse, pb.RouterPeerServiceRsyncResponse),
    (pb.ConnectRequest, pb.RouterPeerServiceConnectRequest),
    (pb.ConnectResponse, pb.RouterPeerServiceConnectResponse),
]


@pytest.mark.parametrize(("public", "peer"), PAIRS)
def test_peer_messages_have_the_public_wire_layout(public: type, peer: type) -> None:
    """The relay forwards encoded messages unchanged: every field must mean the same on both services."""
    assert _layout(public) == _layout(peer)
    frame = public(frame=pb.Frame(data=b"x")).SerializeToString()
    assert peer.FromString(frame).SerializeToString() == frame


def _layout(message: type) -> set[tuple[object, ...]]:
    return {
        (f.number, f.name, f.type, f.message_type.full_name if f.message_type else None)
        for f in message.DESCRIPTOR.fields  # type: ignore[attr-defined]
    }


def test_session_end_and_half_close_decode_on_the_peer_service() -> None:
    assert pb.RouterPeerServiceExecResponse.FromString(ENCODED_SESSION_END).WhichOneof("kind") == "end"
    assert pb.RouterPeerServiceConnectRequest.FromString(ENCODED_HALF_CLOSE).frame.WhichOneof("kind") == "half_close"


def test_identity_round_trips_through_peer_metadata() -> None:
    who = Identity(subject="alice", role="user", workflows=("wf-1", "wf-2"))
    metadata = peer_metadata("s" * 32, who, "r1 ipv4:10.0.0.9:5555")
    identity, via = peer_identity(metadata, "s" * 32)
    assert identity == who
    assert via == "r1 ipv4:10.0.0.9:5555"


@pytest.mark.parametrize("given", [None, "", "t" * 32, "s" * 31])
def test_a_wrong_or_missing_secret_is_refused(given: str | None) -> None:
    metadata = peer_metadata(given, Identity(subject="mallory"), "x")
    with pytest.raises(Unauthenticated):
        peer_identity(metadata, "s" * 32)


@pytest.mark.parametrize("value", ["", "not json", '{"sub": 1, "role": "user", "workflows": []}', '{"sub": "a"}'])
def test_a_malformed_identity_is_refused(value: str) -> None:
    with pytest.raises(InvalidArgument):
        peer_identity([(PEER_IDENTITY_HEADER, value)], None)


def test_scaleout_config_is_validated() -> None:
    redis = "redis://127.0.0.1:6379/0"
    jwt = {"auth": "jwt", "jwt_public_key": "/etc/router/jwt/public.pem"}
    RouterConfig(redis_url=redis, auth="none").validate()
    with pytest.raises(ValueError, match="--peer-secret"):
        RouterConfig(redis_url=redis, **jwt).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 16"):
        RouterConfig(redis_url=redis, peer_secret="short", **jwt).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="redis://"):
        RouterConfig(redis_url="127.0.0.1:6379", auth="none").validate()
    with pytest.raises(ValueError, match="--directory-ttl"):
        RouterConfig(directory_ttl=0, auth="none").validate()
    RouterConfig(redis_url="rediss://redis:6380/0", peer_secret="p" * 16, **jwt).validate()  # type: ignore[arg-type]
