"""The three operations, in one table: their enum value, label, gRPC method, URL segment and messages.

Everything that names an operation (metrics labels, audit lines, the client service's method
names, the peer service's methods, the old router's URL paths, the init each stream starts with)
reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from osmo_router.wire.protocol import pb


@dataclass(frozen=True)
class Operation:
    """One operation and every name and message type it has on the wire."""

    #: The osmo.router.v1.Operation enum value.
    value: int
    #: Metrics label, audit field and the old router's URL segment (`/api/router/{label}/...`).
    label: str
    #: RouterClientService (and RouterPeerService) method name.
    method: str
    #: The client's request and response message types.
    request: Any
    response: Any
    #: The SessionOpen oneof field (and the request's init type) of this operation.
    open_field: str

    def parse_init(self, raw: bytes) -> Any:
        """The init of a client's encoded first message (raises DecodeError on garbage)."""
        request = self.request.FromString(raw)
        return request.init if request.WhichOneof("kind") == "init" else None

    def encode_init(self, init: Any) -> bytes:
        """A client's encoded first message carrying `init`."""
        return bytes(self.request(init=init).SerializeToString())


EXEC: Final = Operation(pb.OPERATION_EXEC, "exec", "Exec", pb.ExecRequest, pb.ExecResponse, "exec")
PORT_FORWARD: Final = Operation(
    pb.OPERATION_PORT_FORWARD,
    "portforward",
    "PortForward",
    pb.PortForwardRequest,
    pb.PortForwardResponse,
    "port_forward",
)
RSYNC: Final = Operation(pb.OPERATION_RSYNC, "rsync", "Rsync", pb.RsyncRequest, pb.RsyncResponse, "rsync")

OPERATIONS: Final = (EXEC, PORT_FORWARD, RSYNC)
BY_VALUE: Final[dict[int, Operation]] = {op.value: op for op in OPERATIONS}
BY_LABEL: Final[dict[str, Operation]] = {op.label: op for op in OPERATIONS}
BY_METHOD: Final[dict[str, Operation]] = {op.method: op for op in OPERATIONS}
BY_OPEN_FIELD: Final[dict[str, Operation]] = {op.open_field: op for op in OPERATIONS}
#: Metrics labels of the operations, in table order.
LABELS: Final = tuple(op.label for op in OPERATIONS)


def label_of(value: int) -> str:
    """The label of an operation value ("unknown" for anything else)."""
    op = BY_VALUE.get(value)
    return op.label if op is not None else "unknown"


def operation_of(open_msg: pb.SessionOpen) -> int:
    """The Operation enum value of a SessionOpen, from the init it carries."""
    op = BY_OPEN_FIELD.get(open_msg.WhichOneof("init") or "")
    return op.value if op is not None else pb.OPERATION_UNSPECIFIED
