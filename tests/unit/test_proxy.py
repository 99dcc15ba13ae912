"""Which proxy a host is dialled through, read from the environment as gRPC core reads it."""

from __future__ import annotations

import pytest

from osmo_router.dial.proxy import ProxyError, _check_answer, parse_proxy, proxy_for

PROXY = "http://proxy.corp:3128"


def test_grpc_cores_order_of_variables() -> None:
    env = {"http_proxy": "http://h:1", "HTTPS_PROXY": "http://s:2", "grpc_proxy": "http://g:3"}
    assert proxy_for("router", env) == parse_proxy("http://g:3")
    del env["grpc_proxy"]
    assert proxy_for("router", env) == parse_proxy("http://s:2")  # lower case first, then upper case
    assert proxy_for("router", {"http_proxy": "h:8080"}) == parse_proxy("http://h:8080")
    assert proxy_for("router", {}) is None


@pytest.mark.parametrize(
    ("host", "no_proxy", "direct"),
    [
        ("router.example.com", "example.com", True),
        ("router.example.com", ".example.com", True),
        ("example.com", ".example.com", True),
        ("badexample.com", "example.com", False),
        ("10.1.2.3", "10.0.0.0/8", True),
        ("10.1.2.3", "10.1.2.3:50051", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("::1", "[::1]:50051", True),
        ("127.0.0.1", "", False),  # loopback is proxied unless listed, as in gRPC
        ("anything", "*", True),
        ("router", " other , router ", True),
    ],
)
def test_no_proxy_entries(host: str, no_proxy: str, direct: bool) -> None:
    assert (proxy_for(host, {"https_proxy": PROXY, "no_proxy": no_proxy}) is None) is direct


def test_no_grpc_proxy_comes_first() -> None:
    env = {"https_proxy": PROXY, "no_grpc_proxy": "a", "no_proxy": "b"}
    assert proxy_for("a", env) is None and proxy_for("b", env) is not None


def test_proxy_urls() -> None:
    proxy = parse_proxy("http://al%40ce:p%3Ass@proxy:3128")
    assert (proxy.host, proxy.port, proxy.authorization) == ("proxy", 3128, "Basic YWxAY2U6cDpzcw==")
    assert proxy.url == "http://proxy:3128" and parse_proxy("proxy").port == 80
    for bad, words in (("https://proxy:1", "only http://"), ("http://:1", "names no host"), ("http://p:99999", "port")):
        with pytest.raises(ValueError, match=words):
            parse_proxy(bad)
    with pytest.raises(ValueError, match="port") as leaked:
        parse_proxy("http://alice:s3cret@p:99999")
    assert "s3cret" not in str(leaked.value) and "'http://p:99999'" in str(leaked.value)


def test_answers_to_the_connect() -> None:
    proxy = parse_proxy(PROXY)
    _check_answer(proxy, "r", 1, b"HTTP/1.0 200 Connection established\r\n\r\n")
    with pytest.raises(ProxyError, match=r"407 Proxy Authentication Required .*user:password") as refused:
        _check_answer(proxy, "r", 1, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    assert not refused.value.target_unreachable
    with pytest.raises(ProxyError) as unreachable:
        _check_answer(proxy, "r", 1, b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
    assert unreachable.value.target_unreachable
    with pytest.raises(ProxyError, match="did not answer the CONNECT in HTTP"):
        _check_answer(proxy, "r", 1, b"SSH-2.0-OpenSSH\r\n\r\n")
