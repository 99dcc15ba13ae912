"""What waiting WebSocket sides keep of their peers' messages counts in the user's budget.

A side whose session waits for its other side reads what its peer sends (to notice it leaving) and
keeps it, up to 1 MiB per side, delivered once paired. That was bounded per side only: 200 waiting
sides of one user that each sent 1.25 MiB grew the router by 269-324 MiB, whatever her budget. Now
what they keep counts as held in her `--user-buffer-bytes` (and the process's budget), and a side
stops reading once her budget is full (TCP pushes back). aiohttp's own read-ahead is reserved in the
budgets before a side reads at all; sides without room pause their sockets
(test_ws_waiting_read_budget_e2e.py, docs/security.md): measured 8.9 MiB of growth, 77 MiB before.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp

from tests.e2e.test_memory_idle import rss_kib
from tests.harness import AgentProc, metric_value, run_client
from tests.security_kit import Signer, jwt_router
from tests.ws_kit import client_args, new_key, ws_url

MIB = 1 << 20
SIDES = 100
#: What each waiting side is sent: 20 messages of 64 KiB.
MESSAGES, SIZE = 20, 64 * 1024
USER_BUDGET = 4 * MIB
#: The router's growth allowed: her budget, one message per side past it, aiohttp's read-ahead
#: (measured 0.65-0.7 MiB per side) and the connections themselves. Without the bound: about 1.35 MiB
#: per side (+135 MiB for 100), over this.
GROWTH = USER_BUDGET + SIDES * (SIZE + 900 * 1024)


def test_waiting_sides_keep_at_most_the_users_budget_and_another_user_is_served(tmp_path: Path) -> None:
    signer = Signer.es256()
    flow = str(USER_BUDGET)
    router = jwt_router(tmp_path, signer, "--user-buffer-bytes", flow, "--flow-control-bytes", flow)
    workflow = f"wf-{uuid.uuid4().hex[:8]}"
    agent = AgentProc(router.address, workflow, "--token", signer.token("pod", workflows=[workflow], role="agent"))
    mallory = signer.token("mallory", workflows=["*"])
    alice = signer.token("alice", workflows=[workflow])
    fresh = rss_kib(router.pid)

    async def one(http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        # A port-forward to a workflow no backend ever serves: the session waits (10 min).
        url = ws_url(router, "portforward", "wf-nobody", "client", new_key(), f"timeout=600&port=22&token={mallory}")
        # A side paused for want of a reservation (watch_gone) reads no close frame: closing waits 1 s.
        ws = await http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=1))
        for _ in range(MESSAGES):
            await ws.send_bytes(b"x" * SIZE)
        return ws

    async def attack() -> tuple[int, float]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sides = await asyncio.gather(*(one(http) for _ in range(SIDES)))
            # Every send was taken by the kernel; wait (bounded) until the router's reading settled.
            held, last, deadline = 0.0, -1.0, time.monotonic() + 30
            while time.monotonic() < deadline:
                held = metric_value(router.metrics_text(), "router_grpc_held_bytes")
                if held == last and held > 0:
                    break
                last = held
                await asyncio.sleep(0.5)
            peak = rss_kib(router.pid)
            served = await asyncio.to_thread(
                run_client, "exec", *client_args(router, workflow, "ws"), "--token", alice, "--", "echo", "served"
            )
            assert served.returncode == 0, served.stderr.decode()
            assert served.stdout.strip() == b"served"
            await asyncio.gather(*(ws.close() for ws in sides))
            return peak, held

    try:
        peak, held = asyncio.run(asyncio.wait_for(attack(), 120))
        growth = (peak - fresh) * 1024
        print(
            f"{SIDES} waiting sides: held {held / MIB:.1f} MiB,"
            f" router grew {growth / MIB:.1f} MiB (allowed {GROWTH / MIB:.1f})"
        )
        # Her stash is seen by the budgets, at most her budget plus one message per side.
        assert USER_BUDGET / 2 <= held <= USER_BUDGET + SIDES * (SIZE + 128), held
        assert growth <= GROWTH, f"router grew {growth / MIB:.1f} MiB"
    finally:
        agent.stop()
        router.stop()
