"""The byte limit on a request's line and headers for the router's aiohttp ports (WebSocket, metrics).

aiohttp's parser takes 128 header fields of 8 KiB each (1 MiB) and keeps them as Python objects,
about 2 MiB of the router per connection, until the header timeout or, once complete, for the life
of the request (a WebSocket session waiting for its peer): 200 connections that never finished
their headers grew the router by 392 MiB. `HeaderBytes` counts what a connection sends until each
request's headers end and says when one passes MAX_HEADER_BYTES, before aiohttp sees the bytes.
These ports take no request bodies, so every byte up to a header block's end counts; after a
WebSocket upgrade the frames are not counted.
"""

from __future__ import annotations

#: Most bytes of one request's line and headers: nginx's default (four 8 KiB buffers). Real requests,
#: a JWT in `Authorization` included, are a few KiB.
MAX_HEADER_BYTES = 32 * 1024
#: The answer to a request over MAX_HEADER_BYTES (then the connection is closed).
HEADERS_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def block_end(seen: bytes, start: int) -> int:
    """Where the first header block that ends at or after `start` ends (just past its empty line), or -1.

    An empty line is LF CR LF or LF LF (aiohttp's parser takes both); its LF may be up to two bytes
    before `start` (the tail of the last read).
    """
    ends = [i for i in (seen.find(b"\n\r\n", max(start - 2, 0)), seen.find(b"\n\n", max(start - 1, 0))) if i >= 0]
    if not ends:
        return -1
    first = min(ends)
    return first + (3 if seen[first + 1 : first + 2] == b"\r" else 2)


class HeaderBytes:
    """The bytes of the request whose headers are arriving on one connection."""

    __slots__ = ("_count", "_tail")

    def __init__(self) -> None:
        #: Bytes of the current header block (None: a WebSocket now, nothing is counted).
        self._count: int | None = 0
        #: The last two bytes seen, so that an empty line split across reads is found.
        self._tail = b""

    @property
    def counting(self) -> bool:
        """Whether the connection still speaks HTTP requests (not upgraded)."""
        return self._count is not None

    def fits(self, data: bytes) -> bool:
        """Count `data` into the header blocks; False once one is over MAX_HEADER_BYTES."""
        if self._count is None:
            return True
        seen = self._tail + data
        counted = len(self._tail)  # the tail was counted with the last read
        count = self._count
        while (end := block_end(seen, counted)) >= 0:  # each end is past `counted`: the loop ends
            if count + end - counted > MAX_HEADER_BYTES:
                return False
            count, counted = 0, end  # the next request's line starts here
        self._count = count + len(seen) - counted
        self._tail = seen[-2:]
        return self._count <= MAX_HEADER_BYTES

    def upgraded(self) -> None:
        """The request is a WebSocket upgrade: what follows are its frames, not headers."""
        self._count = None
        self._tail = b""
