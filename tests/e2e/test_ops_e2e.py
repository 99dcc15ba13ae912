"""Operations end to end: metrics after real sessions, health endpoints, graceful drain, keepalive."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import AgentProc, Proc, Router, client_cmd, metric_value, router_cmd, run_client


def _get(router: Router, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_after_an_exec_session(agent: AgentProc, router: Router, client_args: list[str]) -> None:
    payload = b"m" * 100_000
    result = run_client("exec", *client_args, "--", "cat", input=payload)
    assert result.returncode == 0 and result.stdout == payload
    text = router.metrics_text()
    to_agent = metric_value(text, "router_grpc_bytes_total", {"operation": "exec", "direction": "client_to_agent"})
    to_client = metric_value(text, "router_grpc_bytes_total", {"operation": "exec", "direction": "agent_to_client"})
    # Encoded frames: the payload plus a few bytes of framing per chunk, in each direction.
    assert len(payload) <= to_agent < len(payload) + 1000
    assert len(payload) <= to_client < len(payload) + 1000
    assert metric_value(text, "router_grpc_rendezvous_duration_seconds_count", {"operation": "exec"}) == 1
    assert metric_value(text, "router_grpc_sessions_active", {"operation": "exec"}) == 0
    assert metric_value(text, "router_grpc_sessions_total", {"operation": "exec"}) == 1
    assert metric_value(text, "router_grpc_agents_registered") == 1


def test_error_counted_under_its_code(router: Router) -> None:
    result = run_client(
        "exec", "--router-address", router.address, "--workflow-id", "nobody-home", "--tls=false", "--", "true"
    )
    assert result.returncode == 255
    assert (
        metric_value(router.metrics_text(), "router_grpc_errors_total", {"operation": "exec", "code": "UNAVAILABLE"})
        == 1
    )


def test_idle_session_expires_and_is_counted(workflow: str) -> None:
    router = Router("--session-ttl", "1s")
    agent = AgentProc(router.address, workflow)
    try:
        started = time.monotonic()
        result = run_client(
            "exec",
            "--router-address",
            router.address,
            "--workflow-id",
            workflow,
            "--tls=false",
            "--",
            "sleep",
            "60",
            timeout=60,
        )
        assert result.returncode == 255
        assert b"DEADLINE_EXCEEDED" in result.stderr and b"session-ttl" in result.stderr
        assert time.monotonic() - started < 30
        text = router.metrics_text()
        assert metric_value(text, "router_grpc_sessions_expired_total") == 1
        assert metric_value(text, "router_grpc_sessions_active", {"operation": "exec"}) == 0
    finally:
        agent.stop()
        router.stop()


def test_a_disabled_metrics_port_is_logged_as_off_not_as_port_0() -> None:
    # `--metrics-port -1` turns the port off; `0` asks for a free one. The "listening" line said
    # "metrics on port 0" for the former, which reads as "bound to a port the kernel picked", and
    # "websocket on port -1" for the latter: both now say "off" (the record's fields: -1).
    router = Router("--metrics-port", "-1", "--ws-port", "-1")
    try:
        record = router.wait_event("listening")
        assert (record["metrics_port"], record["ws_port"]) == (-1, -1), record
        assert "metrics off, websocket off" in record["msg"], record
    finally:
        router.stop()


def test_health_endpoints(router: Router) -> None:
    assert _get(router, "/healthz") == (200, "ok\n")
    assert _get(router, "/readyz") == (200, "ready\n")


async def _grpc_health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(reply.status)


def test_sigterm_drains_in_flight_sessions(workflow: str, tmp_path: Path) -> None:
    """A session that cannot resume is waited for (a resumable one is moved: test_resume_ops_e2e.py)."""
    router = Router("--drain-timeout", "20s")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    # The command runs until the test lets it end (not for a fixed time: on a loaded machine the drain
    # could otherwise be over before the late client below is refused).
    go_on = tmp_path / "go-on"
    command = ["sh", "-c", f"echo started; while [ ! -e {go_on} ]; do sleep 0.05; done; echo done"]
    in_flight = Proc(client_cmd("exec", *args, "--resume-grace=0", "--", *command))
    try:
        assert asyncio.run(_grpc_health(router.address)) == health_pb2.HealthCheckResponse.SERVING
        in_flight.wait_for(lambda r: r["line"] == "started", stdout=True)
        router.signal(signal.SIGTERM)
        router.wait_for(lambda r: str(r.get("msg", "")).startswith("draining"))
        assert _get(router, "/readyz")[0] == 503
        assert _get(router, "/healthz")[0] == 200
        assert asyncio.run(_grpc_health(router.address)) == health_pb2.HealthCheckResponse.NOT_SERVING
        refused = run_client("exec", *args, "--", "echo", "too-late")
        assert refused.returncode == 255 and b"draining" in refused.stderr
        go_on.touch()
        assert in_flight.wait_exit(30) == 0
        assert in_flight.out_lines == ["started", "done"]
        assert router.wait_exit(30) == 0
    finally:
        in_flight.stop()
        agent.stop()
        router.stop()


def test_a_session_that_outlives_the_drain_timeout_is_ended_by_the_router_and_audited_so(workflow: str) -> None:
    # A session that cannot resume and runs past --drain-timeout is cut by the router. Its audit line
    # said status CANCELLED, reason "the client went away" (the server's stop cancelled the call and
    # the relay took that for the client leaving), and the client read a bare "server shutting
    # down": neither says that the router's drain timeout ended it.
    router = Router("--drain-timeout", "1s")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    in_flight = Proc(client_cmd("exec", *args, "--resume-grace=0", "--", "sh", "-c", "echo started; sleep 60"))
    try:
        in_flight.wait_for(lambda r: r["line"] == "started", stdout=True)
        router.signal(signal.SIGTERM)
        assert router.wait_exit(30) == 0
        end = router.wait_event("session end")
        assert end["status"] == "UNAVAILABLE" and "--drain-timeout" in end["reason"], end
        assert in_flight.wait_exit(30) == 255
        assert any("--drain-timeout" in line for line in in_flight.lines), in_flight.lines
    finally:
        in_flight.stop()
        agent.stop()
        router.stop()


def test_a_second_sigterm_exits_at_once_without_waiting_for_the_drain(workflow: str) -> None:
    router = Router("--drain-timeout", "120s")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    # Without resume: a resumable session would be moved at the first signal, not cut off.
    in_flight = Proc(client_cmd("exec", *args, "--resume-grace=0", "--", "sh", "-c", "echo started; sleep 100"))
    try:
        in_flight.wait_for(lambda r: r["line"] == "started", stdout=True)
        router.signal(signal.SIGTERM)
        router.wait_for(lambda r: str(r.get("msg", "")).startswith("draining"))
        started = time.monotonic()
        router.signal(signal.SIGTERM)
        assert router.wait_exit(30) == 0
        # Far less than the 120 s drain and the session's 100 s: the second signal cut the drain short.
        assert time.monotonic() - started < 20
        assert any(str(r.get("msg", "")).startswith("second signal") for r in router.events())
        assert in_flight.wait_exit(30) == 255  # the session was cut off, and the client says so
    finally:
        in_flight.stop()
        agent.stop()
        router.stop()


def test_frozen_agent_is_detected_by_keepalive(workflow: str) -> None:
    router = Router("--keepalive-time", "1s", "--keepalive-timeout", "1s")
    agent = AgentProc(router.address, workflow)
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    # The session is resumable: the client first tries to resume it (a frozen agent never answers),
    # for a short grace here, then exits naming the cause.
    client = Proc(client_cmd("exec", *args, "--resume-grace", "3s", "--", "sh", "-c", "echo started; sleep 60"))
    try:
        client.wait_for(lambda r: r["line"] == "started", stdout=True)
        agent.signal(signal.SIGSTOP)  # the TCP connection stays up; only pings go unanswered
        started = time.monotonic()
        assert client.wait_exit(40) == 255
        assert time.monotonic() - started < 25 + 3
        assert any("agent disconnected" in line for line in client.lines), client.lines
        assert any("could not be resumed within 3s" in line for line in client.lines), client.lines
    finally:
        agent.signal(signal.SIGCONT)
        client.stop()
        agent.stop()
        router.stop()


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--port", "the gRPC port"), ("--metrics-port", "the metrics port"), ("--ws-port", "the WebSocket port")],
)
def test_a_port_in_use_is_named_with_its_flag(flag: str, what: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", "--ws-port": "-1", flag: str(port)}
        argv = router_cmd("serve", "--tls-enabled=false", "--auth=none", *(x for kv in ports.items() for x in kv))
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}, {what} ({flag}): Address already in use" in result.stderr
