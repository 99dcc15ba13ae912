"""UncountedCharge: a stream's headers and its largest message beyond its window, in its connection's share."""

from __future__ import annotations

from osmo_router.h2.credit import HEADER_FIELD_COST, UncountedCharge, header_cost
from osmo_router.io.byte_shares import ByteShares


def test_headers_count_their_fields_not_just_their_bytes() -> None:
    assert header_cost([("a", ""), ("b", "")]) == 2 * HEADER_FIELD_COST + 4
    assert header_cost([("authorization", "x" * 1000)]) == HEADER_FIELD_COST + 2 * 1013


def test_a_stream_is_charged_its_largest_message_once_and_gives_all_back() -> None:
    shares = ByteShares(total=10_000, per_owner=5_000)
    charge = UncountedCharge(shares, "conn", 1_000)
    assert shares.take("conn", 1_000)  # (what the connection charged for the headers)
    assert charge.cover(2_000) and shares.owned("conn") == 3_000
    assert charge.cover(1_500) and shares.owned("conn") == 3_000  # smaller than one covered: nothing more
    assert not charge.cover(5_000), "past the connection's share"
    assert shares.owned("conn") == 3_000 and charge.covered == 2_000
    other = UncountedCharge(shares, "other", 0)
    assert other.cover(4_000), "another connection has its own share"
    charge.release()
    assert shares.owned("conn") == 0 and shares.used == 4_000
    charge.release()  # (twice: nothing more)
    assert shares.used == 4_000
