"""One user cannot take every resumable-session slot of an agent (agent/held_sessions.py MAX_HELD_PER_USER).

The agent holds at most MAX_HELD (256) sessions across breaks, and one user's at most MAX_HELD_PER_USER
(64) of them: her further sessions run without resume. Before, one user's 256 held sessions (cheap:
`sleep`, detached) left every other user of the agent with sessions that ended at the first break.
Real router (JWT) and agent; mallory opens all but one of the agent's slots' worth of sessions with raw
gRPC calls (cheap, in parallel), then one more with the real CLI's `exec --detach`, which must say why it
cannot detach; alice, on the same agent, detaches and attaches again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from osmo_router.agent.held_sessions import MAX_HELD, MAX_HELD_PER_USER
from osmo_router.wire.protocol import pb
from tests.harness import AgentProc, Router, run_client
from tests.raw_grpc import EXEC, RawCall, raw_channel
from tests.security_kit import Signer, jwt_router

WF = "wf-held-share"
#: Longest one step (all of mallory's sessions opened, one CLI run) may take.
STEP = 60.0


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Router, Signer]]:
    signer = Signer.rs256()
    router = jwt_router(tmp_path, signer)
    agent = AgentProc(router.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
    try:
        yield router, signer
    finally:
        agent.stop()
        router.stop()


async def _held(call: RawCall, number: int) -> pb.Resume:
    """Open a resumable `sleep` session on `call` and return the agent's first Resume frame."""
    resume = pb.ResumeToken(secret=f"mallory-{number:04d}".ljust(32, "x"))
    target = pb.SessionTarget(workflow_id=WF, resume=resume)
    init = pb.ExecRequest(init=pb.ExecInit(target=target, command=["sleep", "600"]))
    assert await call.send(init.SerializeToString())
    async with asyncio.timeout(STEP):
        while (message := await call.read()) is not None:
            response = pb.ExecResponse.FromString(message)
            if response.WhichOneof("kind") == "frame" and response.frame.WhichOneof("kind") == "resume":
                return response.frame.resume
    raise AssertionError(f"session {number} ended before the agent's Resume: {call.responses}")


def _flags(router: Router, token: str) -> list[str]:
    return ["--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", token]


@pytest.mark.asyncio
async def test_one_user_holds_at_most_her_share_of_resumable_sessions_and_another_user_resumes(
    setup: tuple[Router, Signer],
) -> None:
    router, signer = setup
    mallory = signer.token("mallory", workflows=[WF])
    channel = raw_channel(router.address)
    # As many sessions as the agent has slots, but one: all of them if one user could take them.
    calls = [RawCall(channel, EXEC, mallory) for _ in range(MAX_HELD - 1)]
    try:
        resumes = await asyncio.gather(*(_held(call, n) for n, call in enumerate(calls)))
        held = [r for r in resumes if r.grace_seconds > 0]
        assert len(held) == MAX_HELD_PER_USER, f"{len(held)} of mallory's {len(calls)} sessions are resumable"
        declined = {r.declined for r in resumes if r.grace_seconds == 0}
        assert declined == {f"the agent holds {MAX_HELD_PER_USER} resumable sessions of mallory already"}, declined

        # One more with the CLI: it runs without resume, and she is told why she cannot detach.
        extra = await asyncio.to_thread(
            run_client, "exec", *_flags(router, mallory), "--detach", "--", "sleep", "600", timeout=STEP
        )
        said = extra.stderr.decode(errors="replace")
        assert extra.returncode == 255 and extra.stdout == b"", said
        assert "cannot detach" in said and f"{MAX_HELD_PER_USER} resumable sessions of mallory" in said, said
        assert said.count("resumable sessions of mallory") == 1, said  # said once, not as a warning too

        # Alice, on the same agent meanwhile: her session is held, she detaches and attaches again.
        alice = _flags(router, signer.token("alice", workflows=[WF]))
        script = "echo before-detach; read line; echo got=$line; exit 3"
        started = await asyncio.to_thread(
            run_client, "exec", *alice, "--detach", "--", "sh", "-c", script, timeout=STEP
        )
        assert started.returncode == 0, started.stderr
        key = started.stdout.decode().strip()
        assert re.fullmatch(r"[A-Za-z0-9_-]{16,}", key), started.stdout
        attached = await asyncio.to_thread(run_client, "attach", key, *alice, input=b"hello\n", timeout=STEP)
        assert (attached.returncode, attached.stdout) == (3, b"before-detach\ngot=hello\n"), attached.stderr
    finally:
        for call in calls:
            call.cancel()
        await channel.close()
