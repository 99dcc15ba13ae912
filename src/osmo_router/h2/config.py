"""Settings of one HTTP/2 connection (both roles)."""

from __future__ import annotations

from dataclasses import dataclass

#: Per-stream receive window: what a stream whose reader stalls can make us hold (plus one message).
DEFAULT_STREAM_WINDOW = 2 * 1024 * 1024
#: Largest the stream window grows to on a long, fast link (h2/bdp.py; 16 MiB, as grpc's own limit).
DEFAULT_MAX_STREAM_WINDOW = 16 * 1024 * 1024
#: Receive window for a whole connection, given back on receipt (so one stalled stream blocks no other).
DEFAULT_CONNECTION_WINDOW = 64 * 1024 * 1024


@dataclass(frozen=True)
class H2Config:
    """What a connection advertises and enforces. Times in seconds; 0 turns a timer off."""

    #: Our receive window per stream (SETTINGS_INITIAL_WINDOW_SIZE), given back as messages are read.
    stream_window: int = DEFAULT_STREAM_WINDOW
    #: What a stream starts with (SETTINGS_INITIAL_WINDOW_SIZE; 0: `stream_window`). Smaller, a stream
    #: grows to `stream_window` only once given byte budgets that have room (Stream.use_budgets), so
    #: what streams not yet counted can make us hold is this much each (plus one message).
    initial_stream_window: int = 0
    #: The stream window grows up to this while the link's bandwidth-delay product calls for it
    #: (h2/bdp.py); at or below `stream_window` it never grows.
    max_stream_window: int = DEFAULT_MAX_STREAM_WINDOW
    #: Our receive window for the whole connection, given back on receipt.
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    #: Largest frame we accept (SETTINGS_MAX_FRAME_SIZE): big frames cost the peer fewer writes.
    max_frame_size: int = 1024 * 1024
    max_header_list_size: int = 64 * 1024
    #: Server role: fields one request's headers may have (0: no limit); past it the stream is refused
    #: (RST_STREAM ENHANCE_YOUR_CALM). Each costs about 155 bytes of Python objects whatever its size.
    max_header_fields: int = 0
    #: Server role: what streams not yet counted in any byte budget (before their session pairs) may hold,
    #: their initial window, request headers and a message past the window: per connection and over all
    #: the server's connections (h2/credit.py UncountedCharge; past it a new stream is refused,
    #: REFUSED_STREAM, and a large message waits). 0: no bound.
    max_uncounted_per_connection: int = 0
    max_uncounted_total: int = 0
    #: Streams the peer may have open at once (server role; past it, RST_STREAM REFUSED_STREAM).
    max_concurrent_streams: int = 2**31 - 1
    #: Largest gRPC message we accept (past it, RESOURCE_EXHAUSTED).
    max_message_size: int = 4 * 1024 * 1024
    #: Our keepalive pings: one after `keepalive_time` without an ack; close if none in `keepalive_timeout`.
    keepalive_time: float = 0.0
    keepalive_timeout: float = 20.0
    #: The peer's pings closer together than this are strikes (the third: GOAWAY ENHANCE_YOUR_CALM);
    #: strikes are forgiven whenever we send HEADERS or DATA, as in grpc.
    min_ping_interval: float = 0.0
    #: Server role: streams the peer may reset (RST_STREAM before they ended) per second, in bursts of
    #: ten seconds' worth; past it GOAWAY ENHANCE_YOUR_CALM (HTTP/2 rapid reset, CVE-2023-44487). 0: no limit.
    max_peer_resets_per_second: float = 200.0
    #: From accept to the peer's preface and SETTINGS.
    handshake_timeout: float = 0.0
    #: Server role: GOAWAY after this long without a stream.
    max_connection_idle: float = 0.0
    #: Server role: GOAWAY after this age, then close after the grace.
    max_connection_age: float = 0.0
    max_connection_age_grace: float = 0.0

    @property
    def initial_window(self) -> int:
        """The window a stream starts with (SETTINGS_INITIAL_WINDOW_SIZE)."""
        return self.initial_stream_window or self.stream_window
