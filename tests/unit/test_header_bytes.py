"""HeaderBytes: a request's line and headers counted across reads, each request of a connection anew."""

from __future__ import annotations

from osmo_router.router.ops.header_bytes import MAX_HEADER_BYTES, HeaderBytes

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def feed_in_pieces(counter: HeaderBytes, data: bytes, size: int) -> bool:
    return all(counter.fits(data[i : i + size]) for i in range(0, len(data), size))


def test_many_small_requests_each_fit_in_any_split() -> None:
    for size in (1, 2, 3, 7, 1000):
        assert feed_in_pieces(HeaderBytes(), REQUEST * 2000, size), size


def test_one_block_over_the_limit_does_not_fit_in_any_split() -> None:
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    big = b"GET / HTTP/1.1\r\n" + line * (MAX_HEADER_BYTES // len(line) + 1)
    for size in (1, 3, 4096, len(big)):
        assert not feed_in_pieces(HeaderBytes(), REQUEST + big + b"\r\n", size), size


def test_bare_lf_ends_a_block_too() -> None:
    lf_request = REQUEST.replace(b"\r\n", b"\n")
    assert feed_in_pieces(HeaderBytes(), lf_request * 2000, 5)


def test_after_an_upgrade_nothing_is_counted() -> None:
    counter = HeaderBytes()
    assert counter.fits(REQUEST)
    counter.upgraded()
    assert counter.fits(b"\x82" * (4 * MAX_HEADER_BYTES))
