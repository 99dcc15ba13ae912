"""`osmo-net-client port-forward`: local TCP or UDP ports forwarded to ports in the container.

One gRPC channel per process. A *watch* session (see osmo_router.io.forwarding) proves the agent is
there before anything listens, and its breaking says the agent or the router went away: then the
command exits 255, or with --reconnect keeps listening and re-establishes the watch with backoff.

Every session (the watch, each TCP connection, each UDP port) is resumable (issue 17,
docs/resume.md): a router restart or a network cut is repaired within --resume-grace, the
listeners stay up meanwhile, and the watch is lost only when its session cannot be resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc

from osmo_router.client.binds import Bind, bind_all, parse_binds
from osmo_router.client.config import ClientConfig
from osmo_router.client.forward_events import STOP_SIGNALS, Reporter
from osmo_router.client.forward_tcp import TcpListener, listen_tcp
from osmo_router.client.forward_udp import UdpForward
from osmo_router.client.notice import say
from osmo_router.client.resume_start import Notify, open_resumable, ready_resumable, start_resumable
from osmo_router.client.session import rpc_failure, start_session
from osmo_router.io.forwarding import WATCH_PORT
from osmo_router.transport import SessionInit, SessionStream, Transport
from osmo_router.transport.rollout import connect_transport
from osmo_router.wire.codec import fast_method
from osmo_router.wire.errors import (
    EXIT_CONNECTION_ERROR,
    DeadlineExceeded,
    RouterError,
    Unavailable,
    from_status_number,
)
from osmo_router.wire.protocol import CLIENT_SERVICE, CLOSE_GRACE, half_close_frame, pb
from osmo_router.wire.streams import FrameStream

#: Exit status for bad arguments and local failures (a port already in use).
EXIT_USAGE = 2
EXIT_LOCAL_ERROR = 1
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
#: Answers to the watch that say this forward will not be served (no point in waiting, --reconnect or not).
REFUSALS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT})


@dataclass(frozen=True)
class PortSpec:
    """One SPEC: a local port (0 = pick a free one) forwarded to a remote port."""

    local_port: int
    remote_port: int


def parse_spec(text: str) -> PortSpec:
    """LOCAL:REMOTE, REMOTE (same local port) or :REMOTE (free local port); ValueError if invalid."""
    local, sep, remote = text.rpartition(":")
    if not sep:
        local = remote
    try:
        remote_port = int(remote)
        local_port = int(local) if local else 0
    except ValueError:
        hint = " (the protocol is --protocol's, for every SPEC)" if "/" in text else ""
        raise ValueError(f"{text!r} is not LOCAL:REMOTE, REMOTE or :REMOTE{hint}") from None
    if not 1 <= remote_port <= 65535 or not 0 <= local_port <= 65535:
        raise ValueError(f"{text!r}: ports must be within 1-65535")
    return PortSpec(local_port, remote_port)


def parse_specs(texts: Sequence[str]) -> list[PortSpec]:
    """Every SPEC (`parse_spec`); ValueError also for a local port given twice (found before anything listens)."""
    ports = [parse_spec(text) for text in texts]
    seen: set[int] = set()
    for spec in ports:
        if spec.local_port in seen:
            raise ValueError(f"local port {spec.local_port} is given twice")
        if spec.local_port:
            seen.add(spec.local_port)
    return ports


async def run_port_forward(
    config: ClientConfig, specs: list[str], *, protocol: str, addresses: list[str], json_output: bool, reconnect: bool
) -> int:
    """Forward until interrupted (exit 0); 255 when the agent or router is gone (unless --reconnect)."""
    try:
        ports = parse_specs(specs)
        binds = parse_binds(addresses)
    except ValueError as err:
        say(str(err), "port-forward", tty=False)
        return EXIT_USAGE
    transport: Transport | None = None
    if config.legacy_backend:
        # An old backend's key is a control channel that announces every connection (client/legacy.py).
        from osmo_router.client.legacy import run_legacy_forward

        try:
            transport = await connect_transport(config)
            specs_ = [(p.local_port, p.remote_port) for p in ports]
            return await run_legacy_forward(config, transport, specs_, binds, protocol, Reporter(json_output))
        finally:
            if transport is not None:
                await transport.aclose()
    # Every connection is its own session: a single-use orchestrator key cannot serve them all.
    config = replace(config, session_key="")
    try:
        transport = await connect_transport(config)
        forward = PortForward(config, transport, Reporter(json_output), reconnect)
        return await forward.run(ports, binds, protocol)
    finally:
        if transport is not None:
            await transport.aclose()


class PortForward:
    """The listeners, the watch session and the reaction to losing the agent."""

    def __init__(self, config: ClientConfig, transport: Transport, reporter: Reporter, reconnect: bool) -> None:
        self.config = config
        self.reporter = reporter
        self.reconnect = reconnect
        self._transport = transport
        # Data frames skip protobuf both ways (framecodec); everything else is parsed as usual. Over
        # WebSocket (no channel) every session is a WebSocket of its own, and there is no ready to wait for.
        channel = getattr(transport, "channel", None)
        self._method = (
            fast_method(channel, f"/{CLIENT_SERVICE}/PortForward", pb.PortForwardResponse) if channel else None
        )
        self._stop = asyncio.Event()
        #: Why the forward must stop although its agent is there (a token that can no longer be renewed).
        self._fatal: RouterError | None = None
        # Names this command on all its streams: the router counts it as one session of the user.
        self._forward_id = secrets.token_hex(8)
        self._tcp: list[TcpListener] = []
        self._udp: list[UdpForward] = []
        self._tasks: dict[object, asyncio.Task[None]] = {}
        self._watched: list[int] = []  # the remote ports, checked by the agent on the watch

    def _init(self, protocol: int, remote_port: int, watched: Sequence[int] = ()) -> pb.PortForwardInit:
        return pb.PortForwardInit(
            target=self.config.target(),
            protocol=pb.Protocol.ValueType(protocol),
            remote_port=remote_port,
            forward_id=self._forward_id,
            watched_ports=watched,
        )

    async def _start(self, init: SessionInit) -> FrameStream:
        assert self._method is not None
        return await start_session(self.config, self._method, pb.PortForwardRequest, init, raw=True)

    async def open_stream(
        self, protocol: int, remote_port: int, notify: Notify = None, watched: Sequence[int] = ()
    ) -> SessionStream:
        """Open one PortForward session on the shared channel (resumable) and wait until the agent joined."""
        init = self._init(protocol, remote_port, watched)
        if self._method is None:
            return await self._transport.open(pb.OPERATION_PORT_FORWARD, init)
        op = pb.OPERATION_PORT_FORWARD
        return await open_resumable(self._transport, self.config, op, init, self._start, notify=notify)

    async def start_stream(self, protocol: int, remote_port: int) -> SessionStream:
        """Send a PortForward session's init without waiting for the agent (then `wait_ready`).

        Every forwarded connection is a resumable session of its own (client/resume_start.py): a
        break (router restarted, network cut) is repaired without the local application noticing.
        """
        if self._method is None:
            return await self.open_stream(protocol, remote_port)
        init = self._init(protocol, remote_port)
        return await start_resumable(self._transport, self.config, pb.OPERATION_PORT_FORWARD, init, self._start)

    async def wait_ready(self, stream: SessionStream) -> None:
        """Wait until the agent of a started session joined; raises RouterError on refusal."""
        await ready_resumable(self.config, stream)  # a WebSocket session has no ready to wait for

    async def run(self, ports: list[PortSpec], binds: list[Bind], protocol: str) -> int:
        """Check the agent, listen, announce, then serve until a signal or the agent's loss."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop.set)
        self._watched = sorted({spec.remote_port for spec in ports})
        try:
            watch = await self._first_watch()
            if watch is None:
                return 0 if self._stop.is_set() else EXIT_CONNECTION_ERROR
            try:
                await self._listen(ports, binds, protocol)
            except OSError as err:
                say(f"cannot listen: {err.strerror or err}", "port-forward", tty=False)
                await self._end_unused(watch)
                return EXIT_LOCAL_ERROR
            except RouterError as err:
                self.reporter.fatal(err, "cannot open the forward")
                await self._end_unused(watch)
                return EXIT_CONNECTION_ERROR
            return await self._supervise(watch)
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            await self._close_listeners()

    async def _listen(self, ports: list[PortSpec], binds: list[Bind], protocol: str) -> None:
        for spec in ports:

            async def listen(address: str, port: int, spec: PortSpec = spec) -> int:
                if protocol == "udp":
                    udp = UdpForward(spec.remote_port, self, self.reporter)
                    await udp.start(address, port)
                    self._udp.append(udp)
                    self._tasks[udp] = asyncio.create_task(udp.serve())
                    port = udp.address[1]
                else:
                    tcp = TcpListener(listen_tcp(address, port), spec.remote_port, self, self.reporter, self._refused)
                    self._tcp.append(tcp)
                    self._tasks[tcp] = asyncio.create_task(tcp.serve())
                    port = tcp.address[1]
                self.reporter.forwarding(protocol, address, port, spec.remote_port)
                return port

            await bind_all(binds, spec.local_port, listen)

    async def _end_unused(self, watch: SessionStream) -> None:
        """End the watch of a forward that could not start, as Ctrl-C does: cleanly (left to the
        transport's close, its resumable stream took the cut for a break and said it was resuming)."""
        await _end_watch(watch, asyncio.create_task(_watch_until_lost(watch, self.config)))

    async def _close_listeners(self) -> None:
        for udp in self._udp:
            await udp.close(self._tasks.pop(udp, None))
        for tcp in self._tcp:
            accept = self._tasks.pop(tcp, None)
            if accept is not None:
                accept.cancel()
                await asyncio.gather(accept, return_exceptions=True)
            await tcp.close()

    async def _first_watch(self) -> SessionStream | None:
        """The watch session; None (after saying why) if there is no agent and no --reconnect, or on a signal."""
        try:
            return await self._open_watch()
        except RouterError as err:
            if err.code in REFUSALS:  # the agent or the router says no: waiting would not change that
                self.reporter.fatal(err, "cannot forward")
                return None
            if not self.reconnect:
                if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a limit (the user's sessions): the agent is there
                    self.reporter.fatal(err, "cannot forward")
                else:
                    self.reporter.fatal(err, f"cannot reach an agent of workflow {self.config.workflow_id!r}")
                return None
            self.reporter.notice("waiting", f"waiting for an agent: {err.message} [{err.code.name}]")
        return await self._rewatch()

    async def _open_watch(self) -> SessionStream:
        # The watch resumes too: it is lost only when the agent is (grace passed, agent restarted).
        watch = await self.open_stream(pb.PROTOCOL_TCP, WATCH_PORT, notify=self._tell_resume, watched=self._watched)
        if not self.config.task and (chosen := getattr(watch, "chosen_task", "")):
            # Every connection goes to the agent the router chose for the watch, as kubectl keeps to the pod
            # it picked: the router's default may change meanwhile (agents re-register in any order).
            self.config = replace(self.config, task=chosen)
        return watch

    def _tell_resume(self, message: str) -> None:
        """One line when the forward lost its connection to the router, one when it resumed."""
        self.reporter.notice("resumed" if message == "session resumed" else "resuming", message)

    async def _rewatch(self) -> SessionStream | None:
        """Reopen the watch with exponential backoff and jitter until it works; None on a signal."""
        backoff = BACKOFF_INITIAL
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff * (0.5 + random.random() / 2)):
                    await self._stop.wait()
            if self._stop.is_set():
                break
            try:
                return await self._open_watch()
            except RouterError:
                backoff = min(backoff * 2, BACKOFF_MAX)
        return None

    def _refused(self, err: RouterError) -> None:
        """A forwarded connection failed: a token the router no longer takes ends the forward when it
        cannot change (no --token-file), rather than leave a port that resets every connection."""
        if err.code == grpc.StatusCode.UNAUTHENTICATED and not self.config.dial.token_file and self._fatal is None:
            self._fatal = err
            self._stop.set()

    async def _supervise(self, watch: SessionStream) -> int:
        stopper = asyncio.create_task(self._stop.wait())
        try:
            while True:
                lost = asyncio.create_task(_watch_until_lost(watch, self.config))
                await asyncio.wait({lost, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper.done():
                    await _end_watch(watch, lost)
                    if self._fatal is not None:
                        self.reporter.fatal(
                            self._fatal, "cannot forward any more (pass --token-file to renew the token)"
                        )
                        return EXIT_CONNECTION_ERROR
                    return 0
                err = lost.result()
                if err.code in REFUSALS:  # the agent checked the ports on the watch (watched_ports)
                    self.reporter.fatal(err, "cannot forward")
                    return EXIT_CONNECTION_ERROR
                if isinstance(err, DeadlineExceeded):
                    # The router expired the idle watch (--session-ttl): open a new one at once.
                    try:
                        watch = await self._open_watch()
                        continue
                    except RouterError as again:
                        err = again
                what = "reconnecting" if self.reconnect else "stopping"
                message = f"the agent or the router is gone ({err.message} [{err.code.name}]); {what}"
                self.reporter.notice("agent_lost", message)
                if not self.reconnect:
                    return EXIT_CONNECTION_ERROR
                replacement = await self._rewatch()
                if replacement is None:
                    return 0
                self.reporter.notice("agent_back", "the agent is back; forwarding again")
                watch = replacement
        finally:
            stopper.cancel()


async def _watch_until_lost(watch: SessionStream, config: ClientConfig) -> RouterError:
    """Wait for the watch to end and say why."""
    try:
        while (frame := await watch.recv()) is not None:
            if frame.WhichOneof("kind") == "error":  # a resumable watch that could not resume says why
                return from_status_number(frame.error.code, frame.error.message)
    except grpc.aio.AioRpcError as err:
        return await rpc_failure(err, config.dial)
    except RouterError as err:
        return err
    return Unavailable("the agent ended the forward")


async def _end_watch(watch: SessionStream, lost: asyncio.Task[RouterError]) -> None:
    """Half-close the watch and let the agent end it (bounded): a clean end, not a cancelled RPC.

    A watch waiting to resume (the router is unreachable) is aborted at once: nobody is there to
    take the half-close, and Ctrl-C must not wait out the grace for it.
    """
    if not getattr(watch, "connected", True):
        watch.abort()
        lost.cancel()
        await asyncio.gather(lost, return_exceptions=True)
        return
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
        async with asyncio.timeout(CLOSE_GRACE):
            await watch.send(half_close_frame())
            await watch.close()
            await asyncio.wait({lost})
    if not lost.done():
        lost.cancel()
    await asyncio.gather(lost, return_exceptions=True)


__all__ = ["PortForward", "PortSpec", "parse_spec", "parse_specs", "run_port_forward"]
