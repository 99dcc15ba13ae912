"""A forwarded UDP port on the agent: one connected UDP socket per local peer of the client.

Each Datagram frame names the client-side sender in `peer`; the agent sends it from that peer's
own socket, so the target's reply comes back on that socket and is returned with the same `peer`.
Mappings idle for UDP_IDLE_TIMEOUT are closed by a timer (no polling).

Sockets are descriptors, so they are capped twice (a flood of senders must not exhaust the agent):

- per UDP forward session (`--max-udp-sockets-per-session`, default 256): a datagram from a new
  sender when the session holds that many mappings evicts the session's least recently used one
  (like a NAT table; a resolver that uses a fresh source port per query keeps working);
- per agent process, over all sessions (`--max-udp-sockets`, default 1024): when that many are open,
  a new sender again takes the place of its own session's least recently used mapping; a session
  that holds none has the datagram dropped. A session never evicts another session's mappings.

A socket that cannot be opened (the process is out of descriptors, say) drops the datagram too.

Replies wait for the session stream in a queue bounded in datagrams and in bytes (UDP_QUEUE_BYTES),
whose bytes also count in the user's share (UDP_USER_BYTES) and the agent's total (UDP_TOTAL_BYTES,
`SocketBudget.replies`): a client that stops reading drops its own replies, never another user's.
Evictions and drops are counted (UdpRelay.evicted / .refused, SocketBudget totals) and reported by
one warning at most every WARN_INTERVAL seconds per agent, and with the totals when the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import grpc

from osmo_router.io.byte_shares import ByteShares
from osmo_router.io.datagram_queue import DatagramQueue
from osmo_router.io.forwarding import (
    UDP_IDLE_TIMEOUT,
    UDP_QUEUE_BYTES,
    UDP_QUEUE_DEPTH,
    UDP_TOTAL_BYTES,
    UDP_USER_BYTES,
    drain,
    send_datagram,
)
from osmo_router.transport import SessionStream
from osmo_router.wire.errors import RouterError
from osmo_router.wire.protocol import half_close_frame, pb

log = logging.getLogger(__name__)

#: Default of --max-udp-sockets-per-session: mappings (sockets) one UDP forward session may hold.
MAX_SOCKETS_PER_SESSION = 256
#: Default of --max-udp-sockets: UDP sockets of all the forward sessions of one agent process.
MAX_SOCKETS = 1024
#: Seconds between two warnings about a cap (per agent process); the counts in between are summed.
WARN_INTERVAL = 10.0


class SocketBudget:
    """The UDP sockets the forward sessions of one agent process hold, against `limit`."""

    def __init__(self, limit: int = MAX_SOCKETS) -> None:
        self.limit = limit
        self.in_use = 0
        #: Totals since the start: mappings evicted for a new sender, datagrams of new senders dropped.
        self.evicted = 0
        self.refused = 0
        self._warned_at: float | None = None
        self._unreported = [0, 0]
        #: The bytes of the replies queued by every session, per user and in all.
        self.replies = ByteShares(UDP_TOTAL_BYTES, UDP_USER_BYTES)

    def take(self) -> bool:
        """Count one more socket; False (nothing counted) if `limit` are open."""
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        """One socket fewer."""
        self.in_use -= 1

    def note(self, *, evicted: int = 0, refused: int = 0, reason: str) -> None:
        """Count evictions or drops; log one warning per WARN_INTERVAL with what happened since the last."""
        self.evicted += evicted
        self.refused += refused
        self._unreported[0] += evicted
        self._unreported[1] += refused
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_INTERVAL:
            return
        self._warned_at = now
        evicted_since, refused_since = self._unreported
        self._unreported = [0, 0]
        log.warning(
            "udp forward: %s: %d mappings evicted and %d datagrams from new senders dropped "
            "(%d sockets open in this agent, at most %d; this warning at most every %.0fs)",
            reason,
            evicted_since,
            refused_since,
            self.in_use,
            self.limit,
            WARN_INTERVAL,
            extra={"fields": {"event": "udp_socket_cap", "evicted": evicted_since, "refused": refused_since}},
        )


_BUDGET = SocketBudget()


def agent_budget(limit: int) -> SocketBudget:
    """The process-wide budget (descriptors are a process's), held to `limit` (--max-udp-sockets)."""
    _BUDGET.limit = limit
    return _BUDGET


class _PeerSocket(asyncio.DatagramProtocol):
    """The socket that speaks to the target on behalf of one client-side peer."""

    def __init__(self, relay: UdpRelay, peer: str) -> None:
        self.relay = relay
        self.peer = peer
        self.transport: asyncio.DatagramTransport | None = None
        self.last_used = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        #: Counted in the relay's budget until closed.
        self.counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and arm the idle timer."""
        # (The selector loop's datagram transport does not subclass asyncio.DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._arm(UDP_IDLE_TIMEOUT)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """A reply from the target: back to the client, addressed to this peer."""
        self.last_used = time.monotonic()
        self.relay.reply(self.peer, data)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (nothing listening): UDP has no delivery guarantee, so only log them."""
        log.debug("udp to the target for %s: %s", self.peer, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the mapping."""
        if self._timer is not None:
            self._timer.cancel()
        self.relay.forget(self)
        self.relay.release(self)

    def send(self, payload: bytes) -> None:
        """Send one datagram to the target."""
        self.last_used = time.monotonic()
        if self.transport is not None:
            send_datagram(self.transport, payload)

    def close(self) -> None:
        """Close the socket (connection_lost follows)."""
        if self.transport is not None:
            self.transport.close()

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_used
        if idle >= UDP_IDLE_TIMEOUT:
            log.debug("udp mapping for %s idle for %.0fs: closed", self.peer, idle)
            self.close()
        else:
            self._arm(UDP_IDLE_TIMEOUT - idle)


#: How /proc/net/udp6 writes ::1 and :: (four 32-bit words, each in host byte order, as hex).
_V6_LOOPBACK, _V6_ANY = "00000000000000000000000001000000", "0" * 32


def udp_target_host(hosts: list[str], port: int, proc_net: str = "/proc/net") -> str:
    """Of the loopback `hosts` to try (IPv4 first), the one a UDP socket of the container listens on.

    TCP tries each address in turn (a refused connect says nobody is there); a UDP datagram to an
    address nobody listens on is dropped without a word, so a server bound to ::1 alone got nothing.
    The container's own socket table (/proc/net/udp, udp6) says where a server is bound; with none
    found (it may start later, or /proc is not Linux's) the first host is taken, as before.
    """
    if len(hosts) < 2:
        return hosts[0]
    for table, host in (("udp", "127.0.0.1"), ("udp6", "::1")):
        if host in hosts and _bound(f"{proc_net}/{table}", port, v6=table == "udp6"):
            return host
    return hosts[0]


def _bound(table: str, port: int, *, v6: bool) -> bool:
    """Whether `table` lists a socket bound to `port` on the loopback or the wildcard address."""
    try:
        with open(table) as rows:
            next(rows, None)  # the header
            for row in rows:
                address, _, hex_port = row.split()[1].partition(":")
                if int(hex_port, 16) != port:
                    continue
                if v6 and address in (_V6_LOOPBACK, _V6_ANY):
                    return True
                if not v6 and (address == "00000000" or address.endswith("7F")):  # 0.0.0.0, 127.x.x.x
                    return True
    except (OSError, ValueError, IndexError):
        return False
    return False


class UdpRelay:
    """One forwarded UDP port: datagrams from the stream to the target and replies back."""

    def __init__(
        self,
        stream: SessionStream,
        hosts: list[str],
        port: int,
        *,
        max_sockets: int = MAX_SOCKETS_PER_SESSION,
        budget: SocketBudget | None = None,
        user: str = "",
    ) -> None:
        self.stream = stream
        self.hosts = hosts
        self.target = (hosts[0], port)  # where new senders go until udp_target_host finds a listener
        self.max_sockets = max_sockets
        self.budget = budget if budget is not None else _BUDGET
        #: Mappings by peer.
        self._peers: dict[str, _PeerSocket] = {}
        self._replies: DatagramQueue[pb.Frame] = DatagramQueue(
            UDP_QUEUE_DEPTH, UDP_QUEUE_BYTES, self.budget.replies, user
        )
        #: Mappings closed to make room for a new sender; datagrams of new senders dropped (no room).
        self.evicted = 0
        self.refused = 0

    async def run(self) -> None:
        """Relay until the client half-closes (then end cleanly) or the session breaks."""
        sender = asyncio.create_task(self._send_replies())
        clean = False
        try:
            while (frame := await self.stream.recv()) is not None:
                kind = frame.WhichOneof("kind")
                if kind == "datagram":
                    await self._deliver(frame.datagram)
                elif kind == "half_close":
                    clean = True
                    break
        except (grpc.aio.AioRpcError, RouterError, asyncio.InvalidStateError) as err:
            log.info("udp forward to port %d broke: %s", self.target[1], err)
        finally:
            for peer in list(self._peers.values()):
                peer.close()
                self.release(peer)
            self._peers.clear()
            await self._finish_sender(sender, graceful=clean)
            if self.evicted or self.refused or self.dropped:
                counts = {"evicted": self.evicted, "refused": self.refused, "dropped": self.dropped}
                log.info(
                    "udp forward to port %d ended: %d mappings evicted, %d datagrams from new senders dropped, "
                    "%d replies dropped (the client was far behind)",
                    self.target[1],
                    *counts.values(),
                    extra={"fields": {"event": "udp_forward_end", **counts}},
                )
        if clean:
            await self.stream.send(half_close_frame())
            await self.stream.close()
            await drain(self.stream)

    @property
    def dropped(self) -> int:
        """Replies dropped because the client was far behind (its queue or its user's share was full)."""
        return self._replies.dropped

    async def _finish_sender(self, sender: asyncio.Task[None], *, graceful: bool) -> None:
        """Let queued replies go out (bounded) after a clean end; drop them after a broken one."""
        try:
            if graceful:
                self._replies.end()
                await asyncio.wait({sender}, timeout=1.0)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        finally:
            self._replies.close()  # its bytes go back to the user's and the agent's shares

    async def _deliver(self, datagram: pb.Datagram) -> None:
        peer = self._peers.get(datagram.peer)
        if peer is None:
            peer = await self._open(datagram.peer)
            if peer is None:
                return
        peer.send(datagram.payload)

    async def _open(self, name: str) -> _PeerSocket | None:
        """A new mapping for a new sender, within the caps (see the module); None if there is no room."""
        if len(self._peers) >= self.max_sockets:
            self._evict_oldest()
            self.budget.note(evicted=1, reason=f"--max-udp-sockets-per-session {self.max_sockets} reached")
        if not self.budget.take():
            if not self._peers:
                self.refused += 1
                self.budget.note(refused=1, reason=f"--max-udp-sockets {self.budget.limit} reached")
                return None
            self._evict_oldest()
            self.budget.note(evicted=1, reason=f"--max-udp-sockets {self.budget.limit} reached")
            if not self.budget.take():  # (the budget shrank below what is open)
                self.refused += 1
                return None
        peer = _PeerSocket(self, name)
        self.target = (udp_target_host(self.hosts, self.target[1]), self.target[1])
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: peer, remote_addr=self.target)
        except OSError as err:  # out of descriptors, say: dropped, counted and warned like a cap
            self.release(peer)
            self.refused += 1
            self.budget.note(
                refused=1, reason=f"no socket to {self.target[0]}:{self.target[1]} ({err.strerror or err})"
            )
            return None
        except BaseException:
            self.release(peer)
            raise
        self._peers[name] = peer
        return peer

    def _evict_oldest(self) -> None:
        """Close the least recently used mapping (its place is free at once)."""
        oldest = min(self._peers.values(), key=lambda p: p.last_used)
        self.evicted += 1
        self.forget(oldest)
        self.release(oldest)
        oldest.close()

    def release(self, peer: _PeerSocket) -> None:
        """Give a mapping's socket back to the budget (once)."""
        if peer.counted:
            peer.counted = False
            self.budget.give_back()

    def reply(self, peer: str, payload: bytes) -> None:
        """Queue a reply for the client (dropped if the client is far behind: UDP may drop)."""
        self._replies.offer(pb.Frame(datagram=pb.Datagram(payload=payload, peer=peer)), len(payload))

    def forget(self, peer: _PeerSocket) -> None:
        """Remove a closed mapping."""
        if self._peers.get(peer.peer) is peer:
            del self._peers[peer.peer]

    async def _send_replies(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while (frame := await self._replies.get()) is not None:
                await self.stream.send(frame)
