"""A resumable exec session that is lost hangs up its process, even one that never reads its input.

The agent's input pump writes the client's stdin to the process; a process that never reads it
(`sleep`) leaves the pump blocked in that write once the pipe is full. When the session was then lost
(its client gone for longer than the resume grace), only the pump's next read would have seen it, so
the process ran on for good, holding what was queued for it (a leak per abandoned session). The
agent now also waits for the loss itself.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import time

from tests.harness import AgentProc, Router, cli_env, client_cmd

WAIT = 30.0


def alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # (gone before the open, or between open and read: ci80)
        return False


def stdin_queued(pid: int) -> int:
    """Bytes waiting in a process's stdin pipe (the pipe opened again through /proc, and asked)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        count = bytearray(4)
        fcntl.ioctl(fd, termios.FIONREAD, count)
        return int.from_bytes(count, sys.byteorder)
    finally:
        os.close(fd)


def test_a_lost_session_hangs_up_a_process_that_never_reads_its_input(workflow: str) -> None:
    router = Router()
    agent = AgentProc(router.address, workflow, "--resume-grace", "2")  # how long it holds a session
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    client = subprocess.Popen(
        client_cmd("exec", *args, "--", "sh", "-c", "echo $$; exec sleep 300"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
        start_new_session=True,
    )
    assert client.stdin is not None and client.stdout is not None
    pid = 0
    try:
        pid = int(client.stdout.readline())
        assert alive(pid)

        def feed() -> None:  # far more than the pipe and the windows hold: the agent's write blocks
            try:
                client.stdin.write(b"x" * (8 << 20))  # type: ignore[union-attr]
                client.stdin.flush()  # type: ignore[union-attr]
            except (BrokenPipeError, ValueError):
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = time.monotonic() + WAIT
        while stdin_queued(pid) < 65536 and time.monotonic() < deadline:
            time.sleep(0.05)  # (polling the pipe: the agent's write blocks once it is full)
        assert stdin_queued(pid) >= 65536, "the process's input never filled up"
        os.killpg(client.pid, signal.SIGKILL)  # the client is gone: nothing will resume the session
        client.wait(WAIT)
        agent.wait_for(lambda r: "session lost" in str(r.get("msg", "")), timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # (polling the process table: it has no event to wait for)
        assert not alive(pid), "the process of the lost session is still running"
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)
        agent.stop()
        router.stop()
