"""Sessions an orchestrator created ahead of time (RouterControlService.CreateSession).

OSMO's service tells each side of a session out of band what the session is (docs/migration.md
1.2): the old client's URL names only operation, workflow (as the user typed it) and key. A created
session gives the router what the URL cannot say: the workflow's id and the other names a user may
type for it, the task, the exec command and terminal, the forwarded port and protocol, the rsync
module and path. An old-protocol side presenting the key is given those parameters; an old backend
presenting it is accepted for exactly that session (see ws/server.py).

Created sessions are held by key (not scoped by workflow: an old URL may name the workflow by
another name), bounded in number and in bytes, per creating service and in total, and expire
`ttl` seconds after they were created or last used. The keys of the connections an old client
announces on a created port-forward's control channel are the session's children: they stand for
the session too, and go with it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from osmo.router.v1 import control_pb2 as cpb
from osmo_router.router.core.ids import check_id, new_session_key
from osmo_router.wire.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from osmo_router.wire.protocol import pb
from osmo_router.wire.wsproto import parse_control_message

#: Which `params` a created session of each operation may carry.
PARAMS_OF = {pb.OPERATION_EXEC: "exec", pb.OPERATION_PORT_FORWARD: "port_forward", pb.OPERATION_RSYNC: "rsync"}
#: Most aliases, and most argv entries, of one created session.
MAX_ALIASES = 16
MAX_ARGS = 256
#: Bytes one announced connection key costs in the byte budget (the key and its bookkeeping).
CHILD_COST = 128


@dataclass(eq=False, slots=True)
class CreatedSession:
    """One created session, as the router holds it."""

    message: cpb.CreatedSession
    owner: str
    ttl: float
    size: int
    expires: float
    used: bool = False
    #: Connection keys announced on its control channel (old port-forward and rsync), in order.
    children: list[str] = field(default_factory=list)
    #: Set when the session is terminated or expires: what runs on it ends.
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set on each announcement and when the client's control channel closes (ws/created.py waits on it).
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: The client's control channel has closed (the backend's then closes too, as with the old router).
    channel_closed: bool = False
    #: A client, and a backend, hold the two ends of the control channel (one each at a time).
    client_attached: bool = False
    backend_attached: bool = False
    #: Control channels open on the session: it does not expire while one is.
    holders: int = 0

    @property
    def key(self) -> str:
        """The session key."""
        return self.message.session_key

    @property
    def workflow_id(self) -> str:
        """The workflow's id (as its backends name it)."""
        return self.message.workflow_id

    @property
    def task(self) -> str:
        """The task ("" for any)."""
        return self.message.task

    @property
    def operation(self) -> int:
        """The operation (pb.Operation)."""
        return self.message.operation

    def names(self, workflow: str) -> bool:
        """Whether `workflow` (as a URL names it) is this session's workflow: its id or one of its aliases."""
        return workflow == self.message.workflow_id or workflow in self.message.workflow_aliases

    def expires_in(self) -> float:
        """Seconds until expiry (0 once expired)."""
        return max(0.0, self.expires - time.monotonic())

    def use(self) -> None:
        """A side presented the key: mark it used and keep it alive for another `ttl`."""
        self.used = True
        self.expires = time.monotonic() + self.ttl

    def is_control_key(self, key: str) -> bool:
        """Whether a client presenting `key` opens an old port-forward's control channel (TCP, or rsync)."""
        if key != self.key:
            return False
        if self.operation == pb.OPERATION_RSYNC:
            return True
        return self.operation == pb.OPERATION_PORT_FORWARD and self.message.port_forward.protocol != pb.PROTOCOL_UDP

    def expired(self, now: float) -> bool:
        """Past its expiry with no control channel open on it."""
        return self.holders == 0 and self.expires <= now

    def hold(self, delta: int) -> None:
        """A control channel opens (+1) or closes (-1) on the session; its ttl starts again at the close."""
        self.holders += delta
        self.use()


@dataclass(frozen=True)
class CreatedLimits:
    """Bounds on created sessions (RouterConfig: --created-*)."""

    max_sessions: int = 10_000
    max_per_service: int = 1000
    max_bytes: int = 64 * 1024 * 1024
    max_bytes_per_service: int = 4 * 1024 * 1024
    default_ttl: float = 600.0
    max_ttl: float = 24 * 3600.0
    max_children: int = 4096


def validate(message: cpb.CreatedSession) -> None:
    """Refuse a malformed CreatedSession with InvalidArgument."""
    check_id("workflow_id", message.workflow_id, required=True)
    check_id("task", message.task, required=False)
    check_id("session_key", message.session_key, required=False)
    if len(message.workflow_aliases) > MAX_ALIASES:
        raise InvalidArgument(f"more than {MAX_ALIASES} workflow aliases")
    for alias in message.workflow_aliases:
        check_id("workflow alias", alias, required=True)
    expected = PARAMS_OF.get(message.operation)
    if expected is None:
        raise InvalidArgument("operation must be exec, port-forward or rsync")
    kind = message.WhichOneof("params")
    if kind not in (None, expected):
        raise InvalidArgument(f"a {expected} session cannot carry {kind} parameters")
    if len(message.exec.command) > MAX_ARGS:
        raise InvalidArgument(f"the command has more than {MAX_ARGS} arguments")
    if kind == "port_forward":
        if not 0 < message.port_forward.port < 65536:
            raise InvalidArgument(f"port must be in 1-65535, not {message.port_forward.port}")
        if message.port_forward.protocol not in (pb.PROTOCOL_UNSPECIFIED, pb.PROTOCOL_TCP, pb.PROTOCOL_UDP):
            raise InvalidArgument("protocol must be TCP or UDP")
    if kind == "rsync":
        check_id("rsync module", message.rsync.module, required=True)
        check_id("rsync path", message.rsync.path, required=True)
        if set("[]") & set(message.rsync.module) or not message.rsync.path.startswith("/"):
            raise InvalidArgument("the rsync module must be a plain name and its path absolute")


class CreatedSessions:
    """The created sessions of one router process, by key."""

    def __init__(self, limits: CreatedLimits | None = None) -> None:
        self.limits = limits or CreatedLimits()
        self._by_key: dict[str, CreatedSession] = {}
        self._by_child: dict[str, CreatedSession] = {}
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._total_bytes = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def create(self, owner: str, message: cpb.CreatedSession) -> CreatedSession:
        """Hold a new created session for `owner`; InvalidArgument, AlreadyExists or ResourceExhausted."""
        self.expire()
        validate(message)
        created = cpb.CreatedSession()
        created.CopyFrom(message)
        if not created.session_key:
            created.session_key = new_session_key()
        if created.session_key in self._by_key or created.session_key in self._by_child:
            raise AlreadyExists("the session key is taken")
        ttl = float(created.ttl_seconds) or self.limits.default_ttl
        if ttl > self.limits.max_ttl:
            raise InvalidArgument(f"ttl_seconds must be at most {self.limits.max_ttl:g}")
        created.ttl_seconds = int(ttl)
        size = created.ByteSize()
        self._check_room(owner, size, new_session=True)
        session = CreatedSession(created, owner, ttl, size, time.monotonic() + ttl)
        self._by_key[session.key] = session
        self._charge(owner, 1, size)
        return session

    def get(self, key: str) -> CreatedSession | None:
        """The created session of `key` (its own key, or a connection key announced on it), if live."""
        session = self._by_key.get(key) or self._by_child.get(key)
        if session is not None and session.expired(time.monotonic()):
            self.remove(session)
            return None
        return session

    def lookup(self, key: str, workflow: str) -> CreatedSession | None:
        """The created session `key` stands for, when `workflow` names it; PermissionDenied for another workflow."""
        session = self.get(key) if key else None
        if session is None:
            return None
        if not session.names(workflow):
            raise PermissionDenied("the session key was created for another workflow")
        return session

    def add_child(self, session: CreatedSession, child: str) -> None:
        """Record a connection key announced on the session's control channel (bounded)."""
        check_id("connection key", child, required=True)
        if child in self._by_child or child in self._by_key:
            raise AlreadyExists("the connection key is taken")
        if len(session.children) >= self.limits.max_children:
            raise ResourceExhausted(f"more than {self.limits.max_children} connections announced on one session")
        self._check_room(session.owner, CHILD_COST, new_session=False)
        session.children.append(child)
        session.changed.set()
        self._by_child[child] = session
        session.size += CHILD_COST
        self._charge(session.owner, 0, CHILD_COST)
        session.use()

    def attach_client(self, session: CreatedSession) -> None:
        """A client's control channel opens on the session (AlreadyExists while another one is open)."""
        if session.client_attached:
            raise AlreadyExists("a client already holds this session's control channel")
        session.client_attached, session.channel_closed = True, False
        session.hold(+1)

    def announce(self, session: CreatedSession, message: bytes) -> None:
        """One control message of the client: exactly one JSON object with a key, recorded as a connection."""
        conn_key, _cookie, _kind = parse_control_message(message)
        self.add_child(session, conn_key)

    def detach_client(self, session: CreatedSession) -> None:
        """The client's control channel closed: so will the backend's."""
        session.hold(-1)
        session.client_attached, session.channel_closed = False, True
        session.changed.set()

    def remove(self, session: CreatedSession) -> None:
        """Forget a session and its connection keys (idempotent); what runs on it is told to end."""
        if self._by_key.get(session.key) is not session:
            return
        del self._by_key[session.key]
        for child in session.children:
            self._by_child.pop(child, None)
        self._charge(session.owner, -1, -session.size)
        session.ended.set()

    def terminate(self, key: str) -> CreatedSession:
        """Remove the created session of `key`; NotFound when there is none."""
        session = self._by_key.get(key)
        if session is None:
            raise NotFound("no such created session")
        self.remove(session)
        return session

    def expire(self) -> int:
        """Remove every expired session; how many."""
        now = time.monotonic()
        expired = [s for s in self._by_key.values() if s.expired(now)]
        for session in expired:
            self.remove(session)
        return len(expired)

    def _check_room(self, owner: str, size: int, *, new_session: bool) -> None:
        limits = self.limits
        if self._total_bytes + size > limits.max_bytes:
            raise ResourceExhausted(f"created sessions hold their maximum of {limits.max_bytes} bytes")
        if self._bytes.get(owner, 0) + size > limits.max_bytes_per_service:
            raise ResourceExhausted(
                f"{owner}'s created sessions hold their maximum of {limits.max_bytes_per_service} bytes"
            )
        if new_session:
            if len(self._by_key) >= limits.max_sessions:
                raise ResourceExhausted(f"the router holds its maximum of {limits.max_sessions} created sessions")
            if self._count.get(owner, 0) >= limits.max_per_service:
                raise ResourceExhausted(f"{owner} holds its maximum of {limits.max_per_service} created sessions")

    def _charge(self, owner: str, count: int, size: int) -> None:
        self._count[owner] = self._count.get(owner, 0) + count
        self._bytes[owner] = self._bytes.get(owner, 0) + size
        self._total_bytes += size
        if self._count[owner] <= 0 and self._bytes[owner] <= 0:
            del self._count[owner], self._bytes[owner]
