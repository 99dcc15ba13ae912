"""A long `osmo-net-client exec -- cat` round trip that a test breaks in the middle (issue 17).

`CatRoundTrip` feeds a random blob to the client's stdin from one thread and hashes its stdout
in another, so the test can wait (bounded) until some of the blob came back, break the path
(SIGKILL or SIGTERM a router), and then check that every byte came back, in order, with exit 0.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Sequence

from tests.harness import cli_env, client_cmd

MIB = 1024 * 1024


class CatRoundTrip:
    """`exec -- cat` with a blob through it; stdout hashed as it arrives."""

    def __init__(self, dial: Sequence[str], size: int = 64 * MIB, *, extra: Sequence[str] = ()) -> None:
        self.blob = os.urandom(size)
        self.proc = subprocess.Popen(
            client_cmd("exec", *dial, *extra, "--", "cat"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
            start_new_session=True,
        )
        self.received = 0
        self.stderr: list[str] = []
        self._digest = hashlib.sha256()
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._write, daemon=True),
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _write(self) -> None:
        assert self.proc.stdin is not None
        view = memoryview(self.blob)
        try:
            while view:
                written = os.write(self.proc.stdin.fileno(), view[: MIB // 4])
                view = view[written:]
            self.proc.stdin.close()
        except OSError:
            pass  # the client died: the test's assertions say so

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, MIB):
            with self._cond:
                self._digest.update(chunk)
                self.received += len(chunk)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._cond:
                self.stderr.append(raw.decode(errors="replace").rstrip())
                self._cond.notify_all()

    def wait_received(self, size: int, timeout: float = 60.0) -> None:
        """Wait until `size` bytes came back (raises if the client exits or it takes too long)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.received < size:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[1].is_alive()):
                    raise AssertionError(f"only {self.received} of {size} bytes came back; stderr: {self.stderr}")
                self._cond.wait(min(left, 0.5))

    def wait_stderr(self, text: str, timeout: float = 60.0) -> float:
        """Wait until a stderr line contains `text`; returns the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(text in line for line in self.stderr):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[2].is_alive()):
                    raise AssertionError(f"no stderr line with {text!r}; stderr: {self.stderr}")
                self._cond.wait(min(left, 0.5))
        return time.monotonic()

    def finish(self, timeout: float = 120.0) -> int:
        """The exit code once stdout is drained."""
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(30)
        return code

    @property
    def intact(self) -> bool:
        """True if exactly the blob came back."""
        return self.received == len(self.blob) and self._digest.digest() == hashlib.sha256(self.blob).digest()

    def stop(self) -> None:
        """Kill the client if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for thread in self._threads:
            thread.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
