"""A peer that floods the native server with frames it must answer, and never reads the answers.

Every SETTINGS frame is acknowledged (and every PING, every refused stream reset): before the fix
those answers went to the transport's buffer without limit, so a raw connection that sent 300 MiB
of empty SETTINGS frames and read nothing grew the router by 2.8 GiB (uvloop keeps each 9-byte ack
as an object of its own, about 10x its size). Now past h2/core.py's CONTROL_BACKLOG (1 MiB queued
while the transport is paused) the connection is aborted: the attacker sees a reset after a few MiB
(what the kernel buffers), the router stays within a few MiB of its fresh RSS, and another user's
exec is served during and after the flood.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import hpack
import pytest

from osmo_router.h2 import frames as fr
from tests.e2e.test_memory_idle import PeakSampler, rss_kib
from tests.harness import AgentProc, Router, run_client

WF = "wf-control-flood"
MIB = 1 << 20
#: What the attacker tries to send: without the fix the router buffers an ack for all of it (about
#: 10x in memory); with it the connection is reset after the kernel's buffers and CONTROL_BACKLOG.
FLOOD = 24 * MIB
#: The router's growth allowed: the backlog (about 10x in uvloop's buffer) and the allocator.
GROWTH = 40 * MIB


@pytest.fixture
def router() -> Iterator[tuple[Router, AgentProc]]:
    router = Router("--grpc-server", "native")
    agent = AgentProc(router.address, WF)
    try:
        yield router, agent
    finally:
        agent.stop()
        router.stop()


def _settings(stream_id: int) -> bytes:
    """An empty SETTINGS frame: the router acknowledges each."""
    return fr.encode(fr.SETTINGS, 0, 0)


_ENCODER = hpack.Encoder()
_NOT_GRPC = [(":method", "GET"), (":scheme", "http"), (":path", "/x"), (":authority", "r")]


def _refused_request(stream_id: int) -> bytes:
    """A request the router refuses at once (not gRPC): answered with trailers (about 4x its size,
    its HPACK block fully indexed after the first)."""
    return fr.encode(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, stream_id, _ENCODER.encode(_NOT_GRPC))


def _flood(port: int, frame: Callable[[int], bytes], sent: list[int]) -> str:
    """Send frames in batches until FLOOD bytes, reading nothing: how it ended."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read: the answers pile up
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    stream_id = 1
    try:
        sock.sendall(fr.PREFACE + fr.encode_settings({}))
        while sent[0] < FLOOD:
            batch = bytearray()
            while len(batch) < MIB:
                batch += frame(stream_id)
                stream_id += 2
            sock.sendall(batch)
            sent[0] += len(batch)
    except OSError as err:  # ECONNRESET / EPIPE: the router cut the connection
        return f"cut: {err}"
    finally:
        sock.close()
    return "never cut"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("frame", [_settings, _refused_request], ids=["settings", "refused_requests"])
def test_a_peer_that_floods_frames_to_answer_and_reads_nothing_is_cut_off(
    router: tuple[Router, AgentProc], frame: Callable[[int], bytes]
) -> None:
    server, _agent = router
    flags = ["--router-address", server.address, "--workflow-id", WF, "--tls=false"]
    assert run_client("exec", *flags, "--", "echo", "before").stdout == b"before\n"
    fresh = rss_kib(server.pid)
    sent = [0]
    outcome: list[str] = []
    with PeakSampler({"router": server.pid}) as sampler:
        attacker = threading.Thread(target=lambda: outcome.append(_flood(server.port, frame, sent)))
        attacker.start()
        during = run_client("exec", *flags, "--", "echo", "during", timeout=60)
        attacker.join(90)
    assert not attacker.is_alive()
    growth = (sampler.peak["router"] - fresh) * 1024
    figures = f"{frame.__name__}: {outcome}, {sent[0] / MIB:.0f} MiB sent, router grew {growth / MIB:.1f} MiB"
    print(figures)
    assert outcome and outcome[0].startswith("cut"), figures
    assert growth < GROWTH, figures
    assert during.returncode == 0 and during.stdout == b"during\n", (figures, during.stderr)
    after = run_client("exec", *flags, "--", "echo", "after")
    assert after.returncode == 0 and after.stdout == b"after\n", after.stderr
    assert any(e.get("event") == "h2_control_flood" for e in server.events()), figures
