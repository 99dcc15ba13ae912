"""DATA frames to a plain TCP socket as one vector, without joining them first.

Python 3.11's `WriteTransport.writelines` is `write(b"".join(pieces))`: a bulk message (1 MiB)
is copied once more just to put a 14-byte frame header in front of it. For asyncio's own socket
transport, while its buffer is empty (nothing of ours is waiting in it, so order is kept), the
pieces go to the socket with one writev(2); only what the socket did not take goes to the
transport, which buffers it and sends it when the socket drains, as with any write. Other
transports (TLS, uvloop, whose writelines already sends a vector) get `writelines` as before.
"""

from __future__ import annotations

import asyncio
import os
from asyncio import selector_events
from collections.abc import Sequence
from typing import Final

#: More pieces than this go to the transport (IOV_MAX is 1024 on Linux; many small pieces join cheaply).
MAX_PIECES: Final = 64

Piece = bytes | bytearray | memoryview

#: asyncio's plain socket transport (private, and not in typeshed): its `write` is the one bypassed.
_SOCKET_TRANSPORT: Final[type] = selector_events._SelectorSocketTransport  # type: ignore[attr-defined]


class VectorWriter:
    """Writes a list of buffers to one transport (see the module docstring)."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._fd = -1
        if isinstance(transport, _SOCKET_TRANSPORT):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self._fd = sock.fileno()

    def writelines(self, pieces: Sequence[Piece]) -> None:
        """Write the pieces in order (the transport must not be closing)."""
        if self._fd < 0:
            # _write's first test and _to_transport, inline for a transport that gets `writelines` as
            # before (uvloop's, TLS): two calls less per message written (issue 18).
            self.transport.writelines(pieces)
            return
        self._write(pieces, False)

    def writelines_borrowed(self, pieces: Sequence[Piece]) -> None:
        """`writelines` of pieces valid only during the call (a view of a read buffer the next read
        reuses, h2/reader.py): what the socket does not take at once goes to the transport as a copy.
        uvloop's transports (and Python 3.12's) keep a reference to what they send later."""
        self._write(pieces, True)

    def _write(self, pieces: Sequence[Piece], borrowed: bool) -> None:
        transport = self.transport
        if self._fd < 0 or len(pieces) > MAX_PIECES or transport.get_write_buffer_size():
            self._to_transport(pieces, borrowed)
            return
        try:
            sent = os.writev(self._fd, pieces)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._to_transport(pieces, borrowed)  # the transport meets the error again and reports it
            return
        for piece in pieces:
            if sent >= len(piece):
                sent -= len(piece)
                continue
            rest = memoryview(piece)[sent:] if sent else piece
            transport.write(bytes(rest) if borrowed else rest)
            sent = 0

    def _to_transport(self, pieces: Sequence[Piece], borrowed: bool) -> None:
        if borrowed:
            self.transport.write(b"".join(pieces))
        else:
            self.transport.writelines(pieces)
