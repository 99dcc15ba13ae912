"""Standard input read in a daemon thread, so any kind of stdin works and exit never waits on it; stdout and
stderr written without holding the event loop."""

from __future__ import annotations

import asyncio
import collections
import os
import select
import socket
import stat
import struct
import threading

from osmo_router.io.pipe_writer import PipeWriter
from osmo_router.wire.codec import data_header
from osmo_router.wire.protocol import CHUNK_SIZE

#: Room before the payload in a framed read for the message header (two tags, two varints).
HEADROOM = 16
#: A read at least this large means the writer is streaming (rsync writes 32 KiB at a time).
BULK_READ = 16 * 1024


class StdinReader:
    """Chunks of a file descriptor, delivered to the event loop with backpressure; b"" at EOF.

    The thread reads while the loop is busy sending, up to `depth` chunks ahead. Two options make
    large frames out of a writer that writes in small pieces, since every frame costs three
    processes a few thread switches whatever its size:
    - `linger`: after a bulk read, keep reading what arrives within `linger` seconds, up to
      `chunk_size` (a small read, such as a keystroke or a protocol message, goes at once);
    - `gather`: one read() also takes the chunks already waiting, up to `chunk_size` in all.
    With `framed`, each chunk comes as a whole data-frame message (framecodec's layout), ready
    for FrameStream.send_data_message (no gathering then).
    """

    def __init__(
        self,
        fd: int = 0,
        depth: int = 4,
        chunk_size: int = CHUNK_SIZE,
        gather: bool = False,
        linger: float = 0.0,
        framed: bool = False,
    ) -> None:
        self._fd = fd
        self._chunk_size = chunk_size
        self._gather = gather and not framed
        self._linger = linger
        self._framed = framed
        # A lingering or framed reader reads into one reused buffer and hands over one copy of what
        # it got (framed: as a whole data-frame message, framecodec's layout, with the header put in
        # the room left before the payload), instead of joining the pieces and joining again to
        # prepend the header on the event loop.
        self._buffer = memoryview(bytearray(HEADROOM + chunk_size)) if framed or linger else None
        # On a socket, lingering is MSG_WAITALL with a receive timeout: one call per few hundred KiB
        # instead of a select and a read per 32 KiB that rsync writes.
        self._socket = _stream_socket(fd, linger) if linger else None
        self._eof_seen = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._ready = asyncio.Event()
        # Free slots for chunks read ahead; the thread waits for one before each read (backpressure).
        self._slots = threading.Semaphore(depth)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="stdin-reader", daemon=True)
        self._thread.start()

    async def read(self) -> bytes:
        """The next chunk; b"" once the input ended."""
        while not self._chunks:
            self._ready.clear()
            await self._ready.wait()
        chunk = self._take()
        if not self._gather or not chunk:
            return chunk
        parts, size = [chunk], len(chunk)
        while self._chunks and self._chunks[0] and size + len(self._chunks[0]) <= self._chunk_size:
            parts.append(self._take())
            size += len(parts[-1])
        return b"".join(parts) if len(parts) > 1 else chunk

    def _take(self) -> bytes:
        self._slots.release()
        return self._chunks.popleft()

    def _deliver(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._ready.set()

    def _run(self) -> None:
        while True:
            self._slots.acquire()
            try:
                chunk = self._read_chunk()
            except OSError:
                chunk = b""
            try:
                self._loop.call_soon_threadsafe(self._deliver, chunk)
            except RuntimeError:  # the loop is closed: nobody wants the rest
                return
            if not chunk:
                return

    def _read_chunk(self) -> bytes:
        """What one read (and its linger) brought, framed if asked; b"" at end of input."""
        if self._eof_seen:
            return b""
        buffer = self._buffer
        if buffer is None:
            return os.read(self._fd, self._chunk_size)
        payload = buffer[HEADROOM:]
        size = self._fill(payload)
        if not size or not self._framed:
            return bytes(payload[:size])
        header = data_header(size)
        start = HEADROOM - len(header)
        buffer[start:HEADROOM] = header
        return bytes(buffer[start : HEADROOM + size])

    def _fill(self, payload: memoryview) -> int:
        """Read into payload what is there and, after a bulk read, what arrives within `linger`; the size."""
        if self._socket is not None:
            # Its receives time out after `linger` (the option is the socket's, so fd's too): wait
            # for data first, however long that takes.
            select.select([self._fd], [], [])
        size = os.readv(self._fd, [payload])
        if self._linger and size >= BULK_READ:
            size = self._linger_socket(payload, size) if self._socket else self._linger_fd(payload, size)
        return size

    def _linger_fd(self, payload: memoryview, size: int) -> int:
        """Read on while more arrives within `linger`; the new size."""
        while size < len(payload) and select.select([self._fd], [], [], self._linger)[0]:
            more = os.readv(self._fd, [payload[size:]])
            if not more:
                self._eof_seen = True  # deliver what we have, then the end
                break
            size += more
        return size

    def _linger_socket(self, payload: memoryview, size: int) -> int:
        """Like _linger_fd, in far fewer system calls: each recv waits for the whole rest (MSG_WAITALL)
        but returns what it has once `linger` has passed (SO_RCVTIMEO)."""
        assert self._socket is not None
        while size < len(payload):
            try:
                more = self._socket.recv_into(payload[size:], 0, socket.MSG_WAITALL)
            except (BlockingIOError, TimeoutError):
                break  # nothing for `linger`: the writer paused
            if not more:
                self._eof_seen = True
                break
            size += more
        return size


def _stream_socket(fd: int, timeout: float) -> socket.socket | None:
    """`fd` as a blocking socket object whose receives time out after `timeout`, if it is a stream socket.

    rsync gives its remote shell a socketpair as stdin. The object never closes `fd` (see StdinReader).
    """
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return None
    sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing the object leaves fd alone
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    seconds, micros = divmod(int(timeout * 1_000_000), 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
    return sock


class OutputWriter:
    """This process's stdout or stderr, written without holding the event loop while nobody reads it.

    A write into a full pipe or a stopped terminal (`osmo exec ... | less`, paused) would stop
    everything the loop runs: the Ctrl-C it forwards, input, pings, acknowledgements. The descriptor is shared with
    the shell, so it stays blocking (PipeWriter, shared). A failed write raises nothing: from then on
    the output is dropped and `reader_gone` is set (with `write_error` unless the reader just went
    away), for the caller to act on (client/exec.py ends the remote command).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._writer: PipeWriter | None = None  # made at the first write, in the running loop
        #: True once a write found no reader (the pipe's reader exited: `osmo exec ... | head -1`), or
        #: failed otherwise (`write_error`): what follows is dropped.
        self.reader_gone = False
        #: The first write error other than a reader gone (`> /dev/full`: ENOSPC), if any.
        self.write_error: OSError | None = None

    async def write(self, data: bytes) -> None:
        """Write all of `data`; returns once the kernel has it, or once it is dropped (see `reader_gone`)."""
        if self.reader_gone:
            return
        if self._writer is None:
            self._writer = PipeWriter(self._fd, name=f"fd{self._fd}-writer", shared=True)
        try:
            await self._writer.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.reader_gone = True
        except OSError as err:
            self.reader_gone = True
            self.write_error = err

    def close(self) -> None:
        """Let the writer's thread end after what was written (the descriptor stays open)."""
        if self._writer is not None:
            self._writer.close()
