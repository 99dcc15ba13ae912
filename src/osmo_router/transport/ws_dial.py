"""aiohttp sessions whose connections go through the HTTP proxy the environment names, as the gRPC dial's do.

RFC 6455 section 4.1: a WebSocket client behind a proxy asks it for a TCP tunnel (CONNECT) to the
router's host and port, for ws:// as for wss:// (browsers and the `websockets` library do so too).
aiohttp's own `proxy=` tunnels only https/wss and sends a ws:// request to the proxy as a forwarded
absolute-URI GET, which most proxies (tinyproxy, squid by default) do not carry as a WebSocket. So
the connector below opens every proxied connection with dial/proxy.py's CONNECT client, the one the
gRPC channel uses, and hands aiohttp the connected socket; TLS (wss://) then runs inside the tunnel
end to end, and Proxy-Authorization goes in the CONNECT only, never to the router.

`_wrap_create_connection` is aiohttp's (private) hook around the TCP connect, the one aiohttp-socks
overrides too; tests/e2e/test_proxy_e2e.py checks it with a real tinyproxy for both URL schemes.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ClientRequest
from aiohttp.resolver import DefaultResolver

from osmo_router.dial.proxy import open_tunnel, proxy_for


class _ProxiedNamesUnresolved(AbstractResolver):
    """Resolves a host only when it is dialled directly: the proxy resolves the ones it tunnels to
    (a router's name may only be known on the proxy's side, as for the gRPC dial)."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The host's addresses, or the name itself when a proxy will be asked for it."""
        if proxy_for(host) is None:
            return await self._resolver.resolve(host, port, family)
        return [ResolveResult(hostname=host, host=host, port=port, family=family, proto=0, flags=0)]

    async def close(self) -> None:
        """Release the resolver for direct connections."""
        await self._resolver.close()


class TunnelConnector(aiohttp.TCPConnector):
    """A TCPConnector that reaches a host the environment proxies through a CONNECT tunnel (dial/proxy.py)."""

    def __init__(self) -> None:
        # No DNS cache: a proxied name's placeholder must not outlive a change of the environment.
        super().__init__(resolver=_ProxiedNamesUnresolved(), use_dns_cache=False)

    async def _wrap_create_connection(
        self,
        *args: Any,
        req: ClientRequest,
        timeout: aiohttp.ClientTimeout,
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, Any]:
        host, port = req.url.raw_host or "", req.port
        proxy = proxy_for(host) if port is not None else None  # ValueError (malformed): the caller checked first
        if proxy is None or port is None:
            return await super()._wrap_create_connection(
                *args, req=req, timeout=timeout, client_error=client_error, **kwargs
            )
        try:
            async with asyncio.timeout(timeout.sock_connect):
                sock = await open_tunnel(proxy, host, port)  # ProxyError names the proxy's answer
            try:
                # args[0] is the protocol factory; the address arguments (addr_infos, or host and port in
                # aiohttp before 3.10) are the tunnel's business now, TLS and its server name are not.
                return await self._loop.create_connection(
                    args[0], sock=sock, ssl=kwargs.get("ssl"), server_hostname=kwargs.get("server_hostname")
                )
            except BaseException:
                sock.close()
                raise
        except TimeoutError:
            raise  # aiohttp's own connect timeout, as aiohttp lets it through
        except OSError as err:
            raise client_error(req.connection_key, err) from err


def client_session(connect_timeout: float | None = None) -> aiohttp.ClientSession:
    """An HTTP session for the WebSocket transport, tunnelling through the environment's proxy."""
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
    return aiohttp.ClientSession(connector=TunnelConnector(), timeout=timeout)
