"""One user's stalled and trickling sessions: the router's memory stays within her budget plus gRPC's own
per-stream buffering, another user's echo keeps its latency, and the memory comes back afterwards.

Real processes on loopback: a JWT router, an agent, mallory's attacker (tests/stall_attacker.py: exec
sessions pushing maximum-size frames at `sleep`, which never reads) and her trickle reader (an
`exec cat /dev/zero` whose output is taken 4 KiB every half second), and alice's interactive
`exec cat`, whose round trips are timed before, during and after the attack. The arithmetic of the
bound is in docs/security.md ("What one session can make the router hold").
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_memory_idle import PeakSampler, rss_kib, wait_rss_at_most
from tests.harness import PYTHON, ROOT, AgentProc, Router, cli_env, client_cmd, metric_value
from tests.security_kit import Signer

WF = "wf-stall"
MIB = 1 << 20
USER_BUDGET = 16 * MIB
MESSAGE = 4 * MIB  # the router's --max-message-size (its default)
STALLED = 6
TIMEOUT = 15.0  # --flow-control-timeout
#: --memory-guard-bytes: the router's RSS above which held-back sessions are ended (fresh: ~70 MiB).
GUARD = 128 * MIB
#: How far the RSS may pass the guard before the ended sessions' buffers are freed: what gRPC takes in
#: while the guard's check waits for the event loop (50 ms, more on a loaded machine: the fill keeps
#: the loop busy) and while the ended streams are torn down (docs/security.md). Measured 42-164 MiB
#: on the loaded 2-core machine; without the guard the same attack reached 180 MiB to 2.2 GiB.
OVERSHOOT = 192 * MIB
#: Alice's echo p99 under the attack against her quiet p99. Issue 14 asks for 2x; alone on 2 cores this
#: measured 2.0-2.3x (2.7 -> 6.4 ms in one fresh-clone run): the attackers' 4 MiB frames share the
#: router's event loop with her echoes until the limits end them. 3x catches a regression; the 2x goal
#: is open (issue 14 note, docs/bench/NOTES.md).
ECHO_P99_BOUND = 3.0
SAMPLES = 300  # echo round trips before and after the attack
#: How long mallory's stalled commands live: they never read their input, then exit.
SLEEP = 30


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Router, Signer]]:
    signer = Signer.rs256()
    (tmp_path / "jwt.pem").write_bytes(signer.public_pem())
    router = Router(
        "--tls-enabled=false",
        *("--auth=jwt", "--jwt-public-key", str(tmp_path / "jwt.pem")),
        *("--user-buffer-bytes", str(USER_BUDGET), "--flow-control-timeout", f"{TIMEOUT:g}s"),
        *("--memory-guard-bytes", str(GUARD)),
        secure=True,
    )
    agent = AgentProc(router.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
    try:
        yield router, signer
    finally:
        agent.stop()
        router.stop()


class Echo:
    """Alice's interactive `exec cat`: one line out, the same line back, timed."""

    def __init__(self, flags: list[str]) -> None:
        self.proc = subprocess.Popen(
            client_cmd("exec", *flags, "--", "cat"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        self._buffer = b""

    def round_trip(self, text: bytes) -> float:
        """Seconds from writing `text` + newline to reading it back (bounded: 10 s)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        started = time.perf_counter()
        self.proc.stdin.write(text + b"\n")
        self.proc.stdin.flush()
        deadline = started + 10
        while b"\n" not in self._buffer:
            left = deadline - time.perf_counter()
            assert left > 0, "alice's echo did not come back within 10 s"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, "alice's session ended"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        assert line == text
        return time.perf_counter() - started

    def samples(self, count: int) -> list[float]:
        """`count` round trips, one after the other."""
        return [self.round_trip(b"echo %d" % i) for i in range(count)]

    def close(self) -> None:
        """End the session cleanly (stdin EOF) or kill it."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class Trickle:
    """Mallory's trickle reader: `exec cat /dev/zero`, 4 KiB taken every half second, for ever."""

    def __init__(self, flags: list[str]) -> None:
        self.proc = subprocess.Popen(
            client_cmd("exec", *flags, "--", "sh", "-c", "exec cat /dev/zero"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        self.taken = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        while not self._stop.wait(0.5):
            ready, _, _ = select.select([self.proc.stdout], [], [], 0)
            if ready and (chunk := os.read(self.proc.stdout.fileno(), 4096)):
                self.taken += len(chunk)

    def stop(self) -> None:
        """Kill the reader."""
        self._stop.set()
        self._thread.join(5)
        self.proc.kill()
        self.proc.wait()


def _attacker(router: Router, token: str) -> subprocess.Popen[bytes]:
    argv = [PYTHON, "-m", "tests.stall_attacker", router.address, WF, token, str(STALLED), str(MESSAGE), str(SLEEP)]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())


def _wait_metric_at_least(router: Router, name: str, value: float, timeout: float) -> float:
    """Poll /metrics (bounded) until `name` is at least `value`; the last reading."""
    deadline = time.monotonic() + timeout
    while (seen := metric_value(router.metrics_text(), name)) < value and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def _mallory_active(router: Router) -> tuple[float, float]:
    """Mallory's exec sessions (all but alice's one): paired so far, and running now."""
    text = router.metrics_text()
    paired = metric_value(text, "router_grpc_sessions_total", {"operation": "exec"}) - 1
    return paired, metric_value(text, "router_grpc_sessions_active", {"operation": "exec"}) - 1


@pytest.mark.serial  # compares echo p99 with a quiet baseline: alone (scripts/test)
@pytest.mark.timeout(240)
def test_stalled_and_trickling_sessions_stay_within_the_budget_and_spare_another_users_echo(
    setup: tuple[Router, Signer],
) -> None:
    router, signer = setup

    def flags(user: str) -> list[str]:
        return ["--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token",
                signer.token(user, workflows=[WF])]  # fmt: skip

    echo = Echo(flags("alice"))
    attacker: subprocess.Popen[bytes] | None = None
    trickle: Trickle | None = None
    try:
        echo.samples(20)  # warm: every code path of a session has run once
        fresh = rss_kib(router.pid)
        quiet = echo.samples(SAMPLES)
        with PeakSampler({"router": router.pid}) as sampler:
            attacker = _attacker(router, signer.token("mallory", workflows=[WF]))
            trickle = Trickle(flags("mallory"))
            # Alice's round trips while mallory's sessions fill, stall, trickle and are ended.
            attacked: list[float] = []
            deadline = time.monotonic() + 4 * TIMEOUT
            while time.monotonic() < deadline:
                attacked += echo.samples(25)
                paired, active = _mallory_active(router)
                if paired >= STALLED + 1 and active == 0:
                    break
            assert _mallory_active(router) == (STALLED + 1, 0), "her sessions did not all run, or outlived the limits"
        peak = sampler.peak["router"]
        text = router.metrics_text()
        by_guard = metric_value(text, "router_grpc_memory_guard_sessions_total")
        by_timeout = metric_value(text, "router_grpc_flow_control_timeouts_total")
        attacker.kill()
        attacker.wait()
        trickle.stop()
        after = echo.samples(SAMPLES)
        echo.close()  # the last session ends: the router gives its memory back once quiet
        # Her commands exit (SLEEP): the agent's streams, which held the router's last message of each
        # ended session unread, end too (docs/security.md), and the router goes idle.
        idle = wait_rss_at_most(router.pid, 2 * fresh, timeout=SLEEP + 60)
        figures = (
            f"router RSS fresh {fresh} KiB, peak {peak} KiB, idle {idle} KiB; sessions ended by the guard "
            f"{by_guard:g}, by the flow-control timeout {by_timeout:g}; echo p99 quiet {p99(quiet) * 1e3:.2f}/"
            f"{p99(after) * 1e3:.2f} ms, attacked {p99(attacked) * 1e3:.2f} ms ({len(attacked)} round trips)"
        )
        print(figures)
        assert by_guard + by_timeout >= STALLED + 1, figures  # every one of her sessions was ended by a limit
        assert peak * 1024 <= GUARD + OVERSHOOT, figures
        assert p99(attacked) <= 2 * p99(quiet + after), figures
        assert idle <= 2 * fresh, figures
        assert metric_value(router.metrics_text(), "router_grpc_buffered_bytes") == 0
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        if trickle is not None:
            trickle.stop()
        echo.close()
