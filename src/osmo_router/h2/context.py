"""The ServicerContext the native server hands to grpc handlers (what grpc.aio's offers, on an h2 Stream)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import grpc

from osmo_router.h2 import grpc as g
from osmo_router.h2.stream import Stream, StreamReset

Deserializer = Callable[[bytes], Any] | None
Serializer = Callable[[Any], bytes] | None

#: grpc.StatusCode by its number.
CODES = {code.value[0]: code for code in grpc.StatusCode}


def peer_string(address: Any) -> str:
    """A socket address as gRPC prints peers: "ipv4:127.0.0.1:PORT", "ipv6:[::1]:PORT"."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{address}" if address else "unknown"


class NativeContext(grpc.aio.ServicerContext[Any, Any]):  # type: ignore[misc]  # grpc ships no stubs
    """One call's context: reads and writes go straight to its HTTP/2 stream."""

    def __init__(
        self,
        stream: Stream,
        deserializer: Deserializer,
        serializer: Serializer,
        deadline: float | None,
        auth: Mapping[str, Iterable[bytes]] | None = None,
    ) -> None:
        self._stream = stream
        self._deserializer = deserializer
        self._serializer = serializer
        self._deadline = deadline
        self._auth = auth or {}
        self._metadata = g.metadata_of(stream.headers or ())
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._done_callbacks: list[Callable[[Any], None]] = []
        self.cancelled_by_peer = False
        self.finished = False
        self._listener: Callable[[bytes], bool] | None = None

    # -- messages -------------------------------------------------------------------------------------

    async def read(self) -> Any:
        """The next request, or grpc.aio.EOF once the client half-closed or went away (as grpc.aio does:
        a read that fails returns EOF; the handler itself is cancelled when its client goes away)."""
        try:
            message = await self._stream.read()
        except StreamReset:
            return grpc.aio.EOF
        if message is None:
            return grpc.aio.EOF
        if self._stream.compressed_received:
            await self.abort(
                grpc.StatusCode.UNIMPLEMENTED if self._encoded() else grpc.StatusCode.INTERNAL,
                "compressed messages are not supported" if self._encoded() else "compressed flag without grpc-encoding",
            )
        return self._deserializer(message) if self._deserializer is not None else message

    def _encoded(self) -> bool:
        return any(k == "grpc-encoding" and v != "identity" for k, v in self._stream.headers or ())

    async def requests(self) -> AsyncIterator[Any]:
        """The request iterator handed to streaming-request handlers."""
        while (request := await self.read()) is not grpc.aio.EOF:
            yield request

    def _ensure_headers(self, metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        if not self._stream.headers_sent:
            self._stream.send_headers([*g.RESPONSE_HEADERS, *g.encode_metadata(metadata)])

    async def write(self, message: Any) -> None:
        """Send one response (waits while the client's window is closed)."""
        self._ensure_headers()
        data = self._serializer(message) if self._serializer is not None else message
        await self._stream.write(data)

    def more_queued(self) -> bool:
        """Whether another request has already arrived (the next `read` returns without waiting for one)."""
        return self._stream.more_queued()

    def set_listener(self, listener: Callable[[bytes], bool] | None) -> None:
        """Offer each request to `listener(message)` as it arrives, while nothing is queued for `read`
        before it and nothing more arrived behind it in the same read (a burst is left to `read`,
        whose reader can merge it): True means it took it (Stream.set_listener). Only without a
        deserializer; a compressed request is always left to `read`, which refuses it."""
        self._listener = listener if self._deserializer is None else None
        self._stream.set_listener(None if self._listener is None else self._offer)

    def _offer(self, message: bytes) -> bool:
        stream, listener = self._stream, self._listener
        if listener is None or stream.compressed_received or stream.conn.input_pending():
            return False
        return listener(message)

    def use_budgets(self, budgets: tuple[Any, ...]) -> None:
        """Count what the request stream holds and may receive in these byte budgets (Stream.use_budgets)."""
        self._stream.use_budgets(budgets)

    def try_write(self, message: bytes) -> bool:
        """Send one encoded response at once if it can all go out now (headers sent, no serializer,
        nothing queued, windows open); False with nothing done otherwise (then use `write`)."""
        if self._serializer is not None:
            return False
        return self._stream.try_write(message)

    def try_write_framed(self, framed: memoryview) -> bool:
        """`try_write` of a response already framed (its gRPC prefix first), as a request stream received it."""
        if self._serializer is not None:
            return False
        return self._stream.try_write_framed(framed)

    def framed_writer(self) -> Callable[[memoryview], bool] | None:
        """`try_write_framed` as the stream's own method (no serializer: fixed for the call), or None with
        a serializer: the relay calls it once per message, one call layer less (issue 18)."""
        return self._stream.try_write_framed if self._serializer is None else None

    def set_passthrough(self, passthrough: Callable[[memoryview], bool] | None) -> None:
        """Offer each request that arrives whole and alone to `passthrough` as received, prefix included
        (Stream.set_passthrough). Only without a deserializer."""
        self._stream.set_passthrough(passthrough if self._deserializer is None else None)

    async def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Send the response headers now, with this metadata."""
        self._ensure_headers(initial_metadata)

    # -- status -----------------------------------------------------------------------------------------

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        """End the call with this status: raises, and the server sends the status when the handler unwinds."""
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError(details)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        """abort() with a grpc.Status."""
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status to end with when the handler returns."""
        self._code = code

    def set_details(self, details: str) -> None:
        """The status message to end with."""
        self._details = details

    def code(self) -> grpc.StatusCode:
        """The status set so far."""
        return self._code or grpc.StatusCode.OK

    def details(self) -> str:
        """The status message set so far."""
        return self._details or ""

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Metadata to send with the status."""
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        """The trailing metadata set so far."""
        return self._trailing

    def status(self) -> tuple[int, str, Sequence[tuple[str, str | bytes]]]:
        """(code number, details, trailing metadata) to send."""
        code = self._code or grpc.StatusCode.OK
        return code.value[0], self._details or "", self._trailing

    # -- the call -----------------------------------------------------------------------------------------

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The client's metadata (`-bin` values as bytes)."""
        return self._metadata

    def peer(self) -> str:
        """The client's address, as grpc prints it."""
        return peer_string(self._stream.conn.peer_address)

    def peer_identities(self) -> Iterable[bytes] | None:
        """The client certificate's names (mutual TLS), else None."""
        names = self._auth.get("x509_common_name")
        return list(names) if names else None

    def peer_identity_key(self) -> str | None:
        """ "x509_common_name" when the client presented a certificate."""
        return "x509_common_name" if self._auth.get("x509_common_name") else None

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        """transport_security_type and the client certificate's names, as grpc reports them."""
        return self._auth

    def set_compression(self, compression: grpc.Compression) -> None:
        """Compression is not supported: responses go uncompressed."""

    def disable_next_message_compression(self) -> None:
        """Nothing to disable."""

    def time_remaining(self) -> float:
        """Seconds to the deadline (a large number when there is none)."""
        if self._deadline is None:
            return float(2**31)
        return max(0.0, self._deadline - time.monotonic())

    def cancelled(self) -> bool:
        """Whether the client cancelled (reset the stream or went away)."""
        return self.cancelled_by_peer

    def done(self) -> bool:
        """Whether the call is over."""
        return self.finished

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call callback(context) once the call is over."""
        if self.finished:
            asyncio.get_running_loop().call_soon(callback, self)
        else:
            self._done_callbacks.append(callback)

    def finish(self) -> None:
        """The call is over: run the done callbacks."""
        self.finished = True
        callbacks, self._done_callbacks = self._done_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # a callback's failure must not break the server
                continue


__all__ = ["CODES", "NativeContext", "StreamReset", "peer_string"]
