"""Plain-language reasons for a failed connection to the router (TLS above all).

gRPC reports every failed handshake as UNAVAILABLE with the raw OpenSSL text buried in its
details; `explain_dial_error` recognises the common cases and says what to change.

A closed or reset connection is the one ambiguous case (issue 15): a plaintext client dialling a
TLS router sees "Socket closed" when the router drops the HTTP/2 preface it cannot read, and so
does a client whose router died or restarted. The TLS mismatch is claimed only on evidence:
`probe_peer` dials the router once more and sends a TLS ClientHello; a router that answers with a
TLS record (a handshake or an alert) speaks TLS; one that refuses the connection has stopped; one
that answers with anything else, or closes, does not speak TLS. The probe goes through the HTTP
proxy the environment names for the router, as the dial does. A connection that broke after it
was up (no "failed to connect" in the details) was never a TLS mismatch and is not probed. The
probe is bounded (PROBE_TIMEOUT) and made only on that failure path, never per session.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import ssl
from typing import Final

from osmo_router.dial.config import DialConfig
from osmo_router.dial.proxy import open_socket

#: Why verification failed: grpc core's "CERTIFICATE_VERIFY_FAILED: certificate has expired", Python's
#: (the native channel) "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired
#: (_ssl.c:1006)".
_VERIFY_REASON = re.compile(r"(?:CERTIFICATE_VERIFY_FAILED|certificate verify failed):\s*([^:(]+)")
#: Reasons that say the certificate chains but is outside its validity period (OpenSSL's wording).
_EXPIRED = "certificate has expired"
_NOT_YET_VALID = "certificate is not yet valid"
#: Python's ssl (the native channel) reports a name the certificate does not hold as a failed verification:
#: "certificate verify failed: Hostname mismatch, ..." (or "IP address mismatch"); grpc core words it apart.
_NAME_MISMATCH = re.compile(r"(hostname|ip address) mismatch")

#: Bound on the whole TLS probe (connect, send the ClientHello, read the first bytes).
PROBE_TIMEOUT: Final = 2.0
#: The first byte of a TLS record carrying a handshake message or an alert; then the major version 3.
_TLS_RECORD_TYPES: Final = (0x15, 0x16)
_TLS_MAJOR: Final = 0x03


class Peer(enum.Enum):
    """What a probe of the router's address found."""

    TLS = "tls"  # answered a ClientHello with a TLS record
    NOT_TLS = "not tls"  # accepted the connection, answered otherwise or closed it
    REFUSED = "refused"  # nothing listens there (any more)
    UNKNOWN = "unknown"  # no answer within the bound, an address the probe cannot dial, or the proxy failed


def _split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "[v6]:port"; None for anything else (a list, a gRPC URI)."""
    if "," in address or "/" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _client_hello(host: str) -> bytes:
    """The bytes of a TLS ClientHello for `host` (nothing is verified: only the answer's kind matters)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        ipaddress.ip_address(host)
        server_name: str | None = None
    except ValueError:
        server_name = host
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def probe_peer(address: str, timeout: float = PROBE_TIMEOUT) -> Peer:
    """Dial `address` once, send a TLS ClientHello and classify the answer (see the module docstring)."""
    parts = _split_address(address)
    if parts is None:
        return Peer.UNKNOWN
    host, port = parts
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            # Through the proxy the dial itself goes through (dial/proxy.py), or the probe would
            # judge a path the connection never takes. The proxy's own failure is no evidence.
            tunnel = await open_socket(host, port)
            reader, writer = await (
                asyncio.open_connection(host, port) if tunnel is None else asyncio.open_connection(sock=tunnel)
            )
            writer.write(_client_hello(host))
            await writer.drain()
            head = b""
            while len(head) < 2:
                more = await reader.read(2 - len(head))
                if not more:
                    break
                head += more
    except ConnectionRefusedError:
        return Peer.REFUSED
    except ConnectionError:
        return Peer.NOT_TLS  # accepted, then reset: not a TLS server's answer to a ClientHello
    except (OSError, TimeoutError):
        return Peer.UNKNOWN
    finally:
        if writer is not None:
            writer.close()
    if len(head) == 2 and head[0] in _TLS_RECORD_TYPES and head[1] == _TLS_MAJOR:
        return Peer.TLS
    return Peer.NOT_TLS


def _closed_or_reset(text: str) -> bool:
    return "socket closed" in text or "connection reset" in text


def needs_probe(details: str) -> bool:
    """True when the details are a connection closed or reset while it was being made (ambiguous)."""
    text = details.lower()
    return _closed_or_reset(text) and "failed to connect" in text


async def explain_connection_error(details: str, dial: DialConfig, address: str | None = None) -> str | None:
    """`explain_dial_error`, after probing the router when the details alone are ambiguous.

    `address`: the one address that was dialled, when `dial.address` lists several.
    """
    peer = await probe_peer(address or dial.address) if needs_probe(details) else None
    return explain_dial_error(details, dial, peer)


def explain_dial_error(details: str, dial: DialConfig, peer: Peer | None = None) -> str | None:
    """One clear sentence for a connection failure, or None when the details are not recognised.

    `peer`: what `probe_peer` found at the router's address, if it was probed. Without that
    evidence a closed or reset connection is reported as what it is, never as a TLS mismatch.
    """
    text = details.lower()
    if (rejected := _certificate_rejected(details, text, dial)) is not None:
        return rejected
    if "wrong_version_number" in text or "packet_length_too_long" in text:
        return "TLS handshake failed: the router does not speak TLS (--tls-enabled=false? pass --tls=false)"
    if "handshake failed" in text:
        return "TLS handshake failed: " + details.rsplit("handshake failed", 1)[1].strip(" :()")
    if _closed_or_reset(text):
        return _why_closed(text, dial, peer)
    if "connection refused" in text and "failed to connect" in text:
        # Only gRPC's own dial failure: a status the router sent may quote a refused connection of
        # its own (e.g. to Redis), and that one must reach the user as the router worded it.
        return f"router unreachable at {dial.address}: connection refused"
    return None


def _certificate_rejected(details: str, text: str, dial: DialConfig) -> str | None:
    """explain_dial_error for a router certificate this client rejected (its name, its chain, its dates), or None.

    `text` is `details` in lower case.
    """
    if "hostname verification" in text or "not in peer certificate" in text or _NAME_MISMATCH.search(text):
        return (
            f"TLS handshake failed: the router's certificate does not name {dial.tls_server_name or dial.address} "
            "(pass --tls-server-name with a name it holds)"
        )
    if "certificate_verify_failed" in text:
        match = _VERIFY_REASON.search(details)
        why = match.group(1).strip() if match else ""
        # It chains to the CA, but is outside its dates: an unrenewed (or not yet current) router
        # certificate, or a clock that is off; "does not chain to --tls-ca" would send the user
        # after the wrong file.
        if why.lower() in (_EXPIRED, _NOT_YET_VALID):
            when = "has expired" if why.lower() == _EXPIRED else "is not valid yet"
            return (
                f"TLS handshake failed: the router's certificate {when} ({why}): "
                "its certificate must be renewed, or this machine's clock is wrong"
            )
        reason = f" ({why})" if why else ""
        return f"TLS handshake failed: certificate not trusted{reason}: the router's certificate does not chain to " + (
            f"--tls-ca {dial.tls_ca}" if dial.tls_ca else "the system store (pass --tls-ca)"
        )
    return None


def _why_closed(text: str, dial: DialConfig, peer: Peer | None) -> str:
    """explain_dial_error for a connection closed or reset (`text`: the details in lower case), told apart by
    whether it was up, by the --tls flags and by what a probe of the router's address found (`peer`)."""
    what = "closed" if "socket closed" in text else "reset"
    if peer is Peer.REFUSED:
        return (
            f"the router {what} the connection and no longer accepts connections at {dial.address} "
            "(connection refused): it stopped or is restarting"
        )
    if "failed to connect" not in text:
        # The connection was up: whatever ended it, it was not a TLS handshake.
        return f"the connection to the router was {what} (the router stopped, restarted, or the network dropped it)"
    if not dial.tls:
        if peer is Peer.TLS:
            return (
                "the router closed the connection: the router speaks TLS; drop --tls=false "
                "(and pass --tls-ca if its certificate is not in the system store)"
            )
        if peer is Peer.NOT_TLS:
            return (
                f"the router {what} the connection while it was being made; it answers without TLS, "
                "so --tls=false is right (it may have been restarting, or a proxy in between refused it)"
            )
        return (
            f"the router {what} the connection while it was being made and did not answer a probe "
            "(it may have stopped, or the network drops the connection)"
        )
    if peer is Peer.NOT_TLS:
        return "TLS handshake failed: the router does not speak TLS (--tls-enabled=false? pass --tls=false)"
    if not dial.tls_cert:
        return (
            "TLS handshake failed: the router closed the connection; it may require a client certificate "
            "(pass --tls-cert and --tls-key)"
        )
    return "TLS handshake failed: the router does not trust this client certificate (--tls-cert)"
