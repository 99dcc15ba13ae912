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
    lanes: dict[int, Lane]
    passed: int
    def __init__(self, conn: Any, reader: Any) -> None: ...
    def get_buffer(self, sizehint: int, /) -> memoryview: ...
    def buffer_updated(self, count: int, /) -> None: ...
