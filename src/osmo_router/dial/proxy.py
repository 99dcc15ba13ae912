"""HTTP CONNECT proxies for the native channel and the WebSocket transport, chosen as gRPC core does.

grpcio's own channel honours the same environment (grpc/grpc doc/environment_variables.md): the
first of `grpc_proxy`, `https_proxy`, `http_proxy` that is set (lower case first, then upper case)
names the proxy, `http://[user:password@]host:port`; the first of `no_grpc_proxy`, `no_proxy` that
is set lists the hosts reached directly, comma-separated: `*` (every host), a host name (itself and
its subdomains; a leading dot is allowed), an IP address or a CIDR block (an entry's `:port` is
ignored). Loopback is not excluded unless listed, as in gRPC. The tunnel is plain TCP: TLS to the
router, when on, runs inside it end to end, so the proxy sees only the router's host and port.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

#: Proxy variables, in the order gRPC core reads them; each is looked up in lower case, then upper.
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")
#: Exclusion lists, in gRPC core's order.
NO_PROXY_VARIABLES = ("no_grpc_proxy", "no_proxy")
#: Longest proxy answer to a CONNECT read before giving up on it.
MAX_RESPONSE = 16 * 1024


class ProxyError(OSError):
    """The proxy could not be used: unreachable, refused the CONNECT, or answered what is not HTTP.

    `status`: the proxy's HTTP status when it answered one (5xx: it could not reach the target).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def target_unreachable(self) -> bool:
        """True when the proxy answered that it could not reach the target (a 5xx), not about itself."""
        return self.status is not None and self.status >= 500


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy that tunnels with CONNECT."""

    host: str
    port: int
    #: The Proxy-Authorization header's value, from the URL's user and password.
    authorization: str | None = None

    @property
    def address(self) -> str:
        """host:port, as a message shows it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """http://host:port (without credentials), as aiohttp takes it."""
        return f"http://{self.address}"


def _setting(names: tuple[str, ...], env: Mapping[str, str]) -> str:
    for name in names:
        for key in (name, name.upper()):
            if value := env.get(key, "").strip():
                return value
    return ""


def parse_proxy(value: str) -> Proxy:
    """A proxy from `http://[user:password@]host[:port]` (a bare host:port is taken as http); ValueError if not."""
    url = urlsplit(value if "://" in value else f"http://{value}")
    shown = value.replace(url.netloc, url.netloc.rpartition("@")[2]) if "@" in url.netloc else value  # no password
    if url.scheme != "http":
        raise ValueError(f"proxy {shown!r}: only http:// proxies are supported (CONNECT over plain TCP)")
    try:
        port = url.port or 80
    except ValueError:
        raise ValueError(f"proxy {shown!r}: the port is not a number within 0-65535") from None
    if not url.hostname:
        raise ValueError(f"proxy {shown!r} names no host")
    authorization = None
    if url.username is not None:
        credentials = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(credentials).decode()
    return Proxy(url.hostname, port, authorization)


def _excluded(host: str, entries: str) -> bool:
    name = host.strip("[]").lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    for raw in entries.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.startswith("[") or entry.count(":") == 1:  # [v6]:port or host:port: the port is ignored
            entry = entry.rsplit(":", 1)[0] if not entry.startswith("[") else entry[1:].split("]")[0]
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = entry.lstrip(".").rstrip(".")
        if domain and (name == domain or name.endswith("." + domain)):
            return True
    return False


def proxy_for(host: str, env: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy to reach `host` through, or None to dial it directly; ValueError for a malformed setting."""
    env = os.environ if env is None else env
    value = _setting(PROXY_VARIABLES, env)
    if not value or _excluded(host, _setting(NO_PROXY_VARIABLES, env)):
        return None
    return parse_proxy(value)


def _connect_request(proxy: Proxy, host: str, port: int) -> bytes:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Answer:
    """The proxy's answer to a CONNECT, read a byte at a time: what follows it is the router's (a
    plaintext HTTP/2 server speaks first) and must stay in the socket for the connection."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self._where = (proxy, host, port)
        self._text = b""

    def feed(self, byte: bytes) -> bool:
        """Take the next byte; True once the answer is complete and says 200 (ProxyError otherwise)."""
        proxy = self._where[0]
        if not byte or len(self._text) >= MAX_RESPONSE:
            raise ProxyError(f"the proxy {proxy.address} closed or overran its answer to the CONNECT")
        self._text += byte
        if not self._text.endswith(b"\r\n\r\n"):
            return False
        _check_answer(*self._where, self._text)
        return True


def _check_answer(proxy: Proxy, host: str, port: int, answer: bytes) -> None:
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProxyError(f"the proxy {proxy.address} did not answer the CONNECT in HTTP: {status_line[:80]!r}")
    if parts[1] != "200":
        reason = f"{parts[1]} {parts[2] if len(parts) > 2 else ''}".strip()
        hint = " (set credentials in the proxy URL: http://user:password@host:port)" if parts[1] == "407" else ""
        raise ProxyError(
            f"the proxy {proxy.address} refused to connect to {host}:{port}: {reason}{hint}", int(parts[1])
        )


async def open_tunnel(proxy: Proxy, host: str, port: int) -> socket.socket:
    """A connected socket to host:port through the proxy (the caller bounds the time); ProxyError if not."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ProxyError(f"cannot resolve the proxy {proxy.address}: {err.strerror or err}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        try:
            await loop.sock_connect(sock, address)
        except OSError as err:
            raise ProxyError(f"cannot reach the proxy {proxy.address}: {err.strerror or err}") from None
        await loop.sock_sendall(sock, _connect_request(proxy, host, port))
        answer = _Answer(proxy, host, port)
        while not answer.feed(await loop.sock_recv(sock, 1)):
            pass
    except BaseException:
        sock.close()
        raise
    return sock


def open_tunnel_blocking(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    """`open_tunnel` for code outside an event loop (reachability probes)."""
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except OSError as err:
        raise ProxyError(f"cannot reach the proxy {proxy.address}: {err.strerror or err}") from None
    try:
        sock.sendall(_connect_request(proxy, host, port))
        answer = _Answer(proxy, host, port)
        while not answer.feed(sock.recv(1)):
            pass
    except BaseException:
        sock.close()
        raise
    return sock


async def open_socket(host: str, port: int) -> socket.socket | None:
    """A tunnel to host:port when a proxy applies to it, else None (dial directly)."""
    proxy = proxy_for(host)
    return None if proxy is None else await open_tunnel(proxy, host, port)
