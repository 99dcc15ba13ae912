"""One user's stalled sessions fill only that user's budget: the relay stops reading, another user goes on.

A JWT router with a small `--user-buffer-bytes`; mallory opens sessions whose output she never reads
(`cat /dev/zero` into a pipe nobody drains), alice runs ordinary sessions meanwhile.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import AgentProc, Router, cli_env, client_cmd, metric_value, run_client
from tests.security_kit import Signer, jwt_router

WF = "wf-budget"
USER_BUDGET = 8 * 1024 * 1024


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Router, Signer]]:
    signer = Signer.rs256()
    router = jwt_router(tmp_path, signer, "--user-buffer-bytes", str(USER_BUDGET), "--flow-control-timeout", "120s")
    agent = AgentProc(router.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
    try:
        yield router, signer
    finally:
        agent.stop()
        router.stop()


def test_a_users_stalled_sessions_stay_within_her_budget_and_another_user_is_served(
    setup: tuple[Router, Signer],
) -> None:
    router, signer = setup

    def flags(user: str) -> list[str]:
        return ["--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token",
                signer.token(user, workflows=[WF])]  # fmt: skip

    stalled = [
        subprocess.Popen(
            client_cmd("exec", *flags("mallory"), "--", "sh", "-c", "exec cat /dev/zero"),
            stdout=subprocess.PIPE,  # never read: her client stops reading, the router's queues fill
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        for _ in range(6)
    ]
    try:
        # Her budget fills and stays full (no event exists for it: poll, bounded): the queues, and
        # (native server) her streams' windows and the messages her readers hold, counted as held.
        deadline = time.monotonic() + 30
        buffered = counted = 0.0
        while time.monotonic() < deadline and counted < USER_BUDGET / 2:
            text = router.metrics_text()
            buffered = metric_value(text, "router_grpc_buffered_bytes")
            counted = buffered + metric_value(text, "router_grpc_held_bytes")
            time.sleep(0.1)
        assert USER_BUDGET / 2 <= counted and buffered <= USER_BUDGET, (buffered, counted)
        # Alice is not held back: a bulk session and an echo go through while mallory's stay stalled.
        blob = bytes(range(256)) * 4096 * 4  # 4 MiB
        result = run_client("exec", *flags("alice"), "--", "cat", input=blob, timeout=60)
        assert result.returncode == 0 and result.stdout == blob, result.stderr[-300:]
        echo = run_client("exec", *flags("alice"), "--", "echo", "alice")
        assert (echo.returncode, echo.stdout) == (0, b"alice\n")
        assert metric_value(router.metrics_text(), "router_grpc_buffered_bytes") <= USER_BUDGET
        assert all(proc.poll() is None for proc in stalled)  # held back, not ended
    finally:
        for proc in stalled:
            proc.kill()
            proc.wait()
