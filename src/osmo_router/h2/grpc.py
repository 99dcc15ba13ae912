"""The gRPC layer over HTTP/2 streams: status trailers, metadata, deadlines (the message prefix is in stream.py).

Both roles use it: a server builds its response headers and trailers here, a client its request
headers and reads the status out of the trailers.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterable, Sequence

from osmo_router.h2.stream import Headers

OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

CONTENT_TYPE = "application/grpc"
RESPONSE_HEADERS: Headers = [(":status", "200"), ("content-type", CONTENT_TYPE), ("grpc-accept-encoding", "identity")]
#: Request headers that are HTTP/2 or gRPC machinery, not the caller's metadata.
_RESERVED = frozenset({"te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "connection"})
#: Characters sent as they are in grpc-message; every other byte is percent-encoded (gRPC HTTP/2 spec).
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

MetadataValue = str | bytes
Metadata = tuple[tuple[str, MetadataValue], ...]


def encode_message(message: str) -> str:
    """grpc-message percent-encoding."""
    return urllib.parse.quote(message, safe=_SAFE)


def decode_message(value: str) -> str:
    """The inverse of encode_message."""
    return urllib.parse.unquote(value)


def status_trailers(
    code: int, message: str = "", headers: bool = False, metadata: Iterable[tuple[str, MetadataValue]] = ()
) -> Headers:
    """grpc-status (and grpc-message) trailers; with `headers`, a whole trailers-only response."""
    out: Headers = list(RESPONSE_HEADERS) if headers else []
    out.append(("grpc-status", str(code)))
    if message:
        out.append(("grpc-message", encode_message(message)))
    out.extend(encode_metadata(metadata))
    return out


def status_of(trailers: Sequence[tuple[str, str]] | None) -> tuple[int, str]:
    """(grpc-status, grpc-message) of received trailers; UNKNOWN when there is no status."""
    code, message = UNKNOWN, ""
    for key, value in trailers or ():
        if key == "grpc-status":
            code = int(value) if value.isdigit() else UNKNOWN
        elif key == "grpc-message":
            message = decode_message(value)
    return code, message


def parse_timeout(value: str) -> float | None:
    """Seconds of a grpc-timeout header ("100m", "5S"), None if malformed."""
    if len(value) < 2 or not value[:-1].isdigit() or len(value) > 9 or value[-1] not in _TIMEOUT_UNITS:
        return None
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


def format_timeout(seconds: float) -> str:
    """A grpc-timeout header value for `seconds` (at most 8 digits, as the spec says)."""
    micros = max(1, int(seconds * 1e6))
    if micros < 10**8:
        return f"{micros}u"
    millis = micros // 1000
    if millis < 10**8:
        return f"{millis}m"
    return f"{min(10**8 - 1, int(seconds))}S"


def metadata_of(headers: Iterable[tuple[str, str]]) -> Metadata:
    """The caller's metadata out of request headers: no pseudo or reserved headers, `-bin` values decoded."""
    out: list[tuple[str, MetadataValue]] = []
    for key, value in headers:
        if key.startswith(":") or key in _RESERVED:
            continue
        if key.endswith("-bin"):
            try:
                out.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
            except ValueError:
                continue
        else:
            out.append((key, value))
    return tuple(out)


def encode_metadata(metadata: Iterable[tuple[str, MetadataValue]]) -> Headers:
    """Metadata as headers: keys lower-case, `-bin` values base64 (without padding)."""
    out: Headers = []
    for key, value in metadata:
        key = key.lower()
        if key.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            out.append((key, base64.b64encode(raw).decode().rstrip("=")))
        else:
            out.append((key, value.decode() if isinstance(value, bytes) else value))
    return out
