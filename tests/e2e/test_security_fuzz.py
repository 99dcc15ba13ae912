"""Fuzzing every RPC with random bytes and random, out-of-order messages (hypothesis, derandomized).

Each example opens one to three raw calls at once (any RPC, any of four credentials) and sends a
random mix of inits for the right or the wrong RPC, frames, heartbeats and garbage, then half-closes.
Calls of one example may share a session key, so fake clients and fake agents meet mid-fuzz. Every
call must end with a gRPC status within a bound; afterwards the router must hold no session, have
logged no servicer error, and still serve a good exec session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osmo_router.wire.protocol import pb
from tests.harness import AgentProc, Router, run_client
from tests.raw_grpc import ALL_METHODS, CONNECT, EXEC, PORT_FORWARD, REGISTER, RSYNC, RawCall, raw_channel, wait_metric
from tests.security_kit import Signer

SIGNER = Signer.rs256()
GOOD_WF = "wf-good"
FUZZ_WFS = ["wf-fuzz", "wf-nowhere"]
SHARED_KEY = "shared-key-of-22-chars"
TOKENS: dict[str, str | None] = {
    "user": SIGNER.token("fuzzer", workflows=FUZZ_WFS),
    "agent": SIGNER.token("fuzz-pod", workflows=FUZZ_WFS, role="agent"),
    "none": None,
    "garbage": "not.a.jwt",
}


@dataclass
class FuzzEnv:
    """The router under fuzz, its real agent, and one event loop + channel for every example."""

    router: Router
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzEnv]:
    key = Path(tmp_path_factory.mktemp("fuzz")) / "jwt.pub.pem"
    key.write_bytes(SIGNER.public_pem())
    router = Router(
        *("--tls-enabled=false", "--auth=jwt", "--jwt-public-key", str(key)),
        *("--init-timeout", "2s", "--rendezvous-timeout", "300ms", "--max-message-size", "2097152"),
        secure=True,
    )
    agent = AgentProc(router.address, GOOD_WF, "--token", SIGNER.token("pod", workflows=[GOOD_WF], role="agent"))
    loop = asyncio.new_event_loop()

    async def make_channel() -> grpc.aio.Channel:
        return raw_channel(router.address)

    channel = loop.run_until_complete(make_channel())
    try:
        yield FuzzEnv(router, loop, channel)
    finally:
        loop.run_until_complete(channel.close())
        loop.close()
        agent.stop()
        router.stop()


texts = st.text(max_size=12) | st.sampled_from(["", "x" * 300, "bad\nid"])
workflows = st.sampled_from([*FUZZ_WFS, GOOD_WF]) | texts
keys = st.sampled_from(["", SHARED_KEY]) | texts
targets = st.builds(pb.SessionTarget, workflow_id=workflows, task=st.sampled_from(["", "t1"]), session_key=keys)

frames = st.one_of(
    st.builds(pb.Frame, data=st.binary(max_size=64)),
    st.builds(pb.Frame, stderr=st.binary(max_size=16)),
    st.just(pb.Frame(half_close=pb.HalfClose())),
    st.builds(lambda n: pb.Frame(signal=pb.Signal(number=n)), st.integers(0, 2**32 - 1)),
    st.builds(lambda c: pb.Frame(exit_status=pb.ExitStatus(code=c)), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda c, m: pb.Frame(error=pb.Error(code=c, message=m)), st.integers(-5, 20), texts),
    st.builds(lambda r: pb.Frame(resize=pb.Resize(size=pb.TerminalSize(rows=r, cols=r))), st.integers(0, 999)),
    st.builds(lambda p, a: pb.Frame(datagram=pb.Datagram(payload=p, peer=a)), st.binary(max_size=16), texts),
)

inits = {
    EXEC: st.builds(
        lambda t, c, tty: pb.ExecRequest(init=pb.ExecInit(target=t, command=c, tty=tty)),
        targets,
        st.lists(texts, max_size=3),
        st.booleans(),
    ),
    PORT_FORWARD: st.builds(
        lambda t, p: pb.PortForwardRequest(init=pb.PortForwardInit(target=t, remote_port=p)),
        targets,
        st.integers(0, 70000),
    ),
    RSYNC: st.builds(
        lambda t, a: pb.RsyncRequest(init=pb.RsyncInit(target=t, server_args=a)), targets, st.lists(texts, max_size=3)
    ),
    REGISTER: st.builds(
        lambda w, a: pb.RegisterRequest(hello=pb.AgentHello(workflow_id=w, agent_id=a)), workflows, texts
    ),
    CONNECT: st.builds(
        lambda k, w, a: pb.ConnectRequest(init=pb.ConnectInit(session_key=k, workflow_id=w, agent_id=a)),
        keys,
        workflows,
        texts,
    ),
}
any_init = st.one_of(*inits.values()).map(lambda m: m.SerializeToString())
messages = st.one_of(
    any_init,
    frames.map(lambda f: pb.ExecRequest(frame=f).SerializeToString()),
    st.just(pb.RegisterRequest(heartbeat=pb.Heartbeat()).SerializeToString()),
    st.binary(max_size=96),
)


good_targets = st.builds(
    pb.SessionTarget, workflow_id=st.sampled_from(FUZZ_WFS), session_key=st.sampled_from(["", SHARED_KEY])
)
#: Inits that pass validation, so examples reach the rendezvous and the relay, not only the front door.
good_inits = {
    EXEC: st.builds(lambda t: pb.ExecRequest(init=pb.ExecInit(target=t, command=["x"])), good_targets),
    PORT_FORWARD: st.builds(lambda t: pb.PortForwardRequest(init=pb.PortForwardInit(target=t)), good_targets),
    RSYNC: st.builds(lambda t: pb.RsyncRequest(init=pb.RsyncInit(target=t)), good_targets),
    REGISTER: st.builds(
        lambda w, a: pb.RegisterRequest(hello=pb.AgentHello(workflow_id=w, agent_id=a)),
        st.sampled_from(FUZZ_WFS),
        st.sampled_from(["fake-1", "fake-2"]),
    ),
    CONNECT: st.builds(
        lambda k, w: pb.ConnectRequest(init=pb.ConnectInit(session_key=k, workflow_id=w, agent_id="fake")),
        st.sampled_from([SHARED_KEY, "another-key-of-22chars"]),
        st.sampled_from(FUZZ_WFS),
    ),
}


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, str, list[bytes]]:
    """One raw call: method, credential, messages. Half the calls open well (right token, valid init)."""
    method = draw(st.sampled_from(ALL_METHODS))
    body = draw(st.lists(messages, max_size=5))
    if draw(st.booleans()):
        token = "agent" if method in (REGISTER, CONNECT) else "user"
        body.insert(0, draw(good_inits[method]).SerializeToString())
    else:
        token = draw(st.sampled_from(sorted(TOKENS)))
        if draw(st.booleans()):
            body.insert(0, draw(inits[method]).SerializeToString())
    return method, token, body


frame_messages = frames.map(lambda f: pb.ExecRequest(frame=f).SerializeToString())


@st.composite
def pairs(draw: st.DrawFn) -> list[tuple[str, str, list[bytes]]]:
    """A client and a fake agent that meet on the shared key, then exchange random frames."""
    workflow = draw(st.sampled_from(FUZZ_WFS))
    target = pb.SessionTarget(workflow_id=workflow, session_key=SHARED_KEY)
    method = draw(st.sampled_from([EXEC, PORT_FORWARD, RSYNC]))
    client_init = draw(good_inits[method]).SerializeToString()
    # Re-target the drawn init at the shared key and workflow (the target is field 1 of every init).
    request: Any = {EXEC: pb.ExecRequest, PORT_FORWARD: pb.PortForwardRequest, RSYNC: pb.RsyncRequest}[method]
    message = request.FromString(client_init)
    message.init.target.CopyFrom(target)
    agent_init = pb.ConnectRequest(init=pb.ConnectInit(session_key=SHARED_KEY, workflow_id=workflow, agent_id="fake"))
    return [
        (method, "user", [message.SerializeToString(), *draw(st.lists(frame_messages | messages, max_size=6))]),
        (CONNECT, "agent", [agent_init.SerializeToString(), *draw(st.lists(frame_messages, max_size=6))]),
    ]


async def run_example(env: FuzzEnv, example: list[tuple[str, str, list[bytes]]]) -> None:
    async def one(method: str, token: str, body: list[bytes]) -> None:
        call = RawCall(env.channel, method, TOKENS[token])
        await call.send(*body)
        try:
            outcome = await call.finish(timeout=15)
        except TimeoutError:
            call.cancel()
            raise AssertionError(f"{method} with {token} token hung on {body!r}") from None
        assert isinstance(outcome.code, grpc.StatusCode)
        assert outcome.code != grpc.StatusCode.UNKNOWN, (method, body, outcome)

    await asyncio.gather(*(one(*c) for c in example))


def test_fuzz_every_rpc_then_serve_a_good_session(env: FuzzEnv) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(example=pairs() | st.lists(calls(), min_size=1, max_size=3))
    def fuzz(example: list[tuple[str, str, list[bytes]]]) -> None:
        env.loop.run_until_complete(run_example(env, example))

    fuzz()
    router = env.router

    async def settled() -> None:
        await wait_metric(router, "router_grpc_sessions_active", 0)
        await wait_metric(router, "router_grpc_rendezvous_pending", 0)
        await wait_metric(router, "router_grpc_agents_registered", 1)

    env.loop.run_until_complete(settled())
    errors = [r for r in router.events() if r.get("level") in ("error", "critical")]
    assert not errors, errors[:3]
    refused = {r.get("code") for r in router.events() if r.get("event") == "session refused"}
    assert {"UNAUTHENTICATED", "INVALID_ARGUMENT", "PERMISSION_DENIED"} <= refused, refused
    token = SIGNER.token("alice", workflows=[GOOD_WF])
    args = ["--router-address", router.address, "--workflow-id", GOOD_WF, "--tls=false", "--token", token]
    result = run_client("exec", *args, "--", "echo", "still serving")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"still serving\n"
