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
