"""client/resume_start.py: what the init of a resumable session announces."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from osmo_router.client.config import ClientConfig
from osmo_router.client.resume_start import PendingResumingStream, start_resumable
from osmo_router.dial.config import DialConfig
from osmo_router.transport import GRPC
from osmo_router.wire.protocol import pb


@pytest.mark.asyncio
async def test_the_announced_replay_window_is_the_one_the_stream_keeps() -> None:
    sent: list[Any] = []

    async def start(init: Any) -> Any:
        sent.append(init)
        return SimpleNamespace(raw=False, session_key="")

    config = ClientConfig(dial=DialConfig(address="127.0.0.1:1", tls=False), workflow_id="wf")
    transport: Any = SimpleNamespace(name=GRPC)
    init = pb.ExecInit(target=config.target())
    stream = await start_resumable(transport, config, pb.OPERATION_EXEC, init, start, replay_bytes=3 << 20)
    assert isinstance(stream, PendingResumingStream)
    assert stream.buffer.limit == 3 << 20
    # The agent paces its acks and checks overruns by this figure: it must be the window kept.
    assert sent[0].target.resume.window_bytes == 3 << 20
    assert sent[0].target.resume.secret
