"""What the router reads of resumable sessions (router/core/resumes.py), the drain's move, and address lists."""

from __future__ import annotations

import grpc
import pytest

from osmo_router.dial.config import DialConfig, split_addresses
from osmo_router.router.core.resumes import ResumeInfo, cause_of, note_agent_answer, resume_info, resume_info_of_open
from osmo_router.wire.codec import encode_data_message
from osmo_router.wire.protocol import pb


def _agent(frame: pb.Frame) -> bytes:
    return bytes(pb.ConnectRequest(frame=frame).SerializeToString())


def test_resume_info_from_the_init() -> None:
    assert resume_info(pb.SessionTarget(workflow_id="wf")) is None
    assert resume_info(pb.SessionTarget(resume=pb.ResumeToken())) is None
    fresh = resume_info(pb.SessionTarget(resume=pb.ResumeToken(secret="s")))
    assert fresh == ResumeInfo(resuming=False)
    again = resume_info(pb.SessionTarget(resume=pb.ResumeToken(secret="s", resuming=True, sent=900)))
    assert again == ResumeInfo(resuming=True, client_sent=900)
    attach = resume_info(pb.SessionTarget(resume=pb.ResumeToken(attach=True)))
    assert attach is not None and attach.attach and attach.resuming


def test_a_resume_frame_confirms_and_gives_the_replay_of_each_side() -> None:
    info = ResumeInfo(resuming=True, client_sent=1000)
    note_agent_answer(info, _agent(pb.Frame(resume=pb.Resume(received=600, sending_from=50, sent=5000))))
    assert info.confirmed and info.refused is None
    assert (info.replayed_to_agent, info.replayed_to_client) == (400, 4950)


def test_a_new_session_is_confirmed_without_a_replay() -> None:
    info = ResumeInfo(resuming=False)
    note_agent_answer(info, _agent(pb.Frame(resume=pb.Resume(fresh=True, grace_seconds=300))))
    assert info.confirmed and (info.replayed_to_agent, info.replayed_to_client) == (0, 0)


def test_an_attach_resends_nothing_of_the_client() -> None:
    info = ResumeInfo(resuming=True, attach=True)
    note_agent_answer(info, _agent(pb.Frame(resume=pb.Resume(received=10, sending_from=0, sent=77))))
    assert (info.replayed_to_agent, info.replayed_to_client) == (0, 77)


def test_an_agent_without_resume_answers_with_data() -> None:
    info = ResumeInfo(resuming=False)
    note_agent_answer(info, encode_data_message(b"$ "))
    assert not info.confirmed and info.refused is None


def test_a_refusal_is_kept_with_its_cause() -> None:
    info = ResumeInfo(resuming=True)
    error = pb.Error(code=grpc.StatusCode.NOT_FOUND.value[0], message="the agent holds no such session")
    note_agent_answer(info, _agent(pb.Frame(error=error)))
    assert not info.confirmed and info.refused == grpc.StatusCode.NOT_FOUND
    assert cause_of(info.refused, info.refusal) == "not_found"


@pytest.mark.parametrize(
    ("code", "message", "cause"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "", "denied"),
        (grpc.StatusCode.DATA_LOSS, "", "data_loss"),
        (grpc.StatusCode.UNAVAILABLE, "no agent is registered for workflow 'wf'", "no_agent"),
        (grpc.StatusCode.UNAVAILABLE, "router is draining", "unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", "timeout"),
        (grpc.StatusCode.INTERNAL, "", "other"),
    ],
)
def test_causes(code: grpc.StatusCode, message: str, cause: str) -> None:
    assert cause_of(code, message) == cause


def test_a_large_first_frame_is_not_decoded() -> None:
    info = ResumeInfo(resuming=False)
    note_agent_answer(info, encode_data_message(b"x" * 100_000))
    assert not info.confirmed


def test_router_address_lists() -> None:
    assert split_addresses("a:1") == ["a:1"]
    assert split_addresses(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert DialConfig(address="[::1]:1,127.0.0.1:2").addresses == ["[::1]:1", "127.0.0.1:2"]


def test_resume_info_of_a_relayed_session_open() -> None:
    target = pb.SessionTarget(workflow_id="wf", resume=pb.ResumeToken(secret="s"))
    opened = pb.ConnectResponse(open=pb.SessionOpen(session_key="k", exec=pb.ExecInit(target=target)))
    assert resume_info_of_open(opened.SerializeToString()) == ResumeInfo(resuming=False)
    plain = pb.ConnectResponse(open=pb.SessionOpen(session_key="k", exec=pb.ExecInit()))
    assert resume_info_of_open(plain.SerializeToString()) is None
    assert resume_info_of_open(b"\xff\xff") is None
