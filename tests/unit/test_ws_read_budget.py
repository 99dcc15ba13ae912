"""ws/read_budget.py: a peer's close seen in the TCP state, and paired reads given back in full."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from osmo_router.router.core.budget import ByteBudget
from osmo_router.router.ws.read_budget import PAUSED_READ, PairedReads, tcp_closed


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        far = socket.create_connection(server.getsockname())
        near, _ = server.accept()
    return near, far


def _soon(check: Callable[[], bool], bound: float = 5.0) -> bool:
    """Whether `check` holds within `bound` seconds (the FIN may be a moment behind the data)."""
    deadline = time.monotonic() + bound
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_fin_behind_unread_data_and_a_reset_are_seen() -> None:
    near, far = _pair()
    try:
        assert not tcp_closed(near)
        far.sendall(b"unread")
        far.close()  # FIN behind the unread bytes
        near.settimeout(5)
        assert near.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL) == b"unread"  # in; the FIN is behind them
        assert _soon(lambda: tcp_closed(near))  # seen without reading them
    finally:
        near.close()
    near, far = _pair()
    try:
        far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        far.close()  # a reset
        near.settimeout(5)
        try:
            near.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:
            pass
        assert _soon(lambda: tcp_closed(near))
    finally:
        near.close()
    assert not tcp_closed(object())  # not a TCP socket: never taken for a closed one


def test_paired_reads_reserve_hold_and_give_back() -> None:
    user, total = ByteBudget(10 * PAUSED_READ), ByteBudget(100 * PAUSED_READ)
    first, second = PairedReads(4 * PAUSED_READ), PairedReads(4 * PAUSED_READ)
    first.use((user, total))
    second.use((user, total))
    assert first.free()  # the reservation (half the user's budget)
    assert not second.free()  # none left: it reads with its socket paused between messages
    second.hold_paused()
    second.hold_paused()  # once only
    assert user.held == 4 * PAUSED_READ + PAUSED_READ
    second.unhold_paused()
    second.hold_paused()
    for reads in (first, second, first):  # release is idempotent
        reads.release()
    assert (user.held, user.reserved, total.held, total.reserved) == (0, 0, 0, 0)
