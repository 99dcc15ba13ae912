"""A break after the peer's last word (its exit status) is the end of the session, not a loss to report."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.wire.protocol import pb
from tests.unit.test_resume_stream import Cut, PipeEnd, Side


class WritesFailAfterTheExitStatus(PipeEnd):
    """The connection went down just as the exit status arrived: it was read, but the next write (the
    acknowledgement sent at once for it) fails before the reader saw the break."""

    async def recv(self) -> pb.Frame | None:
        frame = await super().recv()
        if frame is not None and frame.WhichOneof("kind") == "exit_status":
            self.writes_fail = True
        return frame

    writes_fail = False

    async def send(self, frame: pb.Frame) -> None:
        if self.writes_fail:
            raise Cut("Socket closed")
        await super().send(frame)


@pytest.mark.asyncio
async def test_a_write_that_fails_after_the_exit_status_ends_the_session_with_it() -> None:
    a_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    b_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    end_a, end_b = WritesFailAfterTheExitStatus(a_in, b_in), PipeEnd(b_in, a_in)
    end_a.peer, end_b.peer = end_b, end_a
    client, agent = Side(end_a, 1 << 20), Side(end_b, 1 << 20)
    client.start()
    agent.start()
    await agent.send(pb.Frame(data=b"done\n"))
    await agent.send(pb.Frame(exit_status=pb.ExitStatus(code=42)))
    kinds = []
    async with asyncio.timeout(5):
        while (frame := await client.recv()) is not None:
            kinds.append(frame.WhichOneof("kind"))
            if frame.WhichOneof("kind") == "error":
                break
    # The exit status, then the end: the user's exit code is 42, not "UNAVAILABLE: Socket closed".
    assert kinds == ["data", "exit_status"], kinds
    agent.abort()
