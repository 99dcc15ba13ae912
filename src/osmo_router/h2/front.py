"""The native data path (issue 18): a small message is passed on before any Python runs.

A redis GET through `port-forward` crosses six process turns (client, router, agent, each way); each
turn's Python before the write that wakes the next process is what separated the forward from a socat
hop (docs/bench/NOTES.md, "where a GET's round trip goes"). `_front.c` takes the common turns in C:

- `Front` is every HTTP/2 connection's get_buffer / buffer_updated. While the Python frame reader is
  between frames, a read goes into the process's one front buffer; a read that is exactly one whole
  DATA frame without flags, on a stream with a lane, is passed on from C: on an edge (the client and
  the agent) a `Lane` sends the data frame's payload to the forwarded socket its DirectSender serves;
  in the router a `RelayLane` writes the message, as it arrived, on the paired stream with a new frame
  header (what relay._Passing.through does). Anything else is copied into the reader, as before.
- `SocketLane` is a forwarded socket's readiness callback on an edge while its pump waits: a small
  read goes onto the session's stream as a data message (what SocketReader._send_now does).

C makes, before the write, every test the Python path would make, reading the same attributes (each
named in `_front.c` beside the Python that tests it); a missing attribute or an unexpected value
declines, and the Python path decides. The bookkeeping the Python path does before its write (windows,
BDP sample, budgets' exposure, counts, resume numbering and acknowledgements) runs right after the
write, in the lane's `after`: by then the next process is awake on the other core. So a lane never has
to be revoked by the events that close it (a reset, a busy handler, a full window, a resume): C only
declines while they hold. Control frames, bulk, TLS records split across reads and a resumed stream
take the Python path, in order.

Lanes are opened where the Python path sets up the direct hand-over it stands for: an edge's `Lane`
when a DirectSender starts serving a session stream (io/socket_pumps.py -> ResumableStream.set_direct_sender
-> FrameStream.open_lane -> h2 Call.open_lane -> Connection.open_lane) and again for each stream a resume
puts under it; a `SocketLane` when a socket pump starts sending (SocketReader.send_all); a `RelayLane`
once the router passed a stream's first message through in Python. They close with the stream.

The front is on when the extension was built (setup.py compiles it on install; a machine without a C
compiler installs without it, and everything takes the Python path) and `OSMO_NATIVE_FRONT` is not `0`
(scripts/test runs the forward, resume and exec end-to-end tests both ways).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from osmo_router.h2 import frames as fr
from osmo_router.h2.stream import StreamReset

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection
    from osmo_router.h2.reader import FrameReader
    from osmo_router.h2.stream import Stream

try:
    from osmo_router.h2 import _front
except ImportError:  # built without a C compiler: the Python path only
    _front = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Set to 0 to keep every message on the Python path.
ENV = "OSMO_NATIVE_FRONT"


def native_front_available() -> bool:
    """Whether connections get the native front (built, and not turned off by OSMO_NATIVE_FRONT=0)."""
    return _front is not None and os.environ.get(ENV, "1") != "0"


@dataclass(frozen=True, slots=True)
class LaneTarget:
    """Where a stream's data messages may go from C: a session stream of one generation and its sender."""

    #: The ResumableStream whose `_pushed_data` would take the messages (C tests its state per message).
    session: Any
    #: Its generation when the lane opened: a resume's new stream gets a lane of its own.
    generation: int
    #: The DirectSender it hands data frames to.
    sender: Any
    #: `consumed(size)`: the session's account of `size` payload bytes its handler took (acknowledgements).
    consumed: Callable[[int], None]


class NativeFront:
    """A connection's native front (`_front.Front`) and its lanes."""

    def __init__(self, conn: Connection, reader: FrameReader) -> None:
        self._conn = conn
        self._front = _front.Front(conn, reader)
        self.get_buffer = self._front.get_buffer
        self.buffer_updated = self._front.buffer_updated
        #: The open lanes by stream id (None: a stream a relay lane was looked for and not found).
        self.lanes: dict[int, Any] = self._front.lanes

    @property
    def passed(self) -> int:
        """Frames passed on in C so far."""
        return int(self._front.passed)

    def open_lane(self, stream: Stream, listener: Callable[[bytes], bool], target: LaneTarget | None) -> None:
        """Pass `stream`'s data messages to `target` from C while `listener` is its listener (None: close)."""
        if target is None:
            self._front.lanes.pop(stream.id, None)
            return
        after = functools.partial(self._passed, stream, target.consumed)
        self._front.lanes[stream.id] = _front.Lane(
            self._conn,
            stream,
            listener,
            target.session,
            target.generation,
            target.sender,
            after,
            self._conn.config.max_message_size,
        )

    def open_relay_lane(self, stream: Stream) -> None:
        """Pass `stream`'s messages on in C as its passthrough (the router's relay._Passing.through) does
        them, while that is its passthrough; called once the Python path passed one (the pair is up)."""
        through = stream._passthrough
        native_lane = getattr(getattr(through, "__self__", None), "native_lane", None)
        target = native_lane() if native_lane is not None else None
        if target is None:
            self.lanes[stream.id] = None  # (looked for once per stream)
            return
        queue, sink, framed = target
        out: Stream = framed.__self__
        passing = through.__self__  # type: ignore[union-attr]
        after = functools.partial(self._relayed, stream, passing, out)
        self.lanes[stream.id] = _front.RelayLane(
            self._conn,
            stream,
            through,
            passing,
            queue,
            sink,
            framed,
            out,
            out.conn,
            after,
            self._conn.config.max_message_size,
        )

    def close_lane(self, stream_id: int) -> None:
        """The stream is over."""
        self._front.lanes.pop(stream_id, None)

    def close(self) -> None:
        """The connection is lost: no lane is left (and none keeps its objects alive)."""
        self._front.lanes.clear()

    def _passed(self, stream: Stream, consumed: Callable[[int], None], flow: int, size: int) -> None:
        """C sent a frame's message (`flow` bytes of DATA, `size` of them payload): what the Python path counts
        for a message its listener took. Never raises (it runs inside the transport's read callback)."""
        conn = self._conn
        try:
            conn.count_received(flow)
            stream.taken_directly(flow)
        except fr.ProtocolError as err:  # (C checked the windows first: only a bug lands here)
            conn.fail(err.code, str(err))
        except StreamReset as err:
            stream.reset(err.code)
        except Exception:
            log.exception("h2 native front: bookkeeping failed; the connection is closed")
            conn.fail(fr.ErrorCode.INTERNAL_ERROR, "internal error")
        try:
            consumed(size)
        except Exception:
            log.exception("h2 native front: the session's acknowledgement failed")

    def _relayed(self, stream: Stream, passing: Any, out: Stream, flow: int, size: int) -> None:
        """C passed a frame's message (`flow` bytes of DATA, a `size`-byte message) on to `out`: what
        data_frame, Stream.pass_through, the relay and send_now count for one. Never raises."""
        conn = self._conn
        try:
            conn.count_received(flow)
            stream.taken_through(flow)
            out.conn.sent_natively(out, flow)
            passing.passed_natively(size)
        except fr.ProtocolError as err:  # (C checked the windows first: only a bug lands here)
            conn.fail(err.code, str(err))
        except Exception:
            log.exception("h2 native front: bookkeeping of a relayed message failed; the connection is closed")
            conn.fail(fr.ErrorCode.INTERNAL_ERROR, "internal error")


def native_front(conn: Connection, reader: FrameReader) -> NativeFront | None:
    """The front for a new connection, when available; else None (the reader's own methods)."""
    return NativeFront(conn, reader) if native_front_available() else None


def socket_lane(reader: Any, session: Any, sent: Callable[[int], None], hang_up_check: bool) -> Any:
    """The readiness callback that sends `reader`'s small reads on `session`'s HTTP/2 stream from C
    (a `_front.SocketLane`, falling back to `reader._ready`), or None: no native front on the connection,
    or a session that is not a ResumableStream over a batching raw FrameStream on an h2 call.

    C makes the checks of `ResumableStream.try_send_data_message` and the layers under it
    (BatchingWriter.try_write_single, Call.try_write_serialized, Stream.try_write,
    Connection.send_now) before it reads, reading no more than the windows and the replay buffer take;
    after the write, `after` counts what they count. A read that fills its buffer, EOF and errors go to
    the pump (`reader.hand`). A resume puts a new stream under the session: from then on this
    socket's reads take the Python path (C sees the stream under it changed)."""
    if _front is None or not native_front_available() or not hasattr(session, "held_after_send"):
        return None
    inner = getattr(session, "_inner", None)
    direct_data_sender = getattr(inner, "direct_data_sender", None)
    writer: Any = getattr(inner, "writer", None)
    call: Any = getattr(inner, "call", None)
    stream: Any = getattr(call, "_stream", None)
    conn: Any = getattr(stream, "conn", None)
    if direct_data_sender is None or direct_data_sender() is None or getattr(conn, "_front", None) is None:
        return None

    def after(message: bytes, units: int, length: int) -> None:
        try:
            conn.sent_natively(stream, length)
            writer.count_direct()
            session.held_after_send(message, units)
            sent(units)
        except Exception:  # (it runs in the readiness callback: nothing may escape)
            log.exception("h2 native front: bookkeeping of a sent message failed")

    return _front.SocketLane(
        reader,
        session,
        inner,
        writer,
        call,
        stream,
        conn,
        session.buffer,
        reader._ready,
        reader.hand,
        after,
        reader.sock.fileno(),
        hang_up_check,
    )
