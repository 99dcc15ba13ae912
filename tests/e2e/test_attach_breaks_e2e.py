"""An attach that meets a break before the agent answered it (issue 17): real router, agent and clients.

The agent's link to the router goes through a TCP proxy on loopback (tests/cut_proxy.py). While it
is cut, the router has no agent for the workflow and refuses an attach with UNAVAILABLE, as it
refuses a resume; the attaching client must try again (as a resuming one does) and attach once the
agent is back, instead of exiting 255 while the session it asked for is still held.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cut_proxy import CutProxy
from tests.harness import AgentProc, Proc, Router, client_cmd, run_client

#: Longest a step may take.
STEP = 30.0


@pytest.fixture
def rig(workflow: str) -> Iterator[tuple[Router, CutProxy, AgentProc]]:
    """A router, a proxy between it and the agent, the agent."""
    router = Router()
    proxy = CutProxy("127.0.0.1", router.port)
    agent = AgentProc(proxy.address, workflow)
    try:
        yield router, proxy, agent
    finally:
        agent.stop()
        proxy.close()
        router.stop()


def test_attach_refused_while_the_agent_is_away_attaches_once_it_is_back(
    rig: tuple[Router, CutProxy, AgentProc], workflow: str
) -> None:
    router, proxy, _agent = rig
    args = ["--router-address", router.address, "--workflow-id", workflow, "--tls=false"]
    detached = run_client("exec", "--detach", *args, "--", "sh", "-c", "seq 1 5000; exit 7")
    assert detached.returncode == 0, detached.stderr
    key = detached.stdout.decode().strip()
    proxy.cut()  # the agent's link: the router unregisters it
    router.wait_for(lambda r: "unregistered" in r.get("msg", ""), timeout=STEP)
    attach = Proc(client_cmd("attach", key, *args))
    try:
        # The router refused the attach: no agent. The client must not give up on that.
        refused = router.wait_event("resume refused", timeout=STEP)
        assert refused.get("cause") == "no_agent", refused
        proxy.restore()
        code = attach.wait_exit(STEP)
    finally:
        attach.stop()
    assert code == 7, attach.lines
    # Everything the command printed while detached, once, in order.
    assert attach.out_lines == [str(n) for n in range(1, 5001)], attach.out_lines[:5]
