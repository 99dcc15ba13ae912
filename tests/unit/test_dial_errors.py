"""Which UNAVAILABLE details are explained as a failed dial, and which are passed on as they are."""

from __future__ import annotations

from osmo_router.dial.config import DialConfig
from osmo_router.dial.errors import explain_dial_error

DIAL = DialConfig(address="127.0.0.1:50051", tls=False)


def test_grpc_dial_failure_is_explained() -> None:
    details = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50051: "
        "Failed to connect to remote host: Connection refused"
    )
    assert explain_dial_error(details, DIAL) == "router unreachable at 127.0.0.1:50051: connection refused"


def test_a_refusal_the_router_reports_is_not_a_dial_failure() -> None:
    # uvloop words a refused Redis connection like this; the router sends it as its status.
    details = (
        "the session directory (Redis) is unreachable: Error 111 connecting to 127.0.0.1:6379. Connection refused."
    )
    assert explain_dial_error(details, DIAL) is None


CLOSED_WHILE_CONNECTING = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:50051: Socket closed"
)


def test_a_closed_connection_is_a_tls_mismatch_only_on_evidence() -> None:
    from osmo_router.dial.errors import Peer, needs_probe

    assert needs_probe(CLOSED_WHILE_CONNECTING)
    assert "speaks TLS" in (explain_dial_error(CLOSED_WHILE_CONNECTING, DIAL, Peer.TLS) or "")
    for peer in (None, Peer.NOT_TLS, Peer.REFUSED, Peer.UNKNOWN):
        assert "speaks TLS" not in (explain_dial_error(CLOSED_WHILE_CONNECTING, DIAL, peer) or ""), peer
    assert "no longer accepts connections" in (explain_dial_error(CLOSED_WHILE_CONNECTING, DIAL, Peer.REFUSED) or "")


def test_a_connection_that_broke_after_it_was_up_is_never_probed_nor_called_tls() -> None:
    from osmo_router.dial.errors import needs_probe

    assert not needs_probe("Socket closed")
    assert explain_dial_error("Connection reset by peer", DIAL) == (
        "the connection to the router was reset (the router stopped, restarted, or the network dropped it)"
    )
