"""One session: a client-agent pairing, its two relay directions, and the latch its rendezvous waits on."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from osmo_router.router.auth.identity import Identity
from osmo_router.router.core.flow_control import FlowQueue
from osmo_router.router.core.resumes import ResumeInfo
from osmo_router.wire.errors import DeadlineExceeded, RouterError, detached
from osmo_router.wire.ops import label_of
from osmo_router.wire.protocol import pb


class RendezvousTimeout(DeadlineExceeded):
    """The other side of a session did not join within the rendezvous timeout."""


def scoped_key(workflow_id: str, key: str) -> str:
    """A session key in its workflow's key space: the same key in two workflows names two sessions.

    So an agent or client of one workflow can neither join nor learn of another workflow's session,
    whatever key it presents. Ids never hold control characters (check_id), so the NUL cannot clash.
    """
    return f"{workflow_id}\0{key}"


class Latch:
    """A one-shot asyncio.Event (is_set / set / wait) without Event's per-instance deque.

    A router holds one per session, and 10,000 idle sessions should cost as little as they can.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        """True once `set` was called."""
        return self._set

    def set(self) -> None:
        """Set the latch and wake every waiter."""
        if self._set:
            return
        self._set = True
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters = None

    async def wait(self) -> bool:
        """Wait until the latch is set."""
        if self._set:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


#: Task names a SessionReady lists at most (a workflow may have hundreds of agents).
MAX_TASKS_TOLD = 16


@dataclass(frozen=True, slots=True)
class DefaultedTask:
    """The agent the router chose for a client that named no task, among the workflow's tasks."""

    task: str
    tasks: tuple[str, ...]
    #: How many tasks the workflow has, when `tasks` holds only the first ones (scale-out's directory).
    count: int = 0

    def into(self, ready: pb.SessionReady) -> None:
        """Fill the SessionReady fields that say so (at most MAX_TASKS_TOLD names)."""
        ready.defaulted_task = self.task
        ready.tasks.extend(self.tasks[:MAX_TASKS_TOLD])
        ready.task_count = max(self.count, len(self.tasks))


@dataclass(eq=False, slots=True)
class Session:
    """One client-agent pairing and the two directions of its relay."""

    key: str
    workflow_id: str
    task: str
    buffer: int
    buffer_bytes: int = 4 * 1024 * 1024
    operation: int = pb.OPERATION_UNSPECIFIED
    user: str = ""
    open_message: bytes = b""
    #: The bytes of open_message counted as held in the user's and the process's budgets.
    init_bytes: int = 0
    agent_id: str = ""
    #: The joined agent's registration said it recognises resumes (told to the client in its SessionReady).
    agent_resumes: bool = False
    client_joined: bool = False
    agent_joined: bool = False
    created: float = field(default_factory=time.monotonic)
    paired_at: float | None = None
    #: When activity was last noticed (`last_activity`).
    active_at: float = field(default_factory=time.monotonic)
    #: bytes_to_agent + bytes_to_client at that look.
    moved_at_look: int = 0
    bytes_to_agent: int = 0
    bytes_to_client: int = 0
    #: How much of bytes_to_agent / bytes_to_client the metrics counters already hold.
    counted_to_agent: int = 0
    counted_to_client: int = 0
    error: RouterError | None = None
    agent_half_closed: bool = False
    #: How the remote process ended, as the agent reported it ("code 0", "signal 9"), for the audit log.
    exit_status: str = ""
    #: The credential of the registered agent asked to serve the session: only it may join.
    expected_agent: Identity | None = None
    #: The subject of the side that created the session (its pending count is theirs).
    creator: str = ""
    #: The port-forward command this session is a connection of ("" for none; see core/limits.py).
    forward_id: str = ""
    #: When the client named no task and the router chose among several agents: the chosen task and
    #: the workflow's tasks (told to the client in its SessionReady, as kubectl names the default container).
    defaulted: DefaultedTask | None = None
    #: Set when the client asked for resume (core/resumes.py); None for every other session.
    resume: ResumeInfo | None = None
    paired: Latch = field(default_factory=Latch)
    to_agent: FlowQueue = field(init=False)
    to_client: FlowQueue = field(init=False)

    def __post_init__(self) -> None:
        self.to_agent = FlowQueue(self.buffer, self.buffer_bytes)
        self.to_client = FlowQueue(self.buffer, self.buffer_bytes)

    @property
    def scoped_key(self) -> str:
        """The key in its workflow's key space (see `scoped_key`)."""
        return scoped_key(self.workflow_id, self.key)

    @property
    def operation_name(self) -> str:
        """The operation as the metrics label it."""
        return label_of(self.operation)

    @property
    def last_activity(self) -> float:
        """When the session was last seen active (for idle expiry): its creation, or the first look that
        found bytes relayed since the look before.

        The relay counts every message's bytes on the session (core/relay.py) and reads no clock per
        message (issue 18: that was two calls per relayed message); the idle sweep (router/server.py,
        every ttl/4 at most) looks here. So a session is never taken for idle sooner than it was, and at
        most one sweep's interval later than it was.
        """
        moved = self.bytes_to_agent + self.bytes_to_client
        if moved != self.moved_at_look:
            self.moved_at_look = moved
            self.active_at = time.monotonic()
        return self.active_at

    def fail(self, error: RouterError) -> None:
        """End the session with an error; both sides' relays raise it."""
        if self.error is None:
            self.error = detached(error)  # kept: without the frames that raised it (wire/errors.py)
        self.to_agent.fail(error)
        self.to_client.fail(error)
