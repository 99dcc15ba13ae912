"""How to reach the router: the settings both the client and the agent dial with.

Kept free of grpc and protobuf imports, so a command that only needs its flags (`osmo-net-client
rsync`, which starts the local rsync) starts quickly.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

#: The value of --grpc-channel for our asyncio HTTP/2 channel (the other is "grpcio", grpc.aio).
NATIVE_CHANNEL = "native"
#: The gRPC client the CLI and agent use unless told: our asyncio HTTP/2 channel (h2/channel.py), which
#: costs 0.4-0.6x grpc.aio per message (docs/bench/NOTES.md, issue 18); `grpcio` stays selectable.
DEFAULT_GRPC_CHANNEL = NATIVE_CHANNEL


@dataclass(frozen=True)
class DialConfig:
    """How to reach the router, shared by the client and the agent."""

    address: str
    tls: bool = True
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None
    #: A file holding the token, read at every call: a renewed token is used from the next call on.
    token_file: str | None = None
    cookie: str | None = None
    #: The gRPC channel implementation: "grpcio" (grpc.aio) or "native" (osmo_router.h2.channel, issue 18).
    grpc_channel: str = DEFAULT_GRPC_CHANNEL

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token and the load-balancer cookie."""
        from osmo_router.wire.protocol import AUTHORIZATION_HEADER, COOKIE_HEADER

        items: list[tuple[str, str]] = []
        token = self.current_token()
        if token:
            items.append((AUTHORIZATION_HEADER, f"Bearer {token}"))
        if self.cookie:
            items.append((COOKIE_HEADER, self.cookie))
        return tuple(items)

    @property
    def addresses(self) -> list[str]:
        """The router addresses `address` lists (comma-separated; one for the common case)."""
        return split_addresses(self.address)

    def current_token(self) -> str | None:
        """The token to send now: the token file's content when there is one and it reads, else --token."""
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError:
                return self.token
            return token or self.token
        return self.token


def split_addresses(address: str) -> list[str]:
    """`host:port[,host:port...]` as a list (blanks dropped; the whole string when nothing is left)."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    return parts or [address]


def address_problem(address: str) -> str | None:
    """What is wrong with one router address (`host:port`, `[v6]:port`, or `host` for gRPC's default
    port 443), or None. Names resolve when dialled; this catches what never could."""
    if "://" in address:
        return f"{address!r} is a URL; give host:port"
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return f"{address!r} is not [IPv6]:port"
        port = rest[1:] if rest else None
    elif address.count(":") > 1:
        return f"{address!r}: write an IPv6 address in brackets, [addr]:port"
    else:
        host, colon, port_text = address.partition(":")
        port = port_text if colon else None
    if not host:
        return f"{address!r} has no host"
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"{address!r}: the port must be a number within 1-65535"
    return None


def tls_files_problem(dial: DialConfig) -> str | None:
    """What keeps the TLS files of `dial` from being used (unreadable, not PEM, a key that is not the
    certificate's), naming the flag; None if they can be used or TLS is off. Checked once at start, so a
    wrong path is a usage error instead of a traceback at the first dial."""
    if not dial.tls:
        return None
    for flag, path in (("--tls-ca", dial.tls_ca), ("--tls-cert", dial.tls_cert), ("--tls-key", dial.tls_key)):
        if path:
            try:
                open(path, "rb").close()
            except OSError as err:
                return f"{flag} {path} cannot be read: {err.strerror or err}"
    if dial.tls_key and not dial.tls_cert:
        return "--tls-key needs --tls-cert"
    if dial.tls_ca:
        try:
            ssl.create_default_context(cafile=dial.tls_ca)
        except ssl.SSLError as err:
            return f"--tls-ca {dial.tls_ca} holds no PEM certificate{_reason(err)}"
    if dial.tls_cert:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(dial.tls_cert, dial.tls_key)
        except ssl.SSLError as err:
            key = f" with --tls-key {dial.tls_key}" if dial.tls_key else ""
            return f"--tls-cert {dial.tls_cert}{key} is not a PEM certificate and its key{_reason(err)}"
    return None


def token_file_problem(dial: DialConfig) -> str | None:
    """Why --token-file gives no token now (unreadable, empty), and what is sent instead; None if it does.

    Not an error: the file is read again at every call (a projected token may appear or be renewed
    later). But without this line, the router's "no bearer token: pass --token" is all a user sees.
    """
    if not dial.token_file:
        return None
    try:
        with open(dial.token_file, encoding="utf-8") as f:
            if f.read().strip():
                return None
        problem = "is empty"
    except (OSError, UnicodeDecodeError) as err:
        problem = f"cannot be read ({getattr(err, 'strerror', None) or err})"
    instead = "--token is sent instead" if dial.token else "no token is sent"
    return f"--token-file {dial.token_file} {problem}: {instead}"


def _reason(err: ssl.SSLError) -> str:
    return f" ({err.reason})" if err.reason else ""
