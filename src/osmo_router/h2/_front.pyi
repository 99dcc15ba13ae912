from collections.abc import Callable
from typing import Any

class Lane:
    def __init__(
        self,
        conn: Any,
        stream: Any,
        listener: Callable[[bytes], bool],
        session: Any,
        generation: int,
        sender: Any,
        after: Callable[[int, int], None],
        max_message: int,
    ) -> None: ...

class Front:
    lanes: dict[int, Any]
    passed: int
    def __init__(self, conn: Any, reader: Any) -> None: ...
    def get_buffer(self, sizehint: int, /) -> memoryview: ...
    def buffer_updated(self, count: int, /) -> None: ...

class SocketLane:
    sent: int
    def __init__(
        self,
        reader: Any,
        session: Any,
        inner: Any,
        writer: Any,
        call: Any,
        stream: Any,
        conn: Any,
        buffer: Any,
        fallback: Callable[[], None],
        hand: Callable[[Any, int, bool], None],
        after: Callable[[bytes, int, int], None],
        fd: int,
        hang_up_check: bool,
    ) -> None: ...
    def __call__(self) -> None: ...

class RelayLane:
    def __init__(
        self,
        conn: Any,
        stream: Any,
        through: Any,
        passing: Any,
        queue: Any,
        sink: Any,
        framed: Any,
        out: Any,
        out_conn: Any,
        after: Callable[[int, int], None],
        max_message: int,
    ) -> None: ...
