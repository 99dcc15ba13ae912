"""Plain-language reasons for a failed connection to the router (TLS above all).

gRPC reports every failed handshake as UNAVAILABLE with the raw OpenSSL text buried in its
details; `explain_dial_error` recognises the common cases and says what to change.
"""

from __future__ import annotations

import re

from osmo_router.dial.config import DialConfig

_VERIFY_REASON = re.compile(r"CERTIFICATE_VERIFY_FAILED:\s*([^:]+)")


def explain_dial_error(details: str, dial: DialConfig) -> str | None:
    """One clear sentence for a connection failure, or None when the details are not recognised."""
    text = details.lower()
    if "certificate_verify_failed" in text:
        match = _VERIFY_REASON.search(details)
        reason = f" ({match.group(1).strip()})" if match else ""
        return f"TLS handshake failed: certificate not trusted{reason}: the router's certificate does not chain to " + (
            f"--tls-ca {dial.tls_ca}" if dial.tls_ca else "the system store (pass --tls-ca)"
        )
    if "hostname verification" in text or "not in peer certificate" in text:
        return (
            f"TLS handshake failed: the router's certificate does not name {dial.tls_server_name or dial.address} "
            "(pass --tls-server-name with a name it holds)"
        )
    if "wrong_version_number" in text or "packet_length_too_long" in text:
        return "TLS handshake failed: the router does not speak TLS (--tls-enabled=false? pass --tls=false)"
    if "handshake failed" in text:
        return "TLS handshake failed: " + details.rsplit("handshake failed", 1)[1].strip(" :()")
    if "socket closed" in text or "connection reset" in text:
        if not dial.tls:
            return (
                "the router closed the connection: the router speaks TLS; drop --tls=false "
                "(and pass --tls-ca if its certificate is not in the system store)"
            )
        if not dial.tls_cert:
            return (
                "TLS handshake failed: the router closed the connection; it may require a client certificate "
                "(pass --tls-cert and --tls-key)"
            )
        return "TLS handshake failed: the router does not trust this client certificate (--tls-cert)"
    if "connection refused" in text and "failed to connect" in text:
        # Only gRPC's own dial failure: a status the router sent may quote a refused connection of
        # its own (e.g. to Redis), and that one must reach the user as the router worded it.
        return f"router unreachable at {dial.address}: connection refused"
    return None
