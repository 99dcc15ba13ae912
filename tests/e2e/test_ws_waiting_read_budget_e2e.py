"""Waiting WebSocket sides read their peers only within the budgets, even with messages of the maximum size.

A side whose session waits reads its peer (to notice it leaving): each one kept a message past the
user's budget in its stash, and aiohttp read one more and a chunk ahead, outside every budget: 50
waiting sides of one user sending 4 MiB messages under a 4 MiB budget grew the router by 436 MiB.
Now a side reads only while it holds a reservation of that worst case in the budgets, and otherwise
pauses its socket (TCP pushes back). Meanwhile another user's exec is served, and a burst of small
port-forward connections of a third user (as OSMO's CLI opens them, one WebSocket each, its first
bytes small) all pair and work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import aiohttp

from tests.e2e.test_memory_idle import rss_kib
from tests.forward_servers import echo, tcp_server
from tests.harness import AgentProc, run_client
from tests.security_kit import Signer, jwt_router
from tests.ws_kit import client_args, new_key, ws_url

MIB = 1 << 20
SIDES = 50
#: Each attacking side sends this many messages of nearly --max-message-size (4 MiB).
MESSAGES, SIZE = 3, 4 * MIB - 1024
USER_BUDGET = 4 * MIB
#: OSMO-style port-forward connections of one user opened at once, each sending a few small bytes.
BURST = 50
#: The router's growth allowed: her reservation (one message and aiohttp's read-ahead), her stash (her
#: budget and one message), the connections. Measured 15 MiB; without the bound 437 MiB (2M + 0.5 MiB
#: per side).
GROWTH = 40 * MIB


async def _settled(pid: int, timeout: float = 30.0) -> int:
    """The router's RSS (KiB) once it stopped growing for a second (bounded)."""
    last, deadline = -1, time.monotonic() + timeout
    rss = rss_kib(pid)
    while time.monotonic() < deadline:
        rss = rss_kib(pid)
        if abs(rss - last) < 1024:
            break
        last = rss
        await asyncio.sleep(1.0)
    return rss


async def _forward_one(http: aiohttp.ClientSession, url: str, index: int) -> bytes:
    """One forwarded TCP connection: a small first message (an SSH banner's size), its echo back."""
    async with http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
        hello = f"SSH-2.0-probe-{index}\r\n".encode()
        await ws.send_bytes(hello)
        got = b""
        while len(got) < len(hello):
            msg = await ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            got += msg.data
    return got


def test_waiting_sides_with_large_messages_stay_near_the_budget(tmp_path: Path) -> None:
    signer = Signer.es256()
    flow = str(USER_BUDGET)
    router = jwt_router(tmp_path, signer, "--user-buffer-bytes", flow, "--flow-control-bytes", flow)
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow, "--token", signer.token("pod", workflows=[workflow], role="agent"))
    mallory = signer.token("mallory", workflows=["*"])
    alice = signer.token("alice", workflows=[workflow])
    bob = signer.token("bob", workflows=[workflow])
    fresh = rss_kib(router.pid)

    async def flood(ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(Exception):  # blocks once the router stops reading; cancelled at the end
            for _ in range(MESSAGES):
                await ws.send_bytes(b"x" * SIZE)

    async def attack() -> tuple[int, list[bytes]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            # Port-forwards to a workflow no backend ever serves: the sessions wait (10 min).
            query = f"timeout=600&port=22&token={mallory}"
            sides = [
                await http.ws_connect(
                    ws_url(router, "portforward", "wf-nobody", "client", new_key(), query),
                    timeout=aiohttp.ClientWSTimeout(ws_close=1),
                )
                for _ in range(SIDES)
            ]
            floods = [asyncio.create_task(flood(ws)) for ws in sides]
            peak = await _settled(router.pid)
            served = await asyncio.to_thread(
                run_client, "exec", *client_args(router, workflow, "ws"), "--token", alice, "--", "echo", "served"
            )
            assert served.returncode == 0, served.stderr.decode()
            assert served.stdout.strip() == b"served"
            with tcp_server(echo) as port:
                query = f"port={port}&token={bob}"
                urls = [ws_url(router, "portforward", workflow, "client", new_key(), query) for _ in range(BURST)]
                echoed = await asyncio.gather(*(_forward_one(http, url, i) for i, url in enumerate(urls)))
            peak = max(peak, rss_kib(router.pid))
            for task in floods:
                task.cancel()
            await asyncio.gather(*floods, return_exceptions=True)
            # A paused side reads no close frame (it notices its peer leaving when it pairs or times out):
            # the close handshakes time out (1 s).
            await asyncio.gather(*(ws.close() for ws in sides))
            return peak, echoed

    try:
        peak, echoed = asyncio.run(asyncio.wait_for(attack(), 180))
        growth = (peak - fresh) * 1024
        print(f"{SIDES} waiting sides sending {SIZE / MIB:.0f} MiB messages: router grew {growth / MIB:.1f} MiB")
        assert echoed == [f"SSH-2.0-probe-{i}\r\n".encode() for i in range(BURST)]
        assert growth <= GROWTH, f"router grew {growth / MIB:.1f} MiB (allowed {GROWTH / MIB:.0f})"
    finally:
        agent.stop()
        router.stop()
