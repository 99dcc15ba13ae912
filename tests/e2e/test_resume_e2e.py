"""Sessions that survive a router restart (issue 17): real router, agent and client processes.

The router is SIGKILLed in the middle of a transfer and started again on the same port; the
transfer goes on where it was (every byte sent again from the replay buffers) and ends byte-exact.
"The middle" is an event: the receiver has read a given number of bytes, or the container's side
has a given number of bytes on disk. When the session cannot be resumed (the agent restarted: it
holds no such session), the client says so and exits 255 at once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.forward_servers import connect, start_forward, tcp_server, udp_echo_server, wait_line
from tests.harness import AgentProc, Router, cli_env, client_cmd, run_client

MIB = 1024 * 1024
#: Bound on a whole transfer (a loaded 2-core machine runs several test suites at once).
TRANSFER_TIMEOUT = 600.0
#: Bound on one socket read: a resume (router restart, agent re-registration, backoff) fits well within.
READ_TIMEOUT = 120.0


@dataclass
class Rig:
    """A router (replaced when restarted) and an agent for one workflow."""

    router: Router
    agent: AgentProc
    workflow: str
    restarts: list[float] = field(default_factory=list)

    @property
    def args(self) -> list[str]:
        """osmo-net-client's flags for this router and workflow (the port stays across restarts)."""
        return ["--router-address", self.router.address, "--workflow-id", self.workflow, "--tls=false"]

    def restart_router(self) -> float:
        """SIGKILL the router, start a new one on the same port; returns when it was killed (monotonic)."""
        old = self.router
        killed = time.monotonic()
        old.popen.kill()
        old.wait_exit(30)
        old.stop()
        self.router = Router("--port", str(old.port))
        self.restarts.append(time.monotonic() - killed)
        return killed


@pytest.fixture
def rig(workflow: str) -> Iterator[Rig]:
    """A router and an agent of their own: the tests kill the router."""
    router = Router()
    agent = AgentProc(router.address, workflow)
    setup = Rig(router, agent, workflow)
    try:
        yield setup
    finally:
        setup.agent.stop()
        setup.router.stop()


@dataclass
class Received:
    """What a reader took: byte count, digest, how it ended, and when each read returned."""

    count: int = 0
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    ended: str = ""
    reads: list[tuple[float, int]] = field(default_factory=list)
    reached: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def longest_gap_after(self, moment: float) -> float:
        """The longest time without a byte after `moment` (the resume, when `moment` is the kill)."""
        times = [moment] + [t for t, _ in self.reads if t > moment]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def read_all(read: object, received: Received, trigger: int) -> None:
    """Read until EOF with `read(n)`, hashing; `reached` is set once `trigger` bytes arrived."""
    try:
        while data := read(MIB):  # type: ignore[operator]
            received.sha.update(data)
            received.count += len(data)
            received.reads.append((time.monotonic(), received.count))
            if received.count >= trigger:
                received.reached.set()
        received.ended = "eof"
    except OSError as err:
        received.ended = type(err).__name__
    finally:
        received.reached.set()
        received.done.set()


def random_source(size: int, sha: hashlib._Hash, write: object) -> None:
    """Write `size` random bytes with `write(chunk)`, 1 MiB at a time, hashing them."""
    left = size
    while left:
        chunk = os.urandom(min(MIB, left))
        sha.update(chunk)
        write(chunk)  # type: ignore[operator]
        left -= len(chunk)


def test_256_mib_forward_download_survives_a_router_restart(rig: Rig) -> None:
    size, trigger = 256 * MIB, 64 * MIB
    sent = hashlib.sha256()

    def serve(conn: socket.socket) -> None:
        random_source(size, sent, conn.sendall)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    with tcp_server(serve) as port:
        proc, (local,) = start_forward(rig.args, f":{port}")
        sock = connect(local)
        sock.settimeout(READ_TIMEOUT)
        got = Received()
        reader = threading.Thread(target=read_all, args=(sock.recv, got, trigger), daemon=True)
        try:
            started = time.monotonic()
            reader.start()
            assert got.reached.wait(TRANSFER_TIMEOUT) and got.count >= trigger, got.ended
            killed = rig.restart_router()
            assert got.done.wait(TRANSFER_TIMEOUT), f"the download stalled at {got.count} bytes"
            elapsed = time.monotonic() - started
            assert got.ended == "eof", f"the download ended with {got.ended} after {got.count} bytes"
            assert got.count == size
            assert got.sha.digest() == sent.digest()
            # The watch resumed too, and the forward still serves new connections on the new router.
            wait_line(proc, lambda line: "session resumed" in line)
            assert proc.popen.poll() is None
            print(
                f"\n256 MiB forward: {size / MIB / elapsed:.1f} MiB/s overall, router back in "
                f"{rig.restarts[0]:.2f}s, longest stall of the reader {got.longest_gap_after(killed):.2f}s"
            )
        finally:
            sock.close()
            reader.join(30)
            proc.stop()


def test_64_mib_exec_cat_round_trip_survives_a_router_restart(rig: Rig) -> None:
    size, trigger = 64 * MIB, 16 * MIB
    sent = hashlib.sha256()
    proc = subprocess.Popen(
        client_cmd("exec", *rig.args, "--", "cat"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr

    def feed() -> None:
        try:
            random_source(size, sent, stdin.write)
        finally:
            stdin.close()

    got = Received()
    errors: list[bytes] = []
    threads = [
        threading.Thread(target=feed, daemon=True),
        threading.Thread(target=read_all, args=(stdout.read1, got, trigger), daemon=True),
        threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True),
    ]
    try:
        started = time.monotonic()
        for thread in threads:
            thread.start()
        assert got.reached.wait(TRANSFER_TIMEOUT) and got.count >= trigger, got.ended
        killed = rig.restart_router()
        assert proc.wait(TRANSFER_TIMEOUT) == 0, errors
        elapsed = time.monotonic() - started
        for thread in threads:
            thread.join(30)
        assert got.count == size
        assert got.sha.digest() == sent.digest()
        assert b"session resumed" in errors[0], errors
        print(
            f"\n64 MiB exec cat: {size / MIB / elapsed:.1f} MiB/s each way, router back in "
            f"{rig.restarts[0]:.2f}s, longest stall of stdout {got.longest_gap_after(killed):.2f}s"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for thread in threads:
            thread.join(10)
        stdout.close()
        stderr.close()


def test_rsync_upload_of_a_tree_survives_a_router_restart(rig: Rig, tmp_path: Path) -> None:
    source, container = tmp_path / "source", tmp_path / "container"
    (source / "sub").mkdir(parents=True)
    container.mkdir()
    for index in range(4):
        (source / ("sub" if index % 2 else ".") / f"part{index}.bin").write_bytes(os.urandom(8 * MIB))
    (source / "notes.txt").write_text("a small file\n")
    client = subprocess.Popen(
        client_cmd("rsync", *rig.args, "--bwlimit", "16m", f"{source}/", f":{container}/"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=cli_env(),
        start_new_session=True,
    )
    assert client.stderr is not None
    errors: list[bytes] = []
    collector = threading.Thread(target=lambda: errors.append(client.stderr.read()), daemon=True)  # type: ignore[union-attr]
    collector.start()
    try:
        # The middle: a quarter of the tree is in the container (bounded polling of the file system,
        # which has no event to wait on; --bwlimit keeps the transfer going meanwhile).
        deadline = time.monotonic() + TRANSFER_TIMEOUT
        while _bytes_under(container) < 8 * MIB:
            assert client.poll() is None, "rsync ended before the router could be killed"
            assert time.monotonic() < deadline, "the transfer never got a quarter of the way"
            time.sleep(0.02)
        killed = rig.restart_router()
        assert client.wait(TRANSFER_TIMEOUT) == 0, errors
        print(
            f"\nrsync of 32 MiB: router back in {rig.restarts[0]:.2f}s, "
            f"done {time.monotonic() - killed:.1f}s after the kill"
        )
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        collector.join(30)
    assert b"session resumed" in errors[0], errors
    for path in source.rglob("*"):
        if path.is_file():
            copy = container / path.relative_to(source)
            assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest(), path


def _bytes_under(root: Path) -> int:
    """Bytes in the files under `root` (rsync's temporary files included)."""
    total = 0
    for path in root.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # a temporary file renamed meanwhile
            pass
    return total


def test_resume_refused_by_a_restarted_agent_ends_at_once_with_the_cause(rig: Rig) -> None:
    """A new agent process holds none of the old one's sessions: NOT_FOUND, exit 255, no waiting out the grace."""
    client = subprocess.Popen(
        client_cmd("exec", *rig.args, "--", "sh", "-c", "echo started; sleep 600"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
        start_new_session=True,
    )
    assert client.stdout is not None and client.stderr is not None
    try:
        readable, _, _ = select.select([client.stdout], [], [], READ_TIMEOUT)
        assert readable and client.stdout.readline() == b"started\n"
        rig.agent.popen.kill()
        rig.agent.wait_exit(30)
        rig.agent.stop()
        rig.agent = AgentProc(rig.router.address, rig.workflow)
        registered = time.monotonic()
        code = client.wait(60)
        waited = time.monotonic() - registered
        stderr = client.stderr.read().decode()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        client.stdout.close()
        client.stderr.close()
    assert code == 255, stderr
    assert "the agent holds no such session" in stderr and "NOT_FOUND" in stderr, stderr
    # The client's resume backoff is at most 4 s: it asks the new agent within that, far from the grace.
    assert waited < 20, waited
    # The new agent serves new sessions as usual.
    result = run_client("exec", *rig.args, "--", "echo", "fresh")
    assert result.returncode == 0 and result.stdout == b"fresh\n", result.stderr


def test_client_paused_past_the_flow_control_timeout_resumes_when_it_runs_again(workflow: str) -> None:
    """A laptop asleep: the router ends the stalled stream, the client resumes when it wakes, no line lost."""
    router = Router("--flow-control-timeout", "2s")
    agent = AgentProc(router.address, workflow)
    # The grace bounds the reads below: a client that cannot resume ends (EOF) within it.
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", "--resume-grace", "60s"]
    client = subprocess.Popen(
        client_cmd("exec", *args, "--", "seq", "1", "100000000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
        start_new_session=True,
    )
    assert client.stdout is not None and client.stderr is not None
    errors: list[bytes] = []
    collector = threading.Thread(target=lambda: errors.append(client.stderr.read()), daemon=True)  # type: ignore[union-attr]
    collector.start()
    try:
        before = client.stdout.read(MIB)
        os.kill(client.pid, signal.SIGSTOP)
        # The router ends the stalled stream: its flow-control timeout, or its keepalive (whichever
        # comes first: the agent's replay buffer may hold back what would have filled the router's queue).
        router.wait_for(lambda r: r.get("event") == "session end", timeout=60)
        os.kill(client.pid, signal.SIGCONT)
        after = client.stdout.read(32 * MIB)  # blocks until the session resumed and delivered
        if len(after) < 32 * MIB:  # it ended: what it said is all there
            collector.join(30)
        assert len(after) == 32 * MIB, f"the session did not resume: {len(after)} bytes after the pause: {errors}"
        lines = (before + after).split(b"\n")[:-1]  # the last one may be cut
        # Every number once, in order: nothing lost or repeated across the break.
        assert lines == [str(n).encode() for n in range(1, len(lines) + 1)]
    finally:
        os.kill(client.pid, signal.SIGCONT)
        client.kill()
        client.wait(10)
        collector.join(30)
        client.stdout.close()
        client.stderr.close()
        agent.stop()
        router.stop()
    assert b"resuming the session" in errors[0] and b"session resumed" in errors[0], errors


def test_udp_forward_keeps_its_port_and_replays_datagrams_sent_during_a_router_restart(rig: Rig) -> None:
    """UDP resumes like TCP: the local port stays, and datagrams sent while the router is down arrive after."""
    with udp_echo_server() as port:
        proc, (local,) = start_forward(rig.args, "--protocol", "udp", f":{port}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(READ_TIMEOUT)
        try:
            sock.sendto(b"before", ("127.0.0.1", local))
            assert sock.recv(65536) == b"echo:before"
            rig.router.popen.kill()  # down: what is sent now waits in the client's replay buffer
            rig.router.wait_exit(30)
            during = {f"during {i}".encode() for i in range(10)}
            for payload in during:
                sock.sendto(payload, ("127.0.0.1", local))
            rig.router.stop()
            rig.router = Router("--port", str(rig.router.port))
            got = {sock.recv(65536) for _ in during}
            assert got == {b"echo:" + p for p in during}
            sock.sendto(b"after", ("127.0.0.1", local))
            assert sock.recv(65536) == b"echo:after"
            assert proc.popen.poll() is None
        finally:
            sock.close()
            proc.stop()
