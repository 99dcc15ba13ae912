"""One user cannot exhaust the agent: hostile exec requests and UDP floods leave its descriptors flat.

A real router and agent (processes), driven by raw gRPC calls (tests/raw_grpc.py) so a request can
carry what the client would never send. The agent's descriptors are counted in /proc/PID/fd.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from tests.forward_servers import start_forward, udp_echo_server
from tests.harness import AgentProc, Router, run_client
from tests.raw_grpc import EXEC, PORT_FORWARD, RawCall, frame, raw_channel

#: Descriptors the agent may hold beyond its baseline after the storm (a lazily opened one or two).
SLACK = 4
WAIT = 30.0


def fd_count(pid: int) -> int:
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settle_fds(pid: int, at_most: int, timeout: float = WAIT) -> int:
    """Poll (bounded) until the process holds at most `at_most` descriptors; the last count."""
    deadline = time.monotonic() + timeout
    while (count := fd_count(pid)) > at_most:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return count


async def steady_fds(pid: int, timeout: float = WAIT) -> int:
    """Poll (bounded) until the process's descriptor count holds still for 0.5 s; that count.

    A session that just ended may still be closing its pipes: a limit computed from a count taken
    then leaves the next session more room than intended.
    """
    deadline = time.monotonic() + timeout
    count, same = fd_count(pid), 0
    while same < 10 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = fd_count(pid)
        count, same = now, (same + 1 if now == count else 0)
    return count


def exec_init(workflow: str, **init: object) -> bytes:
    from osmo_router.wire.protocol import pb

    target = pb.SessionTarget(workflow_id=workflow)
    return pb.ExecRequest(init=pb.ExecInit(target=target, **init)).SerializeToString()  # type: ignore[arg-type]


async def exec_outcome(channel: grpc.aio.Channel, workflow: str, **init: object) -> tuple[int | None, str, int | None]:
    """(error code, error message + stderr, exit code) of one raw exec session."""
    from osmo_router.wire.protocol import pb

    call = RawCall(channel, EXEC, None)
    await call.send(exec_init(workflow, **init), frame(half_close={}))  # stdin is empty: done at once
    outcome = await call.finish()
    assert outcome.code == grpc.StatusCode.OK, outcome
    error, text, exit_code = None, "", None
    for raw in outcome.responses:
        response = pb.ExecResponse.FromString(raw)
        if response.WhichOneof("kind") != "frame":
            continue
        kind = response.frame.WhichOneof("kind")
        if kind == "error":
            error, text = response.frame.error.code, text + response.frame.error.message
        elif kind == "stderr":
            text += response.frame.stderr.decode(errors="replace")
        elif kind == "exit_status":
            exit_code = response.frame.exit_status.code
    return error, text, exit_code


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    proc = Router()
    yield proc
    proc.stop()


@pytest_asyncio.fixture
async def channel(router: Router) -> AsyncIterator[grpc.aio.Channel]:
    ch = raw_channel(router.address)
    yield ch
    await ch.close()


INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@pytest.mark.asyncio
async def test_hostile_exec_requests_leave_the_agents_descriptors_flat(
    router: Router, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    from osmo_router.wire.protocol import pb

    workdir = tmp_path / "work"
    workdir.mkdir()
    agent = AgentProc(router.address, "wf-hostile-exec", "--workdir", str(workdir))
    try:
        wf = "wf-hostile-exec"
        # Warm up both paths (the first sessions open what the agent keeps), then take the baseline.
        assert await exec_outcome(channel, wf, command=["true"]) == (None, "", 0)
        assert await exec_outcome(channel, wf, command=["true"], tty=True) == (None, "", 0)
        base = fd_count(agent.pid)

        huge = pb.TerminalSize(rows=70000, cols=80)
        # (init, expected error code or None, expected exit code or None, a word of the message)
        cases: list[tuple[dict[str, object], int | None, int | None, str]] = [
            (dict(command=["true"], tty=True, size=huge), INVALID, None, "out of range"),
            (dict(command=["true"], tty=True, size=pb.TerminalSize(rows=24, cols=1 << 20)), INVALID, None, "range"),
            (dict(command=["true"], tty=True, env={"A=B": "x"}), INVALID, None, "environment variable name"),
            (dict(command=["true"], env={"A=B": "x"}), INVALID, None, "environment variable name"),
            (dict(command=["true"], env={"": "x"}), INVALID, None, "environment variable name"),
            (dict(command=["true"], env={"A": "x\0y"}), INVALID, None, "NUL"),
            (dict(command=["tr\0ue"], tty=True), INVALID, None, "NUL"),
            (dict(command=["true"], workdir="/tmp\0x"), INVALID, None, "NUL"),
            (
                dict(command=["true"], tty=True, workdir=str(tmp_path / "missing")),
                FAILED_PRECONDITION,
                None,
                "exec --workdir",
            ),
            (dict(command=["true"], workdir=str(tmp_path / "work" / "..")), None, 0, ""),
            (dict(command=["/nonexistent/cmd"]), None, 127, "command not found"),
            (dict(command=["/nonexistent/cmd"], tty=True), None, 127, "command not found"),
            (dict(command=[str(tmp_path)]), None, 126, "Permission denied"),
        ]
        for round_ in range(10):
            for init, error, exit_code, word in cases:
                got_error, text, got_exit = await exec_outcome(channel, wf, **init)
                assert (got_error, got_exit) == (error, exit_code), (round_, init, text)
                assert word in text, (init, text)
        count = await settle_fds(agent.pid, base + SLACK)
        assert count <= base + SLACK, f"{count - base} more descriptors after 100 hostile exec requests"

        # The agent's working directory disappears: refused with a reason, nothing leaks, and back.
        workdir.rmdir()
        for tty in (False, True) * 5:
            got_error, text, _ = await exec_outcome(channel, wf, command=["true"], tty=tty)
            assert got_error == FAILED_PRECONDITION and "working directory" in text, text
        workdir.mkdir()
        count = await settle_fds(agent.pid, base + SLACK)
        assert count <= base + SLACK, f"{count - base} more descriptors after the workdir refusals"

        # A real client still gets a normal exec, piped and with a TTY size.
        args = ["--router-address", router.address, "--workflow-id", wf, "--tls=false"]
        result = run_client("exec", *args, "--", "cat", input=b"still here\n")
        assert (result.returncode, result.stdout) == (0, b"still here\n"), result.stderr
        assert await exec_outcome(channel, wf, command=["pwd"], tty=True, size=pb.TerminalSize(rows=65535, cols=1))
        assert fd_count(agent.pid) <= base + SLACK
    finally:
        agent.stop()


def datagram_frame(peer: str, payload: bytes = b"ping") -> bytes:
    from osmo_router.wire.protocol import pb

    return frame(datagram=pb.Datagram(peer=peer, payload=payload))


class UdpSession:
    """One raw UDP port-forward session; replies are collected by peer."""

    def __init__(self, channel: grpc.aio.Channel, workflow: str, port: int) -> None:
        self.call = RawCall(channel, PORT_FORWARD, None)
        self.workflow, self.port = workflow, port
        self.replies: dict[str, list[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from osmo_router.wire.protocol import pb

        init = pb.PortForwardInit(
            target=pb.SessionTarget(workflow_id=self.workflow), protocol=pb.PROTOCOL_UDP, remote_port=self.port
        )
        assert await self.call.send(pb.PortForwardRequest(init=init).SerializeToString())
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from osmo_router.wire.protocol import pb

        while (raw := await self.call.read(timeout=120)) is not None:
            response = pb.PortForwardResponse.FromString(raw)
            if response.WhichOneof("kind") == "frame" and response.frame.WhichOneof("kind") == "datagram":
                datagram = response.frame.datagram
                self.replies.setdefault(datagram.peer, []).append(datagram.payload)

    async def flood(self, senders: int, tag: str) -> None:
        assert await self.call.send(*(datagram_frame(f"{tag}:{i}") for i in range(senders)))

    async def probe(self, name: str, timeout: float = WAIT, every: float = 0.2) -> bool:
        """Send from `name` (again every `every` s) until the echo comes back; False after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert await self.call.send(datagram_frame(name))
            wait_until = time.monotonic() + every
            while time.monotonic() < min(wait_until, deadline):
                if self.replies.get(name):
                    return True
                await asyncio.sleep(0.01)
        return False

    async def end(self) -> None:
        from osmo_router.wire.protocol import pb

        await self.call.send(frame(half_close=pb.HalfClose()))
        await self.call.finish()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


@pytest.mark.asyncio
async def test_udp_floods_are_capped_per_session_and_per_agent(router: Router, channel: grpc.aio.Channel) -> None:
    wf = "wf-udp-flood"
    per_session, total = 40, 100
    agent = AgentProc(
        router.address,
        wf,
        "--max-udp-sockets-per-session",
        str(per_session),
        env={"OSMO_MAX_UDP_SOCKETS": str(total)},  # the environment variable form
    )
    sessions: list[UdpSession] = []
    try:
        with udp_echo_server() as port:
            warm = UdpSession(channel, wf, port)
            await warm.start()
            assert await warm.probe("warm:0")
            await warm.end()
            base = fd_count(agent.pid)

            flood_started = time.monotonic()
            # Three sessions flood from 200 senders each: each holds at most 40 sockets, and the
            # third fills the agent's 100 (then makes room from its own mappings only).
            for n in range(3):
                session = UdpSession(channel, wf, port)
                sessions.append(session)
                await session.start()
                await session.flood(200, f"s{n}")
                assert await session.probe(f"s{n}:probe"), f"session {n}: no echo after its flood"
                held = fd_count(agent.pid) - base
                assert held <= min(per_session * (n + 1), total) + SLACK, (n, held)
            held = fd_count(agent.pid) - base
            assert held >= total - SLACK, f"the caps were not reached ({held} sockets)"

            # A fourth session has no mapping to give up while the agent is full: its datagrams are
            # dropped and counted (the agent handles a session's frames in order, so its end
            # record comes after all 50).
            fourth = UdpSession(channel, wf, port)
            await fourth.start()
            await fourth.flood(50, "s3")
            await fourth.end()
            record = agent.wait_for(lambda r: r.get("event") == "udp_forward_end" and r.get("refused") == 50)
            assert record["evicted"] == 0, record
            assert fd_count(agent.pid) - base <= total + SLACK
            # Once a session ends, a new one gets room again.
            await sessions.pop(0).end()
            fifth = UdpSession(channel, wf, port)
            sessions.append(fifth)
            await fifth.start()
            assert await fifth.probe("s4:probe"), "a new session never got room after one ended"
            # Warned, but rate-limited: one per 10 s at most for the ~700 evictions and drops.
            warnings = [r for r in agent.events() if r.get("event") == "udp_socket_cap"]
            elapsed = time.monotonic() - flood_started
            assert 1 <= len(warnings) <= 1 + elapsed / 10, (len(warnings), elapsed)

            for session in sessions:
                await session.end()
            sessions.clear()
            count = await settle_fds(agent.pid, base + SLACK)
            assert count <= base + SLACK, f"{count - base} descriptors left after the UDP sessions ended"

            # A normal UDP forward through the real client still echoes.
            args = ["--router-address", router.address, "--workflow-id", wf, "--tls=false"]
            proc, (local,) = start_forward(args, "--protocol", "udp", f":{port}")
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(1.0)
                    deadline = time.monotonic() + WAIT
                    reply = b""
                    while not reply and time.monotonic() < deadline:
                        sock.sendto(b"hello", ("127.0.0.1", local))
                        try:
                            reply = sock.recv(100)
                        except TimeoutError:
                            continue
                    assert reply == b"echo:hello"
            finally:
                proc.stop()
    finally:
        for session in sessions:
            session.call.cancel()
        agent.stop()


@pytest.mark.asyncio
async def test_an_oversized_resize_is_ignored_and_the_tty_session_goes_on(
    router: Router, channel: grpc.aio.Channel
) -> None:
    from osmo_router.wire.protocol import pb

    wf = "wf-resize"
    agent = AgentProc(router.address, wf)
    try:
        call = RawCall(channel, EXEC, None)
        script = "read line; stty size; echo got:$line"
        assert await call.send(exec_init(wf, command=["sh", "-c", script], tty=True))
        huge = pb.Resize(size=pb.TerminalSize(rows=1 << 20, cols=70000))
        assert await call.send(
            frame(resize=huge),
            frame(resize=pb.Resize(size=pb.TerminalSize(rows=33, cols=99))),
            frame(data=b"hello\n"),
            frame(half_close={}),
        )
        outcome = await call.finish()
        output, exit_code = b"", None
        for raw in outcome.responses:
            response = pb.ExecResponse.FromString(raw)
            if response.WhichOneof("kind") == "frame":
                output += response.frame.data
                if response.frame.WhichOneof("kind") == "exit_status":
                    exit_code = response.frame.exit_status.code
        assert b"33 99" in output and b"got:hello" in output, output
        assert exit_code == 0, output
        assert any("resize to 1048576x70000 ignored" in line for line in agent.lines), agent.lines[-5:]
    finally:
        agent.stop()


@pytest.mark.asyncio
async def test_an_agent_out_of_descriptors_says_so_and_recovers(router: Router, channel: grpc.aio.Channel) -> None:
    import resource

    wf = "wf-emfile"
    agent = AgentProc(router.address, wf)
    try:
        assert await exec_outcome(channel, wf, command=["true"]) == (None, "", 0)
        base = await steady_fds(agent.pid)
        soft, hard = resource.prlimit(agent.pid, resource.RLIMIT_NOFILE)
        # Room for two more descriptors: not enough for a session's pipes or terminal.
        resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (base + 2, hard))
        for tty in (False, True) * 5:
            _, text, exit_code = await exec_outcome(channel, wf, command=["true"], tty=tty)
            assert exit_code == 126 and "Too many open files" in text, (tty, text)
        assert fd_count(agent.pid) <= base + SLACK
        resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert await exec_outcome(channel, wf, command=["true"]) == (None, "", 0)
        assert await exec_outcome(channel, wf, command=["true"], tty=True) == (None, "", 0)
        assert await settle_fds(agent.pid, base + SLACK) <= base + SLACK
    finally:
        agent.stop()


@pytest.mark.asyncio
async def test_the_default_caps_hold_three_floods_to_256_sockets_each(
    router: Router, channel: grpc.aio.Channel
) -> None:
    wf = "wf-udp-defaults"
    agent = AgentProc(router.address, wf)
    sessions: list[UdpSession] = []
    try:
        with udp_echo_server() as port:
            base = fd_count(agent.pid)
            for n in range(3):  # the case: three sessions of 400 senders took 3,190 descriptors
                session = UdpSession(channel, wf, port)
                sessions.append(session)
                await session.start()
                await session.flood(400, f"s{n}")
                assert await session.probe(f"s{n}:probe"), f"session {n}: no echo after its flood"
                held = fd_count(agent.pid) - base
                assert 256 * (n + 1) - SLACK <= held <= 256 * (n + 1) + SLACK, (n, held)
            for session in sessions:
                await session.end()
            sessions.clear()
            assert await settle_fds(agent.pid, base + SLACK) <= base + SLACK
    finally:
        for session in sessions:
            session.call.cancel()
        agent.stop()


@pytest.mark.asyncio
async def test_udp_senders_beyond_the_descriptor_limit_are_dropped_with_one_warning(
    router: Router, channel: grpc.aio.Channel
) -> None:
    import resource

    wf = "wf-udp-emfile"
    agent = AgentProc(router.address, wf)
    try:
        with udp_echo_server() as port:
            base = fd_count(agent.pid)
            soft, hard = resource.prlimit(agent.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (base + 3, hard))
            session = UdpSession(channel, wf, port)
            await session.start()
            await session.flood(100, "s")
            await session.end()
            record = agent.wait_for(lambda r: r.get("event") == "udp_forward_end")
            assert record["refused"] >= 90, record
            warnings = [r for r in agent.events() if r.get("event") == "udp_socket_cap"]
            assert 1 <= len(warnings) <= 2 and "Too many open files" in warnings[0]["msg"], warnings
            resource.prlimit(agent.pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert await settle_fds(agent.pid, base + SLACK) <= base + SLACK
            again = UdpSession(channel, wf, port)
            await again.start()
            assert await again.probe("after"), "no echo once descriptors were available again"
            await again.end()
    finally:
        agent.stop()
