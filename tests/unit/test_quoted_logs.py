"""Log lines quote what peers send only in part: the rsync refusal's reason and user, refused resizes."""

from __future__ import annotations

import logging

import grpc
import pytest

from osmo_router.agent.config import AgentConfig
from osmo_router.agent.exec import IgnoredResizes
from osmo_router.agent.rsync import USER_SHOWN, serve_rsync
from osmo_router.cli.logs import MAX_QUOTED, cut
from osmo_router.dial.config import DialConfig
from osmo_router.router.core import audit
from osmo_router.wire.protocol import pb


class Stream:
    """A session stream that keeps what the agent sends."""

    def __init__(self) -> None:
        self.errors: list[tuple[grpc.StatusCode, str]] = []

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        self.errors.append((code, message))

    async def send(self, frame: pb.Frame) -> None:
        pass

    async def close(self) -> None:
        pass


def test_cut_marks_the_cut_and_the_audit_uses_it() -> None:
    assert cut("x" * MAX_QUOTED) == "x" * MAX_QUOTED
    assert cut("x" * (MAX_QUOTED + 1)) == "x" * MAX_QUOTED + "..."
    assert cut("abcdef", 3) == "abc..."
    assert audit.MAX_REASON == MAX_QUOTED


@pytest.mark.asyncio
async def test_an_rsync_refusal_logs_the_clients_arguments_cut(caplog: pytest.LogCaptureFixture) -> None:
    long = "a" * 3_000_000  # a client's argument, up to --max-message-size
    open_msg = pb.SessionOpen(user="u" * 10_000, rsync=pb.RsyncInit(server_args=[long, "--server"]))
    stream = Stream()
    with caplog.at_level(logging.WARNING, logger="osmo_router.agent.rsync"):
        await serve_rsync(
            stream, open_msg, AgentConfig(dial=DialConfig(address="127.0.0.1:1", tls=False), workflow_id="w")
        )
    assert [code for code, _ in stream.errors] == [grpc.StatusCode.PERMISSION_DENIED]  # the refusal still goes out
    (record,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "rsync_refused"]
    line = record.getMessage()
    assert len(line) <= len("rsync refused for : ") + USER_SHOWN + MAX_QUOTED + 6, len(line)
    assert line.endswith("...")
    assert len(record.fields["user"]) == USER_SHOWN + 3  # type: ignore[attr-defined]


def test_refused_resizes_log_once_per_session(caplog: pytest.LogCaptureFixture) -> None:
    ignored = IgnoredResizes()
    with caplog.at_level(logging.INFO, logger="osmo_router.agent.exec"):
        for rows in range(1000):
            ignored.note(70_000 + rows, 1, ValueError("out of range " + "y" * 5000))
    assert ignored.count == 1000
    (record,) = caplog.records
    assert "70000x1" in record.getMessage()
    assert len(record.getMessage()) < MAX_QUOTED + 200
