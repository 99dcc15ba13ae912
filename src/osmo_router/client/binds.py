"""The local addresses `port-forward` listens on (`--address`), read and bound as kubectl does.

`localhost` (the default) stands for 127.0.0.1 and ::1: each is tried, and the forward fails only if
neither binds (a machine without IPv6 still forwards on 127.0.0.1, and a local program that resolves
localhost to ::1 first, as Node does, still reaches the forward). An address named literally must
bind, or the forward fails. This is kubectl port-forward's rule (`--address`: "When localhost is
supplied, kubectl will try to bind on both 127.0.0.1 and ::1 and will fail if neither of these
addresses are available to bind"); `ssh -L` binds both loopbacks for localhost too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from osmo_router.client.forward_events import host_port
from osmo_router.io.forwarding import os_errors_named

#: What --address defaults to, as kubectl's.
DEFAULT_ADDRESS = "localhost"


@dataclass(frozen=True)
class Bind:
    """One local address to listen on; `best_effort` if it came from `localhost` (may fail if another binds)."""

    address: str
    best_effort: bool = False


LOCALHOST = (Bind("127.0.0.1", best_effort=True), Bind("::1", best_effort=True))


def parse_address(text: str) -> tuple[Bind, ...]:
    """The binds of one --address entry: an IPv4 or IPv6 literal, or localhost; ValueError if neither."""
    if text == "localhost":
        return LOCALHOST
    try:
        return (Bind(str(ipaddress.ip_address(text.strip("[]")))),)
    except ValueError:
        raise ValueError(f"--address {text!r} is not an IPv4 or IPv6 address, or localhost") from None


def parse_binds(values: Sequence[str]) -> list[Bind]:
    """Every --address, each possibly a comma-separated list as kubectl takes; each address once.

    An address named both literally and through localhost must bind (the literal wins)."""
    binds: dict[str, Bind] = {}
    for value in values:
        for part in value.split(","):
            if not part.strip():
                raise ValueError(f"--address {value!r} has an empty entry")
            for bind in parse_address(part.strip()):
                known = binds.get(bind.address)
                if known is None or (known.best_effort and not bind.best_effort):
                    binds[bind.address] = bind
    return list(binds.values())


async def bind_all(binds: Sequence[Bind], port: int, listen: Callable[[str, int], Awaitable[int]]) -> None:
    """Call `listen(address, port)` for every bind (it returns the port it got); raises OSError by the rule
    in the module docstring. With port 0 the first listener picks a free port and the others take it."""
    missed: OSError | None = None
    loose_bound = False
    for bind in binds:
        try:
            with os_errors_named(host_port(bind.address, port) if port else bind.address):
                port = await listen(bind.address, port)
        except OSError as err:
            if not bind.best_effort:
                raise
            missed = missed or err
            continue
        loose_bound = loose_bound or bind.best_effort
    if missed is not None and not loose_bound:
        raise missed
