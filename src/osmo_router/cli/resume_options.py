"""The `osmo-router agent` flags of resumable sessions (docs/resume.md)."""

from __future__ import annotations

from typing import Any

import click


def agent_resume_options(f: Any) -> Any:
    """`agent` flags: how long and how much a resumable session is held for its client."""
    options = [
        click.option(
            "--resume-grace",
            envvar="OSMO_RESUME_GRACE",
            type=click.FloatRange(0, None),
            default=300.0,
            show_default=True,
            help="Seconds a resumable session (exec, port-forward, rsync of a client that asks for resume) is kept "
            "after its client went away, for it to resume or attach; its exec process keeps running meanwhile. "
            "0: sessions end at the first break [env OSMO_RESUME_GRACE].",
        ),
        click.option(
            "--replay-buffer-bytes",
            envvar="OSMO_REPLAY_BUFFER_BYTES",
            type=click.IntRange(65536, None),
            default=16 * 1024 * 1024,
            show_default=True,
            help="Bytes of output one resumable session keeps until its client acknowledges them; a full buffer "
            "pauses the session's output. Larger than the client's (8 MiB) on purpose: the client's acknowledgements "
            "travel behind its own input, and a full-duplex transfer (exec -- cat) would otherwise wait on them "
            "[env OSMO_REPLAY_BUFFER_BYTES].",
        ),
        click.option(
            "--replay-total-bytes",
            envvar="OSMO_REPLAY_TOTAL_BYTES",
            type=click.IntRange(1 << 20, None),
            default=256 * 1024 * 1024,
            show_default=True,
            help="Bytes the replay buffers of all resumable sessions of this agent hold together; when reached, "
            "a session with output waiting for acknowledgement pauses until some is acknowledged "
            "[env OSMO_REPLAY_TOTAL_BYTES].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f
