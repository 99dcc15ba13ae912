"""Resumable sessions on one router (issue 17): SIGTERM and restart in place, and what the router counts.

A draining router ends each resumable session as a break (UNAVAILABLE "router draining") instead
of waiting for it, so it exits at once; the client resumes once the router is back. Refused
resumes are counted by cause and written to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import grpc

from osmo_router.wire.codec import ENCODED_SESSION_END
from osmo_router.wire.keys import key_of_secret
from osmo_router.wire.protocol import pb
from tests.harness import AgentProc, Router, metric_value
from tests.raw_grpc import EXEC, RawCall, exchange, raw_channel
from tests.resume_kit import MIB, CatRoundTrip


def test_sigterm_then_restart_in_place_resumes_the_session(workflow: str) -> None:
    router = Router("--drain-timeout=120s")
    agent = AgentProc(router.address, workflow)
    dial = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    cat = CatRoundTrip(dial, 32 * MIB)
    restarted = None
    try:
        cat.wait_received(8 * MIB)
        router.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert router.wait_event("draining")["moved"] == 1
        assert router.wait_exit(60) == 0
        assert time.monotonic() - signalled < 30, "the router waited for a session it could move"
        restarted = Router("--port", str(router.port))
        cat.wait_stderr("session resumed", timeout=60)
        assert cat.finish() == 0, cat.stderr
        # A router without replicas does not promise one (a helper read it so, 2026-12-02).
        said = "\n".join(cat.stderr)
        assert "resumes once the router is back" in said and "on another replica" not in said, said
        assert cat.intact, f"{cat.received} of {len(cat.blob)} bytes, or not the same bytes"
        resumed = restarted.wait_event("session resumed")
        assert resumed["operation"] == "exec" and resumed["workflow"] == workflow, resumed
        assert {"replayed_to_agent", "replayed_to_client"} <= resumed.keys()
        text = restarted.metrics_text()
        assert metric_value(text, "router_grpc_resumes_total", {"operation": "exec"}) == 1
        replayed = metric_value(
            text, "router_grpc_resume_replayed_bytes_total", {"operation": "exec", "direction": "agent_to_client"}
        )
        assert replayed == resumed["replayed_to_client"]
    finally:
        cat.stop()
        agent.stop()
        router.stop()
        if restarted is not None:
            restarted.stop()


async def _resume(address: str, workflow: str, key: str) -> list[pb.Frame]:
    """A resume of session `key`: the frames that came back (the router's ready first)."""
    target = pb.SessionTarget(
        workflow_id=workflow, session_key=key, resume=pb.ResumeToken(secret="s" * 32, resuming=True, sent=7)
    )
    init = pb.ExecRequest(init=pb.ExecInit(target=target, command=["cat"])).SerializeToString()
    async with raw_channel(address) as channel:
        call = RawCall(channel, EXEC, None)
        await call.send(init)
        # Read until the router says the session is over (or the call ends), then end our side.
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (message := await call.read()) is not None and message != ENCODED_SESSION_END:
                pass
        outcome = await call.finish()
    assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), outcome
    return [pb.ExecResponse.FromString(raw).frame for raw in outcome.responses if raw[:1] == b"\x12"]


def test_refused_resumes_are_counted_by_cause(router: Router, agent: AgentProc, workflow: str) -> None:
    # The agent holds no such session: it refuses with NOT_FOUND, which the client sees as an Error frame.
    frames = asyncio.run(_resume(router.address, workflow, "no-such-session"))
    assert frames and frames[0].WhichOneof("kind") == "error", frames
    assert frames[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    # No agent for the workflow: the router refuses the resume itself.
    assert asyncio.run(_resume(router.address, f"{workflow}-nobody", "k")) == []
    text = router.metrics_text()
    for cause in ("not_found", "no_agent"):
        labels = {"operation": "exec", "cause": cause}
        assert metric_value(text, "router_grpc_resume_failures_total", labels) == 1, cause
    assert metric_value(text, "router_grpc_resumes_total", {"operation": "exec"}) == 0
    refused = router.wait_for(lambda r: r.get("event") == "resume refused" and r.get("cause") == "not_found")
    assert refused["code"] == "NOT_FOUND" and refused["workflow"] == workflow
    router.wait_for(lambda r: r.get("event") == "resume refused" and r.get("cause") == "no_agent")


async def _keyed_sessions(address: str, workflow: str) -> tuple[str, grpc.StatusCode, grpc.StatusCode]:
    """A session named after its resume secret: the key its ready names, then how a second init with the same
    secret (while the first runs) and one with a short secret end."""
    secret = "0123456789abcdef" * 2

    def init(secret: str) -> bytes:
        token = pb.ResumeToken(secret=secret, key_from_secret=True)
        target = pb.SessionTarget(workflow_id=workflow, resume=token)
        return pb.ExecRequest(init=pb.ExecInit(target=target, command=["cat"])).SerializeToString()

    async with raw_channel(address) as channel:
        first = RawCall(channel, EXEC, None)
        await first.send(init(secret))
        ready = pb.ExecResponse.FromString(await first.read() or b"").ready
        again = await exchange(channel, EXEC, None, init(secret))
        short = await exchange(channel, EXEC, None, init("s" * 16))
        first.cancel()
    return ready.session_key, again.code, short.code


def test_a_session_named_after_its_secret(router: Router, agent: AgentProc, workflow: str) -> None:
    key, again, short = asyncio.run(_keyed_sessions(router.address, workflow))
    assert key == key_of_secret("0123456789abcdef" * 2)
    # The same secret again is a replay (a client draws a new one per session): the key is not its.
    assert again == grpc.StatusCode.ALREADY_EXISTS
    assert short == grpc.StatusCode.INVALID_ARGUMENT
