"""A relay process that moves bytes socket -> pipe -> socket with splice(2): no user-space copy (issue 18).

Each direction of each connection has its own pipe, raised to /proc/sys/fs/pipe-max-size; a selector
drives the sockets (non-blocking) and `os.splice` moves up to the pipe's size at a time. EOF on one side
becomes a write shutdown of the other once the pipe is empty; a reset or any other error closes both.

Framed mode, what an HTTP/2 + gRPC hop would have to do to keep the payload out of user space: the framed
side carries `HEADER` bytes (9 of HTTP/2 frame header, 5 of gRPC message prefix, 6 of the protobuf field's
tag and length) before each chunk of payload. Sending, the header goes with its own `send` (MSG_MORE, so
the kernel can put it in one segment with the payload) and the chunk's payload follows by splice;
receiving, the header is read with `recv` (exactly its size) and the payload it announces is spliced.

    python -m bench.experiments.splice_relay LISTEN TARGET [--framed-listen] [--framed-target] [--chunk N]
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import selectors
import signal
import socket
import struct
import sys
from pathlib import Path

#: The bytes an HTTP/2 DATA frame carrying one gRPC message adds before the payload: 9 + 5 + 6.
HEADER = 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
#: Errors that end a connection (the peer went away).
GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT)


class Stats:
    """Bytes and frames this process moved, printed to stderr at exit (the mean framed chunk's size)."""

    bytes = 0
    frames = 0
    framed_bytes = 0  # of `bytes`, those sent as frame payload


def make_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe raised to the system's maximum size: (read end, write end, size in bytes)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
    except OSError:
        pass  # over the user's pipe-page limit: keep the default size
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)


class Direction:
    """One direction of a relayed connection: src socket -> pipe -> dst socket.

    `pump` moves what can move now; afterwards `want_read` / `want_write` say which readiness it waits
    for. The socket -> pipe splice says EAGAIN both when the socket is empty and when the pipe has no free
    slot (a slot per socket buffer fragment, so a pipe can be "full" below its size in bytes): it waits
    for src only with an empty pipe, otherwise for dst (whose draining frees the pipe).
    """

    def __init__(self, src: socket.socket, dst: socket.socket, framed_in: bool, framed_out: bool, chunk: int) -> None:
        self.src, self.dst = src, dst
        self.framed_in, self.framed_out, self.chunk = framed_in, framed_out, chunk
        self.r, self.w, self.capacity = make_pipe()
        self.queued = 0  # bytes in the pipe
        self.eof = False  # src ended (at a frame boundary when framed)
        self.done = False  # dst shut down for writing
        self.hdr_in = bytearray()  # framed input: the header read so far
        self.payload_left = 0  # framed input: payload bytes of the current frame still to read
        self.hdr_out = b""  # framed output: header bytes still to send
        self.out_left = 0  # framed output: payload bytes of the current frame still to splice
        self.want_read = self.want_write = False

    def pump(self) -> None:
        """Move bytes until both ends would block (or the direction is done)."""
        self.want_read = self.want_write = False
        while not self.done:
            # a side that said EAGAIN is not asked again in this pump (a syscall saved per message), but
            # for a read that may have failed for a full pipe (data queued) once the send side moved some
            sent = not self.want_write and self._send()
            received = not self.want_read and self._receive()
            if self.eof and not self.queued and not self.hdr_out:
                self.dst.shutdown(socket.SHUT_WR)
                self.done = True
            elif not (sent or received):
                return

    def _send(self) -> bool:
        """Pipe -> dst (a header first when framed); whether anything moved."""
        if not self.queued:
            return False
        count = self.queued
        if self.framed_out:
            if not self.out_left and not self.hdr_out:
                self.out_left = min(self.queued, self.chunk)
                self.hdr_out = struct.pack(">I", self.out_left).ljust(HEADER, b"\0")
                Stats.frames += 1
            if self.hdr_out:
                try:
                    n = self.dst.send(self.hdr_out, socket.MSG_MORE)
                except BlockingIOError:
                    self.want_write = True
                    return False
                self.hdr_out = self.hdr_out[n:]
                return True
            count = self.out_left
        try:
            n = os.splice(self.r, self.dst.fileno(), count, flags=FLAGS)
        except BlockingIOError:
            self.want_write = True
            return False
        self.queued -= n
        Stats.bytes += n
        if self.framed_out:
            self.out_left -= n
            Stats.framed_bytes += n
        return n > 0

    def _receive(self) -> bool:
        """src -> pipe (the header by recv first when framed); whether anything moved or ended."""
        if self.eof:
            return False
        if self.framed_in and not self.payload_left:
            return self._receive_header()
        room = self.capacity - self.queued
        if room <= 0:
            return False  # waits for the send side, which wants dst writable
        count = min(room, self.payload_left) if self.framed_in else room
        try:
            n = os.splice(self.src.fileno(), self.w, count, flags=FLAGS)
        except BlockingIOError:
            self.want_read = not self.queued
            return False
        if not n:
            if self.framed_in:
                raise ConnectionResetError(errno.ECONNRESET, "EOF inside a frame")
            self.eof = True
            return True
        self.queued += n
        if self.framed_in:
            self.payload_left -= n
        return True

    def _receive_header(self) -> bool:
        try:
            data = self.src.recv(HEADER - len(self.hdr_in))
        except BlockingIOError:
            self.want_read = not self.queued
            return False
        if not data:
            if self.hdr_in:
                raise ConnectionResetError(errno.ECONNRESET, "EOF inside a frame header")
            self.eof = True
            return True
        self.hdr_in += data
        if len(self.hdr_in) == HEADER:
            (self.payload_left,) = struct.unpack_from(">I", self.hdr_in)
            self.hdr_in.clear()
        return True

    def close(self) -> None:
        """Close the pipe."""
        os.close(self.r)
        os.close(self.w)


class Connection:
    """A relayed connection: the accepted socket `a`, the target socket `b`, a Direction each way."""

    def __init__(
        self, sel: selectors.BaseSelector, a: socket.socket, b: socket.socket, args: argparse.Namespace
    ) -> None:
        self.sel, self.a, self.b = sel, a, b
        self.up = Direction(a, b, args.framed_listen, args.framed_target, args.chunk)
        self.down = Direction(b, a, args.framed_target, args.framed_listen, args.chunk)
        self.masks = {a: 0, b: 0}
        self.closed = False
        for sock in (a, b):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_ready(self, sock: socket.socket | None = None, events: int = 0) -> None:
        """Pump the directions `sock`'s readiness `events` concern (both when sock is None); then close,
        or wait for what they want."""
        if self.closed:  # (closed by an earlier event of the same select)
            return
        ev_r, ev_w = selectors.EVENT_READ, selectors.EVENT_WRITE
        try:
            if sock is None or (sock is self.a and events & ev_r) or (sock is self.b and events & ev_w):
                self.up.pump()
            if sock is None or (sock is self.b and events & ev_r) or (sock is self.a and events & ev_w):
                self.down.pump()
        except OSError as exc:
            if exc.errno not in GONE:
                print(f"splice_relay: {exc!r}", file=sys.stderr)
            self.close()
            return
        if self.up.done and self.down.done:
            self.close()
            return
        self._watch(self.a, (ev_r if self.up.want_read else 0) | (ev_w if self.down.want_write else 0))
        self._watch(self.b, (ev_r if self.down.want_read else 0) | (ev_w if self.up.want_write else 0))

    def _watch(self, sock: socket.socket, mask: int) -> None:
        old = self.masks[sock]
        if mask == old:
            return
        if not old:
            self.sel.register(sock, mask, self)
        elif not mask:
            self.sel.unregister(sock)
        else:
            self.sel.modify(sock, mask, self)
        self.masks[sock] = mask

    def close(self) -> None:
        """Close both sockets and both pipes."""
        self.closed = True
        for sock in (self.a, self.b):
            if self.masks[sock]:
                self.sel.unregister(sock)
                self.masks[sock] = 0
            sock.close()
        self.up.close()
        self.down.close()


def serve(args: argparse.Namespace) -> None:
    """Accept on LISTEN, dial TARGET for each connection, relay until terminated."""
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", args.listen), backlog=128)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, events in sel.select():
            if key.data is not None:
                key.data.on_ready(key.fileobj, events)
                continue
            try:
                a, _ = listener.accept()
            except BlockingIOError:
                continue
            try:
                b = socket.create_connection(("127.0.0.1", args.target))  # loopback: dialled in place
            except OSError:
                a.close()
                continue
            Connection(sel, a, b, args).on_ready()


def main() -> None:
    """Parse the arguments and relay; on SIGTERM print what was moved."""
    parser = argparse.ArgumentParser(prog="bench.experiments.splice_relay")
    parser.add_argument("listen", type=int)
    parser.add_argument("target", type=int)
    parser.add_argument("--framed-listen", action="store_true", help="the accepted side carries frames")
    parser.add_argument("--framed-target", action="store_true", help="the target side carries frames")
    parser.add_argument("--chunk", type=int, default=1 << 20, help="largest framed payload (bytes)")
    args = parser.parse_args()

    def stop(_signum: int, _frame: object) -> None:
        mean = Stats.framed_bytes / Stats.frames if Stats.frames else 0
        print(
            f"splice_relay {args.listen}: {Stats.bytes} bytes, {Stats.frames} frames, {mean:.0f} B/frame",
            file=sys.stderr,
        )
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    serve(args)


if __name__ == "__main__":
    main()
