"""A reader that only takes a trickle (4 KiB every half second, for ever) is ended like a stalled one.

Real router and agent processes: a client runs `exec cat /dev/zero` and its output is taken 4 KiB at a
time. Its session is not resumable (`--resume-grace 0`), so what it does not read waits in the router
(a resumable one is paced by its acknowledgements and the router holds nothing for it:
tests/e2e/test_unread_stdout_e2e.py). With `--flow-control-timeout 3s`, the router ends the session
with RESOURCE_EXHAUSTED (the write that the trickle never completes, or the minimum drain rate
over a period that was all backlog), frees what it queued for it, and another user's session goes on
meanwhile. The minimum drain rate on its own, with a reader whose every write completes, is covered
in tests/unit/test_write_watchdog.py.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness import AgentProc, Router, cli_env, client_cmd, metric_value, run_client

WF = "wf-trickle"
TIMEOUT = 3.0


@pytest.fixture
def router() -> Iterator[Router]:
    proc = Router("--flow-control-timeout", f"{TIMEOUT:g}s")
    agent = AgentProc(proc.address, WF)
    try:
        yield proc
    finally:
        agent.stop()
        proc.stop()


def test_a_trickle_reader_is_ended_like_a_stalled_one(router: Router) -> None:
    args = ["--router-address", router.address, "--workflow-id", WF, "--tls=false"]
    trickle = subprocess.Popen(
        client_cmd("exec", *args, "--resume-grace", "0", "--", "sh", "-c", "exec cat /dev/zero"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    taken = [0]
    stop = threading.Event()

    def take() -> None:
        assert trickle.stdout is not None
        while not stop.wait(0.5):
            ready, _, _ = select.select([trickle.stdout], [], [], 0)
            if ready and (chunk := os.read(trickle.stdout.fileno(), 4096)):
                taken[0] += len(chunk)

    reader = threading.Thread(target=take, daemon=True)
    reader.start()
    try:
        started = time.monotonic()
        end = router.wait_for(lambda r: r.get("event") == "session end" and r.get("status") != "OK", 10 * TIMEOUT)
        lasted = time.monotonic() - started
        assert end["status"] == "RESOURCE_EXHAUSTED", end
        assert re.search(r"peer stopped reading|peer reads too slowly", str(end.get("reason"))), end
        assert taken[0] > 0  # it did read: a trickle, not a stall
        assert lasted < 6 * TIMEOUT, lasted
        assert metric_value(router.metrics_text(), "router_grpc_flow_control_timeouts_total") == 1
        assert metric_value(router.metrics_text(), "router_grpc_buffered_bytes") == 0
        # Another session is served while the trickle reader still holds its end of the stream.
        echo = run_client("exec", *args, "--", "echo", "next")
        assert (echo.returncode, echo.stdout) == (0, b"next\n"), echo.stderr[-300:]
    finally:
        stop.set()
        reader.join(5)
        trickle.kill()
        trickle.wait()
