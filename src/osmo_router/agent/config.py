"""Agent settings; the CLI only parses flags into this."""

from __future__ import annotations

from dataclasses import dataclass, field

from osmo_router.dial.config import DialConfig


@dataclass(frozen=True)
class AgentConfig:
    """Everything `osmo-router agent` can be told."""

    dial: DialConfig
    workflow_id: str
    task: str = ""
    agent_id: str = ""
    shell: str | None = None
    workdir: str | None = None
    allow_ports: tuple[str, ...] = ()
    rsync_roots: tuple[str, ...] = ()
    rsync_binary: str = "rsync"
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    heartbeat_interval: float = 15.0
    #: Connect streams kept open ahead of sessions (0: none, every session waits for a SessionRequest).
    standby_streams: int = 2
    #: UDP sockets one UDP forward session may hold (its least recently used mapping makes room).
    max_udp_sockets_per_session: int = 256
    #: UDP sockets of all UDP forward sessions of the agent process (see agent/forward_udp.py).
    max_udp_sockets: int = 1024
    #: Seconds a resumable session waits for its client after a break (0: no resume; agent/held.py).
    resume_grace: float = 300.0
    #: Bytes of unacknowledged output one resumable session keeps (resume/window.py).
    replay_buffer_bytes: int = 16 * 1024 * 1024
    #: Bytes the replay buffers of all resumable sessions hold together at most.
    replay_total_bytes: int = 256 * 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)
