"""The handshake and the connection's control frames: the client preface, SETTINGS both ways, PING."""

from __future__ import annotations

from osmo_router.h2 import frames as fr
from osmo_router.h2.bdp import BDP_PING
from osmo_router.h2.flow import FlowControl


def settings_first() -> fr.ProtocolError:
    """The error for a frame that came before the peer's SETTINGS (its preface ends with one)."""
    return fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")


class Handshake(FlowControl):
    """Preface, SETTINGS and PING (a part of Connection)."""

    def _opening_frames(self) -> list[bytes]:
        """Our preface (client), SETTINGS and the connection window's opening WINDOW_UPDATE."""
        config = self.config
        settings = {
            fr.SETTINGS_INITIAL_WINDOW_SIZE: config.initial_window,
            fr.SETTINGS_MAX_FRAME_SIZE: config.max_frame_size,
            fr.SETTINGS_MAX_HEADER_LIST_SIZE: config.max_header_list_size,
        }
        if self.role == "server":
            settings[fr.SETTINGS_MAX_CONCURRENT_STREAMS] = config.max_concurrent_streams
        else:
            settings[fr.SETTINGS_ENABLE_PUSH] = 0
        out = [fr.encode_settings(settings)]
        if self.role == "client":
            out.insert(0, fr.PREFACE)
        if config.connection_window > fr.DEFAULT_WINDOW:
            out.append(fr.window_update(0, config.connection_window - fr.DEFAULT_WINDOW))
        return out

    def _on_settings(self, frame: fr.Frame) -> None:
        if frame.flags & fr.ACK:
            return
        for key, value in fr.decode_settings(frame.payload):
            if key == fr.SETTINGS_INITIAL_WINDOW_SIZE:
                delta, self._peer_window = value - self._peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == fr.SETTINGS_MAX_FRAME_SIZE:
                self._peer_max_frame = value
            elif key == fr.SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif key == fr.SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value
        self.write_frame(fr.encode(fr.SETTINGS, fr.ACK, 0))
        if not self._settings_received:
            self._settings_received = True
            self._timers.handshake_done()
            if not self._ready.done():
                self._ready.set_result(None)
        self._flush_blocked()
        self._wake_slot_waiters()

    def _on_ping(self, frame: fr.Frame) -> None:
        if frame.flags & fr.ACK:
            payload = bytes(frame.payload)
            if payload == BDP_PING and self._bdp is not None:
                grown = self._bdp.on_ack()
                if grown is not None:
                    self._grow_windows(grown)
                return
            self._timers.ping_acked(payload)
            return
        if self._timers.ping_received():
            self.write_frame(fr.encode(fr.PING, fr.ACK, 0, frame.payload))
