"""A loopback TCP proxy whose connections can be cut at once (a reset on both sides), for resume figures.

It stands for the network between a client and the router: `cut()` resets every connection it
carries (SO_LINGER 0, so both ends see ECONNRESET at once, as after a NAT or VPN drop that sends
resets) and keeps listening, so the client's reconnection goes through it again.
"""

from __future__ import annotations

import socket
import struct
import threading

#: SO_LINGER on, 0 seconds: close() sends a reset instead of a FIN.
_RESET = struct.pack("ii", 1, 0)


class CutProxy:
    """127.0.0.1:port -> 127.0.0.1:target_port, one thread per direction of each connection."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> CutProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(("127.0.0.1", self._target), timeout=10)
            except OSError:
                near.close()
                continue
            far.settimeout(None)
            for sock in (near, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open += [near, far]
            threading.Thread(target=_pump, args=(near, far), daemon=True).start()
            threading.Thread(target=_pump, args=(far, near), daemon=True).start()

    def cut(self) -> None:
        """Reset every connection now (the listener stays)."""
        with self._lock:
            socks, self._open = self._open, []
        for sock in socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop listening and reset everything."""
        self._listener.close()
        self.cut()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 20):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
