"""This process's signals sent as frames of its exec session: forwarded, a hang-up, a window resized."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable

from osmo_router.client.resume import give_up
from osmo_router.client.terminal import terminal_size
from osmo_router.transport import SessionStream
from osmo_router.wire.protocol import pb

#: Signals a pipe-mode client forwards to the remote process group (a second one exits locally).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: Signals that end a TTY client (its terminal closed, or it was told to stop): as ssh, the session
#: is hung up, not left for the agent to hold for its resume grace (Ctrl-] d is how to leave it running).
HANG_UP_SIGNALS = (signal.SIGHUP, signal.SIGTERM)


class SignalFrames:
    """This process's signals sent as frames while a session runs: a TTY's SIGWINCH as a resize,
    else FORWARDED_SIGNALS (the second of one kind ends this process at once, 128 + its number)."""

    def __init__(self, stream: SessionStream, tty: bool, detach_on_hang_up: bool = False) -> None:
        self._stream = stream
        self._detach_on_hang_up = detach_on_hang_up
        self._loop = asyncio.get_running_loop()
        self._received: dict[int, int] = {}
        self._pending: set[asyncio.Future[None]] = set()
        self._installed: list[int] = []
        #: The signal that ended a TTY session from here (HANG_UP_SIGNALS), 0 while none did.
        self.hung_up = 0
        if tty:
            self._loop.add_signal_handler(signal.SIGWINCH, self._on_resize)
            self._installed.append(signal.SIGWINCH)
            for sig in HANG_UP_SIGNALS:
                self._loop.add_signal_handler(sig, self._on_hang_up, int(sig))
                self._installed.append(sig)
        else:
            for sig in FORWARDED_SIGNALS:
                self._loop.add_signal_handler(sig, self._on_signal, int(sig))
                self._installed.append(sig)

    def remove(self) -> None:
        """Give the signals back to their default handling."""
        for number in self._installed:
            self._loop.remove_signal_handler(number)
        self._installed.clear()

    def send(self, sig: int) -> None:
        """Send the remote command `sig` (soon: this returns at once)."""
        self._send_soon(pb.Frame(signal=pb.Signal(number=sig)))

    def _send_soon(self, frame: pb.Frame) -> None:
        self._soon(self._stream.send(frame))

    def _soon(self, work: Awaitable[None]) -> None:
        """Run `work` from a signal handler, kept referenced until it is done."""
        future = asyncio.ensure_future(work)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def _on_signal(self, sig: int) -> None:
        from osmo_router.client.notice import say
        from osmo_router.client.resume import ResumingStream

        self._received[sig] = self._received.get(sig, 0) + 1
        resuming = isinstance(self._stream, ResumingStream) and not self._stream.connected
        if self._received[sig] > 1:
            if resuming:  # (os._exit below: nothing else would tell that the command runs on meanwhile)
                say("left while resuming: the agent ends the command once its resume grace passes")
            os._exit(128 + sig)
        if resuming:
            say(f"the connection is down: {signal.Signals(sig).name} reaches the command once the session "
                "resumes (again to leave at once)")  # fmt: skip
        self.send(sig)

    def _on_hang_up(self, sig: int) -> None:
        if self.hung_up:
            os._exit(128 + sig)  # a second one while the agent is being told: leave now
        self.hung_up = sig
        self._soon(self._hang_up(sig))

    async def _hang_up(self, sig: int) -> None:
        from osmo_router.client.resume import ResumingStream

        stream = self._stream
        if self._detach_on_hang_up and isinstance(stream, ResumingStream) and await stream.detach():
            return
        await give_up(stream, "the client's terminal hung up" if sig == signal.SIGHUP else "the client was terminated")

    def _on_resize(self) -> None:
        rows, cols = terminal_size()
        self._send_soon(pb.Frame(resize=pb.Resize(size=pb.TerminalSize(rows=rows, cols=cols))))


__all__ = ["FORWARDED_SIGNALS", "HANG_UP_SIGNALS", "SignalFrames"]
