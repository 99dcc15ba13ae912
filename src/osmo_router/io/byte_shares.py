"""Bytes counted against a total and per owner: what many holders of one kind may hold together."""

from __future__ import annotations

from collections.abc import Hashable


class ByteShares:
    """Bytes counted against a total and against each owner's share of it (owners: user names, connections)."""

    def __init__(self, total: int, per_owner: int) -> None:
        self.total = total
        self.per_owner = per_owner
        self.used = 0
        self._by_owner: dict[Hashable, int] = {}

    def take(self, owner: Hashable, size: int) -> bool:
        """Count `size` more bytes for `owner` if both the total and the owner's share have room."""
        mine = self._by_owner.get(owner, 0)
        if self.used + size > self.total or mine + size > self.per_owner:
            return False
        self.used += size
        self._by_owner[owner] = mine + size
        return True

    def give(self, owner: Hashable, size: int) -> None:
        """Count `size` fewer bytes for `owner`."""
        self.used -= size
        left = self._by_owner.get(owner, 0) - size
        if left > 0:
            self._by_owner[owner] = left
        else:
            self._by_owner.pop(owner, None)

    def owned(self, owner: Hashable) -> int:
        """The bytes counted for `owner` now."""
        return self._by_owner.get(owner, 0)
