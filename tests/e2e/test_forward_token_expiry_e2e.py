"""A port-forward whose fixed --token expired stops, rather than reset every connection for good.

A running forward's sessions outlive their token (docs/security.md), but every new connection needs
one the router takes. With a token file the user can renew it and the forward goes on; with a fixed
--token it never can, and the forward used to keep listening, resetting every connection with
"token expired" on stderr (a silent trap for whatever uses the port). It now exits 255, saying so.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.forward_servers import echo, echo_round_trip, start_forward, tcp_server
from tests.harness import AgentProc
from tests.security_kit import Signer, jwt_router

WF = "wf-forward-expiry"
#: The router accepts a token this long after its exp (router/auth/jwt.py LEEWAY), and a few seconds more.
LEEWAY = 30.0


def test_a_forward_whose_fixed_token_expired_exits_saying_so(tmp_path: Path) -> None:
    signer = Signer.rs256()
    router = jwt_router(tmp_path, signer)
    agent = AgentProc(router.address, WF, "--token", signer.token("pod", workflows=[WF], role="agent"))
    ttl = 2.0
    token = signer.token("alice", workflows=[WF], ttl=ttl)
    expires = time.monotonic() + ttl + LEEWAY
    try:
        with tcp_server(echo) as port:
            args = ["--router-address", router.address, "--workflow-id", WF, "--tls=false", "--token", token]
            forward, (local,) = start_forward(args, f":{port}")
            try:
                assert echo_round_trip(local, b"while valid") == b"while valid"
                # Past the token's end (and the router's leeway), one more connection is refused ...
                while time.monotonic() < expires + 1:
                    time.sleep(0.5)  # (waiting for a clock to pass a time, not for an event)
                try:
                    after = echo_round_trip(local, b"after its end")
                except ConnectionResetError:
                    after = b""  # (reset: a refused connection must not look like a clean end)
                assert after == b""
                # ... and the forward ends, with its reason.
                assert forward.wait_exit(30) == 255, forward.lines
                said = "\n".join(forward.lines)
                assert "cannot forward any more" in said and "token expired" in said, said
            finally:
                forward.stop()
    finally:
        agent.stop()
        router.stop()
