"""The generated code is what proto/ generates, and the wire layout the relay relies on holds."""

from __future__ import annotations

import subprocess

from osmo_router.wire.codec import ENCODED_HALF_CLOSE, ENCODED_SESSION_END, FRAME_TAG, INIT_TAG
from osmo_router.wire.protocol import pb
from tests.harness import ROOT


def test_generated_code_matches_proto() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "check-proto")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PY": str(ROOT / ".venv" / "bin" / "python")},
    )
    assert result.returncode == 0, result.stderr


def test_frames_encode_identically_on_every_stream() -> None:
    frame = pb.Frame(data=b"payload")
    encodings = {
        message(frame=frame).SerializeToString()
        for message in (
            pb.ExecRequest,
            pb.ExecResponse,
            pb.PortForwardRequest,
            pb.PortForwardResponse,
            pb.RsyncRequest,
            pb.RsyncResponse,
            pb.ConnectRequest,
            pb.ConnectResponse,
        )
    }
    assert len(encodings) == 1
    (encoded,) = encodings
    assert encoded[0] == FRAME_TAG


def test_inits_start_with_the_init_tag() -> None:
    assert pb.ExecRequest(init=pb.ExecInit()).SerializeToString()[0] == INIT_TAG
    assert pb.ConnectRequest(init=pb.ConnectInit()).SerializeToString()[0] == INIT_TAG


def test_constants_decode_as_what_they_claim() -> None:
    assert pb.ExecRequest.FromString(ENCODED_HALF_CLOSE).frame.WhichOneof("kind") == "half_close"
    assert pb.RsyncResponse.FromString(ENCODED_SESSION_END).WhichOneof("kind") == "end"
