"""A forwarded TCP socket's data path, both ways, without a task hop per message (issue 18).

`SocketReader` reads the socket into data-frame messages for the session stream (and sends them from
the socket's readiness callback while the stream takes them at once); `DirectSender` writes the data
frames the stream receives to the socket from the stream's data callback. The agent's and the
client's TCP pumps use both (agent/forward.py, client/forward_tcp.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import select
import socket
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

from osmo_router.h2.front import socket_lane
from osmo_router.io.buffers import finish, new_message
from osmo_router.io.send_buffer import LOCAL_SNDBUF, bound_send_buffer
from osmo_router.transport import SessionStream
from osmo_router.wire.codec import BULK_PAYLOAD, data_header, encode_data_message

log = logging.getLogger(__name__)

#: What SocketReader reads first into a buffer of its own (see SocketReader._read_now).
SMALL_READ: Final = 1024
#: The forward pumps' largest read (wire/codec.py BULK_PAYLOAD: one whole HTTP/2 frame).
BULK_READ: Final = BULK_PAYLOAD
#: SO_RCVBUF asked for the local application's socket (the kernel doubles it: about 1 MiB of queue).
#: Without it TCP autotuning lets a fast local sender (iperf3) queue 1.3-3.6 MiB per connection
#: before us, 10-30 MiB under -P 8, all of it cache-cold by the time we copy it out; bounded here,
#: -P 8 costs about 8% less CPU per byte over the three processes (docs/bench/NOTES.md, probe74).
#: 256 KiB was too small: messages shrink and the per-message work takes the gain back. The local
#: socket is the container's loopback on the agent (agent/forward.py forwards to nothing else) and the
#: user's own machine on the client, so a fixed buffer costs no throughput; a peer that reaches a
#: client's --address over a long link is held to about 1 MiB per round trip (20 MB/s at 50 ms).
LOCAL_RCVBUF: Final = 512 * 1024
#: `data_header(n)` for every size a first read can give: looked up, not built, per small message.
_SMALL_HEADERS: Final = tuple(data_header(n) for n in range(SMALL_READ + 1))


class SocketReader:
    """`loop.sock_recv` for one pump that reads a socket again and again, without the per-read churn.

    `loop.sock_recv` registers the socket with the selector before each wait and removes it after
    each read: two epoll_ctl calls and the selector's bookkeeping per message, on the path of every
    forwarded round trip. This reader stays registered while its pump waits for data again; only
    readiness that comes while nobody waits (the pump is busy sending) unregisters it, so a socket
    with data nobody takes yet never spins the loop. `close` must run before the socket is closed.

    On uvloop a readiness that comes with an error or hang-up (the peer reset the connection just
    after its last data) is the registration's last callback: libuv stops watching the descriptor
    after it. So each callback there asks the socket (poll, no wait) whether it is in that state;
    once it is, the reader reads on to the error or EOF instead of waiting for another readiness.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        with contextlib.suppress(OSError):  # (where refused the kernel's autotuning stays: no worse)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LOCAL_RCVBUF)  # see LOCAL_RCVBUF
        bound_send_buffer(sock, LOCAL_SNDBUF)  # (on a short link only: io/send_buffer.py)
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._waiter: asyncio.Future[None] | None = None
        self._registered = False
        self._unclaimed = False
        self._fionread = True
        self._count = bytearray(4)  # FIONREAD's answer (a C int)
        self._small = bytearray(SMALL_READ)  # where every read starts (see _read_now)
        self._small_view = memoryview(self._small)  # (a message is its header + a slice of this: one copy)
        self._error: OSError | None = None  # met after a first part was read: raised by the next read
        self._emptied = False  # the last read took less than asked: the socket had no more then
        #: The payload size of the message _read_now made last: that of the message recv_data_message
        #: returns (one handed by _send_now included: nothing reads between). Resume numbers by it.
        self._units = 0
        #: While `send_all` waits: the stream's try_send_data_message(message, units) and the message size
        #: (see _send_now).
        self._direct: tuple[Callable[[bytes, int], bool], int] | None = None
        self._handed: bytes | OSError | None = None  # what _send_now read and could not send: the pump's
        #: uvloop only (see the class docstring): asks whether the socket has an error or hung up.
        self._hang_up_check: select.poll | None = None
        if type(self._loop).__module__.startswith("uvloop"):
            self._hang_up_check = select.poll()
            self._hang_up_check.register(self._fd, select.POLLERR | select.POLLHUP)
        self._hung_up = False  # an error or hang-up was seen: read to the end without waiting
        #: What the readiness calls: `_ready`, or a native lane while `send_all` runs (h2/front.py).
        self._callback: Callable[[], None] = self._ready

    async def recv(self, size: int) -> bytes:
        """Up to `size` bytes, waiting until some came; b"" at the peer's EOF. Raises OSError.

        After a read that took less than asked (the socket was emptied), the next one waits for
        readiness first instead of trying a read that would fail: on a request/response stream that
        is one system call and one exception less per message.
        """
        while True:
            if self._may_hold_more():
                try:
                    data = self.sock.recv(size)
                except (BlockingIOError, InterruptedError):
                    pass
                else:
                    self._emptied = len(data) < size
                    return data
            await self._readable()

    async def send_all(self, stream: SessionStream, size: int) -> None:
        """Send what the socket gives as data frames of up to `size` bytes until its EOF. Raises OSError.

        On a raw stream each frame message is read in place (`recv_data_message`): the payload is
        not copied again to put the message's header in front of it. A stream that can send without
        waiting (`try_send_data_message`) is sent to straight from the socket's readiness callback
        while this pump waits (`_send_now`): the pump wakes only for what has to wait.
        """
        if not stream.raw:
            while chunk := await self.recv(size):
                await stream.send_data(chunk)
            return
        try_send = getattr(stream, "try_send_data_message", None)
        self._direct = None if try_send is None else (try_send, size)
        lane = None
        if try_send is not None:
            lane = socket_lane(self, stream, self._native_sent, self._hang_up_check is not None)
            self._use_callback(lane)
        try:
            while message := await self.recv_data_message(size):
                if try_send is None or not try_send(message, self._units):
                    await stream.send_data_message(message)
                elif not self._emptied:
                    # The read filled the message and the socket may hold more: without this the loop
                    # would read and send it without ever letting the event loop run other work.
                    await asyncio.sleep(0)
        finally:
            self._direct = None
            if lane is not None:
                self._use_callback(None)
                log.debug("forwarded socket done; %d reads went to the stream by the native front", lane.sent)

    def _use_callback(self, lane: Callable[[], None] | None) -> None:
        """The readiness callback from now on: a native lane (h2/front.py), or `_ready` (None). A
        registration in place is dropped (the next wait registers the new callback): re-registering in
        place fails on uvloop once the descriptor's error event closed its watcher."""
        self._callback = lane or self._ready
        self._unregister()

    def hand(self, item: bytes | OSError, units: int, emptied: bool) -> None:
        """What a native lane read and did not send (a large read, EOF, an error): the pump's, as
        `_send_now` hands what it could not send."""
        self._handed, self._units, self._emptied = item, units, emptied
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _native_sent(self, units: int) -> None:
        """A native lane read `units` bytes (less than it asked) and sent them: as `_read_now` leaves it."""
        self._emptied = True
        self._units = units

    async def recv_data_message(self, size: int) -> bytes:
        """Up to `size` bytes as an encoded data-frame message (`encode_data_message` of them), waiting
        until some came; b"" at the peer's EOF. Raises OSError.

        How much is waiting (FIONREAD) sizes the message, allocated once with its header in front;
        the socket's bytes are read straight after the header.
        """
        while True:
            handed = self._handed
            if handed is not None:
                self._handed = None
                if isinstance(handed, OSError):
                    raise handed
                return handed
            if self._may_hold_more():
                message = self._read_now(size)
                if message is not None:
                    return message
            await self._readable()

    def _read_now(self, size: int) -> bytes | None:
        """`recv_data_message` if the socket has something (data, EOF or an error); None if it would block.

        The first SMALL_READ bytes go to the reader's own small buffer: a small message (a request,
        a keystroke) is then whole without asking the socket how much waits (FIONREAD: a system
        call per message); only a read that fills it asks, and reads the rest in place behind it.
        """
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        first = SMALL_READ if size >= SMALL_READ else size
        try:
            got = self.sock.recv_into(self._small, first)
        except (BlockingIOError, InterruptedError):
            return None
        if got < first:
            self._emptied = True
            self._units = got
            return _SMALL_HEADERS[got] + self._small_view[:got] if got else b""
        length = min(got + self._waiting(), size)
        self._emptied = length < size
        if length == got:
            self._units = got
            return _SMALL_HEADERS[got] + self._small_view[:got]
        return self._read_message(length, got)

    def _send_now(self) -> bool:
        """The socket is readable while the pump waits: read and send here; True if the pump may go on
        waiting, False if it must wake for what was read (it could not be sent at once, or EOF, or an
        error: handed to it as `recv_data_message`'s result, so nothing is lost or reordered)."""
        assert self._direct is not None
        try_send, size = self._direct
        try:
            message = self._read_now(size)
        except OSError as err:
            self._handed = err
            return False
        if message is None:
            return True  # (a stale readiness: nothing to read after all)
        if message and try_send(message, self._units):
            return True
        self._handed = message
        return False

    def _may_hold_more(self) -> bool:
        """False when the last read emptied the socket and no readiness came since: wait before reading."""
        return self._hung_up or not (self._emptied and self._registered and not self._unclaimed)

    def _waiting(self) -> int:
        """Bytes the socket holds unread (0 where FIONREAD is not supported)."""
        if not self._fionread:
            return 0
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, self._count)
        except OSError:
            self._fionread = False
            return 0
        return int.from_bytes(self._count, sys.byteorder, signed=True)

    def _read_message(self, length: int, got: int) -> bytes:
        """A message of `length` payload bytes: the `got` in the small buffer, then the rest read in place."""
        header = data_header(length)
        holder, view = new_message(len(header) + length)
        start = len(header)
        view[:start] = header
        view[start : start + got] = self._small[:got]
        try:
            more = self.sock.recv_into(view[start + got :])
        except (BlockingIOError, InterruptedError):
            more = 0
        except OSError as err:
            self._error = err  # raised by the next read: what was read first goes out before it
            more = 0
        if got + more == length:  # (FIONREAD's count is there: always, on a stream socket nobody else reads)
            self._units = length
            return finish(holder)
        self._emptied = False
        self._units = got + more
        return encode_data_message(bytes(view[start : start + got + more]))

    async def _readable(self) -> None:
        """Until the socket may be read (staying registered for the next wait; see the class docstring)."""
        self._emptied = False
        self._waiter = self._loop.create_future()
        self._unclaimed = False
        if not self._registered:
            self._loop.add_reader(self._fd, self._callback)
            self._registered = True
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _ready(self) -> None:
        check = self._hang_up_check
        if check is not None and not self._hung_up and check.poll(0):
            self._hung_up = True  # this callback is the registration's last: the pump reads on by itself
        if self._waiter is not None:
            if not self._waiter.done() and (self._hung_up or self._direct is None or not self._send_now()):
                self._waiter.set_result(None)
            # (else the pump was woken already and reads in this loop iteration)
        elif self._unclaimed:
            # Readable twice with nobody reading: the pump is busy; it re-registers when it waits again.
            self._unregister()
        else:
            # Often a stale event, queued before the pump's read in the same loop iteration took the data.
            self._unclaimed = True

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        """Stop watching the socket (before it is closed: the selector must not hold a closed descriptor)."""
        self._unregister()


class DirectSender:
    """Data frames to a socket straight from where they arrive: a session stream's sink.

    Given to `ResumableStream.set_sink` by a pump that writes each received data frame to a socket,
    `offer` sends the frame at once from the stream's data callback, so the pump is not woken for
    it. What the socket does not take at once is sent by a task of its own, and `offer` declines
    everything until that is done (those frames go to the pump, which waits in `flushed` first:
    order is kept, and a full socket holds back the pump as before). A send error makes `offer`
    decline, so the pump meets the error on its next send; an error sending a rest goes to `on_error`.

    The native front (h2/front.py, `_front.c`) does what `offer_data` does from C, reading `sock`,
    `enabled` and `_rest`, and calling `send_later`: keep those names.
    """

    def __init__(self, sock: socket.socket, on_error: Callable[[OSError], Awaitable[None]]) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._on_error = on_error
        self._rest: asyncio.Task[None] | None = None
        #: Whether frames are taken (the pump clears it once it stops delivering).
        self.enabled = True
        #: The longest a rest took to go out (seconds): the local application's slowest take.
        self.longest = 0.0

    def offer(self, frame: Any) -> bool:
        """Send a data frame now; False, with nothing done, for anything else or when disabled or busy."""
        if frame.WhichOneof("kind") != "data":
            return False
        return self.offer_data(frame.data)

    def offer_data(self, data: bytes | memoryview) -> bool:
        """Send a data frame's payload now; False, with nothing done, when disabled or busy."""
        if not self.enabled or self._rest is not None:
            return False
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False  # the pump meets the error again on its own send
        if sent < len(data):
            self.send_later(memoryview(data)[sent:])
        return True

    def send_later(self, rest: bytes | memoryview) -> None:
        """Send what the socket did not take at once, from a task (`offer_data` declines until it is done;
        the native front, h2/front.py, calls it for the rest of a message it sent)."""
        self._rest = self._loop.create_task(self._send_rest(memoryview(rest)))

    async def _send_rest(self, rest: memoryview) -> None:
        started = time.monotonic()
        try:
            await self._loop.sock_sendall(self.sock, rest)
        except OSError as err:
            await self._on_error(err)
        finally:
            self.longest = max(self.longest, time.monotonic() - started)
            self._rest = None

    @contextlib.contextmanager
    def serving(self, stream: Any) -> Iterator[None]:
        """Be `stream`'s sink (ResumableStream.set_sink) while the block runs, where it takes one."""
        set_sink = getattr(stream, "set_sink", None)
        set_direct_sender = getattr(stream, "set_direct_sender", None)
        if set_sink is not None:
            set_sink(self.offer, self.offer_data)
            if set_direct_sender is not None:
                set_direct_sender(self)
        try:
            yield
        finally:
            if set_sink is not None:
                set_sink(None)
                if set_direct_sender is not None:
                    set_direct_sender(None)

    async def flushed(self) -> None:
        """Until what `offer` began is sent (the pump calls it before each send of its own)."""
        if self._rest is not None:
            await asyncio.shield(self._rest)

    async def close(self) -> None:
        """Stop: take nothing more, drop a rest still being sent."""
        self.enabled = False
        rest = self._rest
        if rest is not None:
            rest.cancel()
            await asyncio.gather(rest, return_exceptions=True)
