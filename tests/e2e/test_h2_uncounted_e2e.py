"""Streams not yet counted in any user's budget are bounded too (h2/credit.py UncountedCharge).

Before its session pairs a stream is in no user's budget: its request headers, its window and a
message under way were bounded by nothing across streams. A raw connection (tests/h2_raw.py) that
opened Exec streams and sent each a message announcing 4 MiB, one byte short, made the router hold
all of it until the init timeout (200 streams: +1 GiB); 1,000 streams of 1,500 empty header fields
each (1.5 MB on the wire) grew it by 300 MiB. Now a connection's uncounted streams hold at most
UNCOUNTED_PER_CONNECTION together, windows included (a new one past it is refused, REFUSED_STREAM; a
large message waits for its session), and a request of more than MAX_HEADER_FIELDS fields is refused
(ENHANCE_YOUR_CALM). Another user's exec is served throughout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from osmo_router.h2 import frames as fr
from osmo_router.router.ops.grpc_server import MAX_HEADER_FIELDS, UNCOUNTED_PER_CONNECTION
from tests.e2e.test_h2_control_flood_e2e import WF
from tests.e2e.test_h2_control_flood_e2e import router as stack
from tests.e2e.test_memory_idle import PeakSampler, rss_kib
from tests.h2_raw import EXEC, Raw, grpc_headers
from tests.harness import AgentProc, Router, exec_served, run_client

MIB = 1 << 20
LARGE = 4 * MIB  # the router's default max message size

__all__ = ["stack"]  # the fixture: a native router and an agent, shared with test_h2_control_flood_e2e
WAIT = 30.0


def exec_answers(router: Router) -> bool:
    """Another user's exec through the same router: True if it echoed and exited 0."""
    args = ["--router-address", router.address, "--workflow-id", WF, "--tls=false"]
    result = run_client("exec", *args, "--", "echo", "served", timeout=WAIT)
    return result.returncode == 0 and b"served" in result.stdout


async def open_raw(router: Router) -> Raw:
    raw = Raw()
    await raw.connect("127.0.0.1", int(router.address.rsplit(":", 1)[1]))
    return raw


@pytest.mark.asyncio
async def test_unfinished_first_messages_hold_at_most_the_connections_share(stack: tuple[Router, AgentProc]) -> None:
    router, _ = stack
    streams = 100  # 400 MiB announced: the router held all it was sent before
    base = rss_kib(router.pid)
    raw = await open_raw(router)
    try:
        with PeakSampler({"router": router.pid}) as peak:
            ids = [raw.open(grpc_headers(EXEC)) for _ in range(streams)]
            body = b"\x00" + LARGE.to_bytes(4, "big") + b"\x0a" + b"x" * (LARGE - 2)  # one byte short
            sent = await asyncio.gather(*(raw.send(sid, body, timeout=3) for sid in ids))
            assert await asyncio.to_thread(exec_answers, router), "another user's exec was not served"
        grown = (peak.peak["router"] - base) * 1024
    finally:
        raw.close()
    assert sum(sent) < streams * LARGE, "every message went in whole: nothing held it back"
    # Its share, which messages assembled piecewise (growing buffers) can take about twice in memory, and
    # the allocator's slack. Before, it held all it was sent (400 MiB here).
    assert grown < 3 * UNCOUNTED_PER_CONNECTION, f"the router grew by {grown >> 20} MiB"


@pytest.mark.asyncio
async def test_streams_past_the_share_are_refused_until_others_end(stack: tuple[Router, AgentProc]) -> None:
    router, _ = stack
    raw = await open_raw(router)
    try:
        # Streams that never send their init, with 120 header fields each: each is charged about 47 KiB
        # (its headers and its window).
        extra = [(f"x-{i % 50}", "") for i in range(MAX_HEADER_FIELDS - 8)]
        ids = [raw.open(grpc_headers(EXEC, None, extra)) for _ in range(3000)]
        async with asyncio.timeout(WAIT):
            while not any(code == fr.ErrorCode.REFUSED_STREAM for code in raw.resets.values()):
                raw.changed.clear()
                await raw.changed.wait()
        refused = [sid for sid, code in raw.resets.items() if code == fr.ErrorCode.REFUSED_STREAM]
        assert min(refused) > ids[1500], "streams were refused long before the share was used"
        assert await asyncio.to_thread(exec_answers, router), "another user's exec was not served"
    finally:
        raw.close()
    record = router.wait_for(lambda r: r.get("event") == "h2_uncounted_full", timeout=WAIT)
    assert "bound" in record["msg"]


@pytest.mark.asyncio
async def test_a_request_with_too_many_header_fields_is_refused(stack: tuple[Router, AgentProc]) -> None:
    router, _ = stack
    base = rss_kib(router.pid)
    raw = await open_raw(router)
    try:
        extra = [(f"x-{i % 50}", "") for i in range(10 * MAX_HEADER_FIELDS)]  # 1 byte each once indexed
        ids = [raw.open(grpc_headers(EXEC, None, extra)) for _ in range(300)]
        await raw.writer.drain()
        async with asyncio.timeout(WAIT):
            while len(raw.resets) < len(ids) and not raw.closed:
                raw.changed.clear()
                await raw.changed.wait()
        assert {raw.resets.get(sid) for sid in ids} == {fr.ErrorCode.ENHANCE_YOUR_CALM}
        grown = (rss_kib(router.pid) - base) * 1024
        assert grown < 32 * MIB, f"the router grew by {grown >> 20} MiB"
        assert await asyncio.to_thread(exec_answers, router), "another user's exec was not served"
    finally:
        raw.close()


def test_refused_streams_give_their_charge_back(tmp_path: Path) -> None:
    """A stream the router refuses (here: a token it does not trust) gives its charge in the connection's
    uncounted share back. Before, a stream whose client had ended first kept it when the router's
    trailers went out: after about 5,500 refused streams the connection's share was full and every new
    stream on it was refused (REFUSED_STREAM), and about 29,000 over all connections filled the total,
    refusing every user's streams."""
    from tests.raw_grpc import EXEC as RAW_EXEC
    from tests.raw_grpc import exchange, raw_channel
    from tests.security_kit import Signer, jwt_router

    signer = Signer.rs256()
    router = jwt_router(tmp_path, signer)
    agent = AgentProc(router.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
    untrusted = Signer.rs256().token("mallory", workflows=[WF])
    # Past the share by a margin: each refused stream charged its window and headers (about 18 KiB).
    rounds = UNCOUNTED_PER_CONNECTION // (16 * 1024) // 4 + 100

    async def refused_streams() -> set[str]:
        codes: set[str] = set()
        async with raw_channel(router.address) as channel:
            for _ in range(rounds):
                outcomes = await asyncio.gather(*(exchange(channel, RAW_EXEC, untrusted, b"") for _ in range(4)))
                codes |= {f"{o.code.name}: {o.details[:40]}" for o in outcomes}
                if any(o.code.name != "UNAUTHENTICATED" for o in outcomes):
                    break
        return codes

    try:
        codes = asyncio.run(asyncio.wait_for(refused_streams(), 240))
        assert {code.split(":")[0] for code in codes} == {"UNAUTHENTICATED"}, codes
        exec_served(
            "--router-address", router.address, "--workflow-id", WF, "--tls=false",
            "--token", signer.token("alice", workflows=[WF]),
        )  # fmt: skip
    finally:
        agent.stop()
        router.stop()
