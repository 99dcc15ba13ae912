"""One user's stalled and trickling sessions: the router's memory stays within her budget plus gRPC's own
per-stream buffering, another user's echo keeps its latency, and the memory comes back afterwards.

Real processes on loopback: a JWT router, an agent, mallory's attacker (tests/stall_attacker.py: exec
sessions pushing maximum-size frames at `sleep`, which never reads) and her trickle reader (an
`exec cat /dev/zero` whose output is taken 4 KiB every half second; not resumable, `--resume-grace 0`,
so what it does not read waits in the router: a resumable session is paced by its acknowledgements
instead), and alice's interactive
`exec cat`, whose round trips are timed before, during and after the attack.

Her p99 under the attack is compared with its quiet value measured at the same moments: bob's identical
`exec cat` through a second, identical router that carries no attack (the control), each of his round
trips taken right after one of hers. The machine's own load (other tests, other engineers, CI
neighbours) changes over the minute the attack lasts and moves both alike, so the ratio is the attacked
router's unfairness, not the machine's weather; a quiet p99 taken before the attack compared with one
taken during it measured the weather (6.6x once, on a fresh clone, with the router's share unchanged).
Her own before/after p99s are printed beside it. The test polls both routers' /metrics alike: a page
costs the router a few milliseconds of work right after it answered (and its garbage), which polling
only the attacked router put on alice's next round trips alone. Mallory's processes (her CLIs, and the
agent of her own workflow with her commands) run at nice 19: in production they run on her machine and
in her container, not beside the router, so on these two shared cores they must not take alice's CPU
share; what the comparison measures is the router's fairness. The arithmetic of the bound is in
docs/security.md ("What one session can make the router hold"): with the native gRPC server every byte
the attack can make the router hold is set by its flags, so the test asserts the router's peak RSS
against that configured bound, with the memory guard set above it (the guard is the last resort, not
what bounds this attack). Mallory's commands outlive the test's checks: the streams toward them, which
hold the router's last unread message of each ended session, are reset without waiting for the commands
to exit.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osmo_router.h2.stream import CREDIT_FLOOR
from tests.e2e.test_memory_idle import PeakSampler, rss_kib, wait_rss_at_most
from tests.harness import PYTHON, ROOT, AgentProc, Router, cli_env, client_cmd, metric_value
from tests.security_kit import Signer, jwt_router

WF = "wf-stall"
WF_MALLORY = "wf-stall-mallory"
#: Mallory's processes' niceness (see the module docstring).
NICE = 19
MIB = 1 << 20
USER_BUDGET = 16 * MIB
MESSAGE = 4 * MIB  # the router's --max-message-size (its default)
WINDOW = 2 * MIB  # the router's --stream-window-bytes (its default)
STALLED = 6
SESSIONS = STALLED + 1  # and her trickle reader
TIMEOUT = 15.0  # --flow-control-timeout
#: --memory-guard-bytes: above the bound below, so that the budgets and windows, not the guard, bound
#: the attack (the guard's own tests: tests/unit/test_memory_guard.py).
GUARD = 1024 * MIB
#: What the router may hold for one held-back session beyond the user's budget (docs/security.md):
#: its inbound stream's window counts in the budget, except the floor a full budget leaves it plus
#: the message that arrives across its edge (CREDIT_FLOOR + M), the message its relay reader holds
#: while the queue or budget is full (M), and the message its writer has handed to the stalled
#: outbound stream (M). (Before the windows were counted: WINDOW + 3M.)
PER_SESSION = CREDIT_FLOOR + 3 * MESSAGE
#: What the router holds beyond the bytes above: her connections and sessions themselves, and the
#: allocator's rounding of the multi-MiB messages. Measured: 7 idle exec sessions of hers (7
#: connections, more than the attack's 2) add 372-376 KiB to the fresh RSS (3 runs, the same flags;
#: docs/security.md "What one session can make the router hold"), so under 1 MiB of the 8 MiB is
#: connections; the rest is headroom for the allocator, whose share is not separable from the
#: buffers (peaks seen +105 to +118 MiB against the 122 MiB bound).
SLACK = 8 * MIB
#: The configured bound on what mallory's attack adds to the router's fresh RSS: her budget (the relay
#: queues), what each session holds outside it, and the slack.
BOUND = USER_BUDGET + SESSIONS * PER_SESSION + SLACK
#: Alice's echo p99 under the attack against her quiet p99 (issue 14: at most 2x).
ECHO_P99_BOUND = 2.0
SAMPLES = 300  # echo round trips before and after the attack
#: How long mallory's stalled commands live (they never read their input): past every check below.
SLEEP = 240
#: After her sessions ended, how long until the router has reset its streams toward her commands
#: (CLOSE_GRACE, 5 s: a finished call whose peer does not read) and given their memory back.
RELEASE = 45.0


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Router, Router, Signer]]:
    """The attacked router with alice's and mallory's agents, and the control router with bob's."""
    signer = Signer.rs256()
    flags = (
        *("--user-buffer-bytes", str(USER_BUDGET), "--flow-control-timeout", f"{TIMEOUT:g}s"),
        *("--memory-guard-bytes", str(GUARD), "--stream-window-bytes", str(WINDOW)),
    )
    router = jwt_router(tmp_path, signer, *flags)
    control = jwt_router(tmp_path, signer, *flags)
    agents = [
        AgentProc(r.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
        for r in (router, control)
    ]
    mallory_token = signer.token("pod-m", workflows=[WF_MALLORY], role="agent")
    mallory_agent = AgentProc(router.address, WF_MALLORY, "--token", mallory_token)
    os.setpriority(os.PRIO_PROCESS, mallory_agent.pid, NICE)  # her commands inherit it
    try:
        yield router, control, signer
    finally:
        mallory_agent.stop()
        for agent in agents:
            agent.stop()
        control.stop()
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


def paired_samples(alice: Echo, bob: Echo, count: int) -> tuple[list[float], list[float]]:
    """`count` round trips of each, alternating, so that both meet the same moments of the machine."""
    pairs = [(alice.round_trip(b"echo %d" % i), bob.round_trip(b"echo %d" % i)) for i in range(count)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class Trickle:
    """Mallory's trickle reader: `exec cat /dev/zero`, 4 KiB taken every half second, for ever."""

    def __init__(self, flags: list[str]) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            client_cmd("exec", *flags, "--resume-grace", "0", "--", "sh", "-c", "exec cat /dev/zero"),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=cli_env(),
        )
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, NICE)
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

    def stderr_tail(self) -> str:
        """The last lines its CLI wrote to stderr (why it did not start, if it did not)."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-800:]

    def stop(self) -> None:
        """Kill the reader."""
        self._stop.set()
        self._thread.join(5)
        self.proc.kill()
        self.proc.wait()
        self._stderr.close()


def _attacker(router: Router, token: str) -> subprocess.Popen[bytes]:
    argv = [PYTHON, "-m", "tests.stall_attacker", router.address, WF_MALLORY, token, str(STALLED), str(MESSAGE)]
    argv.append(str(SLEEP))
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    os.setpriority(os.PRIO_PROCESS, proc.pid, NICE)
    return proc


def _wait_metric_at_least(router: Router, name: str, value: float, timeout: float) -> float:
    """Poll /metrics (bounded) until `name` is at least `value`; the last reading."""
    deadline = time.monotonic() + timeout
    while (seen := metric_value(router.metrics_text(), name)) < value and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def _wait_resets(router: Router, count: int, timeout: float) -> int:
    """Wait (bounded) until the router reset `count` streams whose peer did not read; how many."""
    deadline = time.monotonic() + timeout
    while (resets := _resets(router)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return resets


def _resets(router: Router) -> int:
    """Streams the router reset, holding data, because their peer did not read after the call ended."""
    return sum(r.get("event") == "stream_reset" and r.get("unsent_bytes", 0) > 0 for r in router.events())


def _settled_rss(pid: int, timeout: float = 15.0) -> int:
    """The process's RSS (KiB) once it stopped falling: two readings a second apart within 256 KiB (bounded)."""
    deadline = time.monotonic() + timeout
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)  # a sampling interval, not synchronisation: RSS has no event to await
        now = rss_kib(pid)
        if abs(now - last) < 256:
            return now
        last = now
    return last


def _commands(cmdline: str) -> list[int]:
    """The pids of the processes running exactly `cmdline` (words separated by spaces)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip() == cmdline.encode()
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _audit(router: Router) -> list[tuple[str, str, str]]:
    """Mallory's sessions as the audit log has them: (session, its client's address, how it ended or
    "running"); the attacker's stalled sessions share one address, her trickle reader has its own."""
    records = router.events()
    ended = {
        r["session"]: f"{r.get('status')}: {r.get('reason', '')}" for r in records if r.get("event") == "session end"
    }
    started = [r for r in records if r.get("event") == "session start" and r.get("user") == "mallory"]
    return [(r["session"], str(r.get("peer", "")), ended.get(r["session"], "running")) for r in started]


def _mallory_active(router: Router) -> tuple[float, float]:
    """Mallory's exec sessions (all but alice's one): paired so far, and running now."""
    text = router.metrics_text()
    paired = metric_value(text, "router_grpc_sessions_total", {"operation": "exec"}) - 1
    return paired, metric_value(text, "router_grpc_sessions_active", {"operation": "exec"}) - 1


@pytest.mark.serial  # compares echo p99s: alone (scripts/test)
@pytest.mark.timeout(360)
def test_stalled_and_trickling_sessions_stay_within_the_budget_and_spare_another_users_echo(
    setup: tuple[Router, Router, Signer],
) -> None:
    router, control, signer = setup

    def flags(user: str, workflow: str = WF, via: Router = router) -> list[str]:
        return ["--router-address", via.address, "--workflow-id", workflow, "--tls=false", "--token",
                signer.token(user, workflows=[workflow])]  # fmt: skip

    echo, bob = Echo(flags("alice")), Echo(flags("bob", via=control))
    attacker: subprocess.Popen[bytes] | None = None
    trickle: Trickle | None = None
    try:
        paired_samples(echo, bob, 20)  # warm: every code path of a session has run once
        fresh = rss_kib(router.pid)
        quiet, _ = paired_samples(echo, bob, SAMPLES)
        with PeakSampler({"router": router.pid}) as sampler:
            attacker = _attacker(router, signer.token("mallory", workflows=[WF_MALLORY]))
            trickle = Trickle(flags("mallory", WF_MALLORY))
            # Alice's (and bob's) round trips while mallory's sessions fill, stall, trickle and are ended.
            attacked: list[float] = []
            control_attacked: list[float] = []
            # While her held messages fill what her queues leave, her sessions go in one at a time
            # (ByteBudget.fits): a starved one's timeout starts only once the others ended, so up to
            # one timeout per session in series.
            deadline = time.monotonic() + (SESSIONS + 1) * TIMEOUT
            while time.monotonic() < deadline:
                alice_part, bob_part = paired_samples(echo, bob, 25)
                attacked += alice_part
                control_attacked += bob_part
                paired, active = _mallory_active(router)
                control.metrics_text()  # the same work on both routers between round trips (see above)
                if paired >= SESSIONS and active == 0:
                    break
            state = _mallory_active(router)
            assert state[0] >= SESSIONS and state[1] == 0, (
                f"her sessions did not all run, or outlived the limits: {state}; {_audit(router)}; "
                f"queued {metric_value(router.metrics_text(), 'router_grpc_buffered_bytes', {})} bytes, "
                f"held {metric_value(router.metrics_text(), 'router_grpc_held_bytes', {})}; "
                f"the trickle reader took {trickle.taken} bytes; trickle stderr: {trickle.stderr_tail()}"
            )
        peak = sampler.peak["router"]
        text = router.metrics_text()
        by_guard = metric_value(text, "router_grpc_memory_guard_sessions_total")
        by_timeout = metric_value(text, "router_grpc_flow_control_timeouts_total")
        # Her ended sessions' streams toward her commands, which never read, are reset by the router
        # (and their last message dropped) while the commands still run.
        resets = _wait_resets(router, STALLED, RELEASE)
        running = len(_commands(f"sleep {SLEEP}"))
        attacker.kill()
        attacker.wait()
        trickle_said = trickle.stderr_tail()
        trickle.stop()
        after, _ = paired_samples(echo, bob, SAMPLES)
        echo.close()  # the last session ends: the router gives its memory back once quiet
        idle = wait_rss_at_most(router.pid, 2 * fresh, timeout=RELEASE)
        settled = _settled_rss(router.pid)
        paired = _mallory_active(router)[0]
        figures = (
            f"router RSS fresh {fresh} KiB, peak {peak} KiB (+{peak - fresh} KiB, bound +{BOUND >> 10} KiB), "
            f"idle {idle} KiB ({idle / fresh:.2f}x; settled {settled} KiB, {settled / fresh:.2f}x); "
            f"her sessions {paired:g}, ended by the guard {by_guard:g}, "
            f"by the flow-control timeout {by_timeout:g}; streams to her commands reset {resets}, "
            f"{running} commands running; alice's echo p99 attacked {p99(attacked) * 1e3:.2f} ms against "
            f"bob's at the same moments {p99(control_attacked) * 1e3:.2f} ms "
            f"({p99(attacked) / p99(control_attacked):.2f}x, {len(attacked)} round trips each); alice's "
            f"quiet p99 before/after {p99(quiet) * 1e3:.2f}/{p99(after) * 1e3:.2f} ms "
            f"({p99(attacked) / p99(quiet + after):.2f}x); "
            f"not ended by a limit: {[end for end in _audit(router) if 'flow-control' not in end[2]]} "
            f"(her sessions' clients: {sorted({end[1] for end in _audit(router)})}; the attacker's share one "
            f"connection); her trickle reader's client said: {trickle_said!r}"
        )
        print(figures)
        assert by_guard + by_timeout >= SESSIONS, figures  # every one of her sessions was ended by a limit
        assert (peak - fresh) * 1024 <= BOUND, figures
        # At least one stream that still held her data was reset while its command ran. Not always all
        # six within RELEASE (4-6 seen): a stream whose last message the agent's gRPC had already
        # taken ends without a reset, and the log cannot tell that apart from one still held.
        assert resets >= 1 and running >= STALLED, figures
        assert p99(attacked) <= ECHO_P99_BOUND * p99(control_attacked), figures
        assert idle <= 2 * fresh, figures
        assert metric_value(router.metrics_text(), "router_grpc_buffered_bytes") == 0
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        if trickle is not None:
            trickle.stop()
        echo.close()
        bob.close()
