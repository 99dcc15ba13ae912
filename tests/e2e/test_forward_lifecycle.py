"""port-forward lifecycle end to end: no agent, agent or router lost, --reconnect, idle expiry, TLS + tokens."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from osmo_router.wire.protocol import CLOSE_GRACE
from tests.forward_servers import (
    TIMEOUT,
    echo,
    echo_round_trip,
    firehose,
    recv_exactly,
    start_forward,
    tcp_server,
    wait_line,
)
from tests.harness import AgentProc, Proc, Router, client_cmd
from tests.security_kit import Pki, Signer


def test_no_agent_gives_255_and_a_clear_line(router: Router) -> None:
    args = ["--router-address", router.address, "--workflow-id", "wf-nobody", "--tls=false"]
    proc = Proc(client_cmd("port-forward", *args, ":8080"))
    try:
        assert proc.wait_exit(TIMEOUT) == 255
        assert proc.out_lines == []  # never announced a forward
        assert any("wf-nobody" in line and "UNAVAILABLE" in line for line in proc.lines), proc.lines
    finally:
        proc.stop()


def test_a_local_port_in_use_exits_1_and_ends_its_session_cleanly(
    router: Router, workflow: str, client_args: list[str]
) -> None:
    agent = AgentProc(router.address, workflow)
    busy = socket.create_server(("127.0.0.1", 0))
    # Both loopbacks taken: localhost (the default) forwards on either one, and fails only if neither binds.
    busy6 = socket.create_server(("::1", busy.getsockname()[1]), family=socket.AF_INET6)
    proc = Proc(client_cmd("port-forward", *client_args, f"{busy.getsockname()[1]}:8080"))
    try:
        assert proc.wait_exit(TIMEOUT) == 1
        said = f"cannot listen: 127.0.0.1:{busy.getsockname()[1]}: Address already in use"
        assert any(said in line for line in proc.lines), proc.lines
        # Its agent check ends like a Ctrl-C: no "resuming" line, and the router saw a clean end.
        assert not any("resum" in line for line in proc.lines), proc.lines
        end = router.wait_for(lambda r: r.get("event") == "session end", timeout=TIMEOUT)
        assert end["status"] == "OK", end
    finally:
        proc.stop()
        agent.stop()
        busy.close()
        busy6.close()


#: A short resume grace for the tests whose agent or router is gone for good (issue 17: a break is
#: resumed first; the forward gives up once the grace passed).
GRACE = ["--resume-grace", "2s"]


def test_agent_lost_exits_255(router: Router, workflow: str, client_args: list[str]) -> None:
    agent = AgentProc(router.address, workflow)
    proc, _ = start_forward([*client_args, *GRACE], ":8080")
    try:
        agent.popen.kill()
        assert proc.wait_exit(TIMEOUT) == 255
        assert any("the agent or the router is gone" in line for line in proc.lines), proc.lines
        assert any("could not be resumed within 2s" in line for line in proc.lines), proc.lines
    finally:
        proc.stop()
        agent.stop()


def test_reconnect_waits_for_the_first_agent(router: Router, workflow: str, client_args: list[str]) -> None:
    with tcp_server(echo) as port:
        proc = Proc(client_cmd("port-forward", *client_args, "--reconnect", f":{port}"))
        agent: AgentProc | None = None
        try:
            wait_line(proc, lambda ln: "waiting for an agent" in ln)
            assert proc.out_lines == []  # nothing listens before the agent is there
            agent = AgentProc(router.address, workflow)
            line = proc.wait_for(lambda r: r["line"].startswith("Forwarding from"), stdout=True)["line"]
            local = int(line.split()[2].rsplit(":", 1)[1])
            assert echo_round_trip(local, b"first agent") == b"first agent"
        finally:
            proc.stop()
            if agent is not None:
                agent.stop()


def test_idle_expiry_of_the_watch_is_not_a_loss(workflow: str) -> None:
    router = Router("--session-ttl", "1s")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    with tcp_server(echo) as port:
        proc, (local,) = start_forward(args, f":{port}")
        try:
            router.wait_for(lambda r: r.get("event") == "session end" and r.get("status") == "DEADLINE_EXCEEDED")
            assert echo_round_trip(local, b"after expiry") == b"after expiry"
            assert proc.popen.poll() is None
            assert not any("is gone" in line for line in proc.lines), proc.lines
        finally:
            proc.stop()
            agent.stop()
            router.stop()


def test_router_lost_exits_255(workflow: str) -> None:
    router = Router()
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", *GRACE]
    proc, _ = start_forward(args, ":8080")
    try:
        router.popen.kill()
        assert proc.wait_exit(TIMEOUT) == 255
        assert any("the agent or the router is gone" in line for line in proc.lines), proc.lines
        assert any("could not be resumed within 2s" in line for line in proc.lines), proc.lines
    finally:
        proc.stop()
        agent.stop()
        router.stop()


def test_a_signal_while_the_router_is_unreachable_exits_at_once(workflow: str) -> None:
    # The watch waits to resume; its clean end (half-close, then the agent's end) has nobody to
    # talk to, so it must not hold the exit for CLOSE_GRACE (5 s).
    router = Router()
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    proc, _ = start_forward(args, ":8080")
    try:
        router.popen.kill()
        wait_line(proc, lambda ln: "resuming the session" in ln)
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.wait_exit(TIMEOUT) == 0
        assert time.monotonic() - started < CLOSE_GRACE - 1
    finally:
        proc.stop()
        agent.stop()
        router.stop()


def test_reconnect_survives_an_agent_restart(router: Router, workflow: str, client_args: list[str]) -> None:
    first = AgentProc(router.address, workflow)
    with tcp_server(echo) as port:
        proc, (local,) = start_forward(client_args, "--reconnect", f":{port}")
        second: AgentProc | None = None
        try:
            assert echo_round_trip(local, b"before") == b"before"
            first.popen.kill()
            # The watch tries to resume (issue 17); the new agent holds no such session (NOT_FOUND):
            # that, not a grace running out, is how the forward learns the agent restarted.
            wait_line(proc, lambda ln: "resuming the session" in ln)
            second = AgentProc(router.address, workflow)
            wait_line(proc, lambda ln: "is gone" in ln and "reconnecting" in ln and "NOT_FOUND" in ln)
            wait_line(proc, lambda ln: "agent is back" in ln)
            assert echo_round_trip(local, b"after") == b"after"
            assert proc.popen.poll() is None
        finally:
            proc.stop()
            first.stop()
            if second is not None:
                second.stop()


def test_forward_over_tls_with_tokens(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    signer = Signer.rs256()
    (tmp_path / "jwt.pub.pem").write_bytes(signer.public_pem())
    router = Router(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--auth=jwt", "--jwt-public-key", str(tmp_path / "jwt.pub.pem")),
        secure=True,
    )
    agent_token = signer.token("pod-1", workflows=["wf-tls"], role="agent")
    agent = AgentProc(router.address, "wf-tls", "--tls-ca", str(pki.ca), "--token", agent_token, tls=True)
    base = ["--router-address", router.address, "--workflow-id", "wf-tls", "--tls-ca", str(pki.ca)]
    with tcp_server(echo) as port:
        proc, (local,) = start_forward([*base, "--token", signer.token("alice", workflows=["wf-tls"])], f":{port}")
        # A user whose token does not cover the workflow is refused before anything listens.
        intruder = Proc(client_cmd("port-forward", *base, "--token", signer.token("mallory", workflows=["x"]), ":1"))
        try:
            assert echo_round_trip(local, b"over tls") == b"over tls"
            end = router.wait_for(lambda r: r.get("event") == "session end" and r.get("user") == "alice")
            assert end["operation"] == "portforward"
            assert intruder.wait_exit(TIMEOUT) == 255
            assert intruder.out_lines == []
            assert any("PERMISSION_DENIED" in line for line in intruder.lines), intruder.lines
        finally:
            intruder.stop()
            proc.stop()
            agent.stop()
            router.stop()


def test_a_connection_reset_locally_mid_download_frees_its_session_at_once(workflow: str) -> None:
    # A local application killed while it downloads (curl -m, a browser tab closed): the client tells
    # the agent (an Error frame) and cancels the stream. It used to half-close the stream first, and
    # a call whose END_STREAM went out is not reset by its cancel: the router, holding data for the
    # connection that nobody read any more, kept the session (its slot of --max-connections-per-forward,
    # megabytes of held data) until the whole port-forward ended. Here the forward may hold two
    # sessions (its watch and one connection), so a second download works only if the first was freed.
    router = Router("--max-connections-per-forward", "2")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]

    def cancelled() -> list[dict[str, object]]:
        return [r for r in router.events() if r.get("event") == "session end" and r.get("status") == "CANCELLED"]

    with tcp_server(firehose) as target:
        proc, (port,) = start_forward(args, f":{target}")
        try:
            for attempt in range(2):
                conn = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                conn.sendall(b"GET /big HTTP/1.1\r\n\r\n")  # a request, as curl's
                assert len(recv_exactly(conn, 1 << 20)) == 1 << 20, f"download {attempt} got no data"
                # A slow reader (curl --limit-rate 1M -m 3): the client's buffers and the router's fill.
                slow_until = time.monotonic() + 3
                while time.monotonic() < slow_until:
                    recv_exactly(conn, 64 << 10)
                    time.sleep(1 / 16)  # the reader's pace under test, not a wait for an event
                conn.close()  # with the firehose's data unread: a reset
                # This connection's end: the n-th such record (those of the earlier ones are still there).
                router.wait_for(lambda _record, n=attempt: len(cancelled()) > n, timeout=TIMEOUT)
                end = cancelled()[attempt]
                assert end["reason"] == "the client went away", end
            assert not any("maximum" in line for line in proc.lines), proc.lines
        finally:
            proc.stop()
            agent.stop()
            router.stop()
