"""A session's opening message counts in its user's budget while the router keeps it.

The router keeps each session's opening message (its init: command, environment...) for the
session's life, to send it to the agent (again at a resume); a client may make it as large as
--max-message-size (4 MiB). 100 waiting exec sessions of one user whose inits carried 2.9 MiB of
environment each grew the router by 287 MiB, in no budget (her 1,000 pending sessions: 2.9 GiB).
Now they count as held in her --user-buffer-bytes and the process's budget; one that does not fit
is refused RESOURCE_EXHAUSTED, and only hers.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc

from osmo_router.wire.protocol import pb
from tests.e2e.test_memory_idle import rss_kib
from tests.harness import AgentProc, exec_served
from tests.raw_grpc import EXEC, RawCall, raw_channel
from tests.security_kit import Signer, jwt_router

MIB = 1 << 20
USER_BUDGET = 16 * MIB
SESSIONS = 40
#: 50 variables of 60,000 bytes: an init of about 2.9 MiB.
ENV = {f"V{i}": "v" * 60_000 for i in range(50)}
#: Her budget, plus the refused inits in flight and the allocator (measured +35.5 MiB). Without the
#: bound: about 2.9 MiB per session (+132.9 MiB for 40).
GROWTH = USER_BUDGET + 48 * MIB


def big_init() -> bytes:
    """An exec init of a workflow no agent serves, with its own key: the session waits for an agent."""
    target = pb.SessionTarget(workflow_id="wf-nobody", session_key=f"k-{uuid.uuid4().hex}")
    return pb.ExecRequest(init=pb.ExecInit(target=target, command=["cat"], env=ENV)).SerializeToString()


#: How many such inits her budget holds at most.
FIT = USER_BUDGET // (len(big_init()) + 16)


async def open_sessions(
    address: str, token: str, count: int, *, refusals: int, wait: float
) -> tuple[list[RawCall], list[grpc.StatusCode]]:
    """`count` waiting sessions; the calls and the codes of those refused (the others wait), once
    `refusals` of them were refused or `wait` seconds passed."""
    channel = raw_channel(address)
    calls = [RawCall(channel, EXEC, token) for _ in range(count)]
    for call in calls:
        await call.send(big_init())
    pending = {asyncio.ensure_future(call.call.code()) for call in calls}
    refused: list[grpc.StatusCode] = []
    deadline = asyncio.get_running_loop().time() + wait
    while pending and len(refused) < max(refusals, 1):
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        refused += [future.result() for future in done]
    for future in pending:
        future.cancel()
    return calls, refused


def test_opening_messages_count_in_the_users_budget_and_another_user_is_served(tmp_path: Path) -> None:
    signer = Signer.es256()
    router = jwt_router(tmp_path, signer, "--user-buffer-bytes", str(USER_BUDGET))
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow, "--token", signer.token("pod", workflows=[workflow], role="agent"))
    mallory = signer.token("mallory", workflows=["*"])
    alice = signer.token("alice", workflows=[workflow])
    fresh = rss_kib(router.pid)

    async def attack() -> tuple[int, list[grpc.StatusCode], list[grpc.StatusCode]]:
        # Bounded wait for the refusals the budget makes (not a fixed time: a loaded machine is slow).
        calls, refused = await open_sessions(router.address, mallory, SESSIONS, refusals=SESSIONS - FIT, wait=60)
        peak = rss_kib(router.pid)
        flags = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false", "--token", alice]
        await asyncio.to_thread(exec_served, *flags)
        for call in calls:
            call.cancel()
        # Her sessions ended: what they kept is given back, so a new one of hers fits again.
        again, refused_again = await open_sessions(router.address, mallory, 1, refusals=0, wait=5)
        for call in again:
            call.cancel()
        return peak, refused, refused_again

    try:
        peak, refused, refused_again = asyncio.run(asyncio.wait_for(attack(), 120))
        growth = (peak - fresh) * 1024
        print(f"{SESSIONS} inits of 2.9 MiB: {len(refused)} refused, router grew {growth / MIB:.1f} MiB")
        assert growth <= GROWTH, f"router grew {growth / MIB:.1f} MiB"
        assert len(refused) >= SESSIONS - FIT, refused
        assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
        assert refused_again == [], refused_again
        assert any(
            "opening messages" in str(record.get("reason", ""))
            for record in router.events()
            if record.get("event") == "session refused"
        )
    finally:
        agent.stop()
        router.stop()
