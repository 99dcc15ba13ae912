"""Prometheus metrics of one router, in a registry of its own (no global state).

Counting happens once per relayed chunk, never per byte, and without locks on the hot path:
byte counts accumulate in plain integers on the session (the relay adds each chunk's size to its
bytes_to_agent / bytes_to_client), and are folded into the
Prometheus counters (whose `inc` takes a lock) when each side of a session ends and whenever
/metrics is rendered, for every live session. A scrape therefore sees every byte relayed up
to that moment; nothing is lost at the end of a session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from osmo_router.router.core.resumes import cause_of
from osmo_router.router.core.sessions import Session
from osmo_router.wire.ops import LABELS

DIRECTIONS = ("client_to_agent", "agent_to_client")


class RouterMetrics:
    """The router's metrics, with the names and labels of DESIGN.md."""

    def __init__(
        self,
        live_sessions: Callable[[], Iterable[Session]] = tuple,
        pending: Callable[[], int] = int,
        standby: Callable[[], int] = int,
        buffered: Callable[[], int] = int,
        held: Callable[[], int] = int,
        created: Callable[[], int] = int,
        replay: Callable[[], int] = int,
    ) -> None:
        """`live_sessions`, `pending`, `standby`, `buffered`, `held`, `created` and `replay` are read at scrape
        time (no bookkeeping)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge(
            "router_grpc_sessions_active", "Sessions with both sides joined.", ["operation"], registry=r
        )
        self.rendezvous_duration = Histogram(
            "router_grpc_rendezvous_duration_seconds",
            "Time from the first side joining a session to the second.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.bytes_total = Counter(
            "router_grpc_bytes_total", "Bytes relayed (encoded frames).", ["operation", "direction"], registry=r
        )
        self.errors_total = Counter(
            "router_grpc_errors_total",
            "Streams ended with an error, by status code.",
            ["operation", "code"],
            registry=r,
        )
        self.flow_control_timeouts_total = Counter(
            "router_grpc_flow_control_timeouts_total", "Sessions ended because a reader stopped reading.", registry=r
        )
        self.memory_guard_sessions_total = Counter(
            "router_grpc_memory_guard_sessions_total",
            "Held-back sessions ended because the router's memory passed --memory-guard-bytes.",
            registry=r,
        )
        self.sessions_expired_total = Counter(
            "router_grpc_sessions_expired_total", "Sessions ended by --session-ttl idle expiry.", registry=r
        )
        self.sessions_total = Counter(
            "router_grpc_sessions_total", "Sessions that were paired.", ["operation"], registry=r
        )
        self.agents_registered = Gauge(
            "router_grpc_agents_registered", "Agents with a live Register stream on this router.", registry=r
        )
        self.rendezvous_pending = Gauge(
            "router_grpc_rendezvous_pending", "Sessions waiting for their second side.", registry=r
        )
        self.buffered_bytes = Gauge(
            "router_grpc_buffered_bytes",
            "Bytes the relay queues hold now, every session together (bounded by --total-buffer-bytes).",
            registry=r,
        )
        self.held_bytes = Gauge(
            "router_grpc_held_bytes",
            "Bytes counted in --total-buffer-bytes besides the queues: the native server's stream windows "
            "and buffers, and messages relay readers hold while their queue is full.",
            registry=r,
        )
        self.held_bytes.set_function(held)
        self.draining = Gauge("router_grpc_draining", "1 while the router drains for shutdown.", registry=r)
        self.standby_streams = Gauge(
            "router_grpc_standby_streams",
            "Standby Connect streams agents opened ahead of time, parked until a session takes one.",
            registry=r,
        )
        self.standby_sessions_total = Counter(
            "router_grpc_standby_sessions_total",
            "Sessions whose agent side was a parked standby stream (no SessionRequest round trip).",
            ["operation"],
            registry=r,
        )
        self.agent_replacements_total = Counter(
            "router_grpc_agent_replacements_total",
            "Registrations for a workflow and task already served: replaced (same credential) or refused (another).",
            ["outcome"],
            registry=r,
        )
        # The migration's view: the same sessions split by transport (grpc or ws) of each side.
        self.sessions_by_transport = Counter(
            "router_grpc_sessions_by_transport_total",
            "Paired sessions by the client's transport.",
            ["operation", "transport"],
            registry=r,
        )
        self.agent_sessions_by_transport = Counter(
            "router_grpc_agent_sessions_by_transport_total",
            "Paired sessions by the agent's transport.",
            ["operation", "transport"],
            registry=r,
        )
        self.errors_by_transport = Counter(
            "router_grpc_errors_by_transport_total",
            "Streams ended with an error, by status code and transport.",
            ["operation", "code", "transport"],
            registry=r,
        )
        self._resume_metrics(r)
        for op in LABELS:
            self.sessions_active.labels(op)
            for direction in DIRECTIONS:
                self.bytes_total.labels(op, direction)
        self._bytes = {(op, d): self.bytes_total.labels(op, d) for op in LABELS for d in DIRECTIONS}
        #: The live sessions whose counts a render folds in first.
        self.live_sessions = live_sessions
        self.rendezvous_pending.set_function(pending)
        self.buffered_bytes.set_function(buffered)
        self.standby_streams.set_function(standby)
        self.created_sessions = Gauge(
            "router_grpc_created_sessions",
            "Sessions an orchestrator created (RouterControlService) that this replica holds.",
            registry=r,
        )
        self.created_sessions.set_function(created)
        self.replay_buffer_bytes = Gauge(
            "router_grpc_replay_buffer_bytes",
            "Bytes the agents registered here hold in the replay buffers of their resumable sessions (what "
            "clients have not acknowledged), as the agents last reported (every few seconds).",
            registry=r,
        )
        self.replay_buffer_bytes.set_function(replay)

    def _resume_metrics(self, r: CollectorRegistry) -> None:
        """Resumable sessions (docs/resume.md): what the router sees of them as their relay."""
        self.resumes_total = Counter(
            "router_grpc_resumes_total",
            "Sessions resumed or attached: the agent answered the client's resume with a Resume frame.",
            ["operation"],
            registry=r,
        )
        self.resume_failures_total = Counter(
            "router_grpc_resume_failures_total",
            "Resume attempts that failed, by cause: refused by the agent (not_found, denied, data_loss, "
            "invalid), no_agent registered, timeout, unavailable, other. A client retries some of them.",
            ["operation", "cause"],
            registry=r,
        )
        self.resume_replayed_bytes_total = Counter(
            "router_grpc_resume_replayed_bytes_total",
            "Units (payload bytes, 1 per control frame) resent after resumes, as the two ends declared them.",
            ["operation", "direction"],
            registry=r,
        )
        self.sessions_moved_total = Counter(
            "router_grpc_sessions_moved_total",
            "Resumable sessions a draining router ended so that they resume on another replica.",
            ["operation"],
            registry=r,
        )

    def resume_answered(self, session: Session) -> None:
        """Count a resume the agent answered (taken or refused): see core/resumes.py."""
        info = session.resume
        if info is None or not info.resuming:
            return
        op = session.operation_name
        if info.refused is not None:
            self.resume_failures_total.labels(op, cause_of(info.refused, info.refusal)).inc()
        elif info.confirmed:
            self.resumes_total.labels(op).inc()
            self.resume_replayed_bytes_total.labels(op, "client_to_agent").inc(info.replayed_to_agent)
            self.resume_replayed_bytes_total.labels(op, "agent_to_client").inc(info.replayed_to_client)

    def resume_failed(self, operation: str, cause: str) -> None:
        """Count a resume the router could not pair (no agent, timeout, another user's session)."""
        self.resume_failures_total.labels(operation, cause).inc()

    def settle(self, session: Session) -> None:
        """Relay hook: fold what was counted on the session since the last fold into the counters."""
        op = session.operation_name
        to_agent = session.bytes_to_agent - session.counted_to_agent
        to_client = session.bytes_to_client - session.counted_to_client
        if to_agent > 0 and (child := self._bytes.get((op, "client_to_agent"))) is not None:
            child.inc(to_agent)
        if to_client > 0 and (child := self._bytes.get((op, "agent_to_client"))) is not None:
            child.inc(to_client)
        session.counted_to_agent = session.bytes_to_agent
        session.counted_to_client = session.bytes_to_client

    def flow_control_timeout(self, session: Session) -> None:
        """Relay hook: a reader stalled."""
        self.flow_control_timeouts_total.inc()

    def session_started(self, operation: str, transport: str) -> None:
        """Count a session whose client side started relaying (`transport`: the client's)."""
        self.sessions_active.labels(operation).inc()
        self.sessions_total.labels(operation).inc()
        self.sessions_by_transport.labels(operation, transport).inc()

    def error(self, operation: str, code: grpc.StatusCode, transport: str = "grpc") -> None:
        """Count a stream that ended with an error."""
        self.errors_total.labels(operation, code.name).inc()
        self.errors_by_transport.labels(operation, code.name, transport).inc()

    def render(self) -> bytes:
        """The exposition text for /metrics, with the live sessions' bytes folded in first."""
        for session in self.live_sessions():
            self.settle(session)
        return generate_latest(self.registry)
