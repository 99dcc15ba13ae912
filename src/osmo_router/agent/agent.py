"""The agent's lifecycle: dial the router, register, serve session requests, reconnect with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from dataclasses import replace

import grpc

from osmo_router import __version__
from osmo_router.agent.config import AgentConfig
from osmo_router.agent.forward import forward_refusal
from osmo_router.agent.forward import refuse as refuse_forward
from osmo_router.agent.handlers import OPEN_TOTAL_BYTES, OPEN_USER_BYTES, SessionHandler, default_handlers, refuse
from osmo_router.agent.held_sessions import REPORT_DELAY, REPORT_EVERY, HeldSessions
from osmo_router.dial.channel import open_channel
from osmo_router.dial.errors import explain_connection_error
from osmo_router.io import memtune
from osmo_router.io.byte_shares import ByteShares
from osmo_router.resume.stream import SessionLost
from osmo_router.transport import SessionStream
from osmo_router.wire.codec import fast_method
from osmo_router.wire.errors import RouterError
from osmo_router.wire.ops import BY_OPEN_FIELD
from osmo_router.wire.protocol import AGENT_SERVICE, pb, pb_grpc
from osmo_router.wire.streams import FrameStream

log = logging.getLogger(__name__)

#: Longest wait between two registration attempts while sessions are held for a resume (agent/held.py).
HELD_BACKOFF_MAX = 1.0


class Agent:
    """One agent process serving one workflow (and optionally one task)."""

    def __init__(self, config: AgentConfig, handlers: dict[str, SessionHandler] | None = None) -> None:
        if not config.agent_id:
            config = replace(config, agent_id=secrets.token_hex(8))
        self.config = config
        self.handlers = handlers or default_handlers()
        self.registered = asyncio.Event()
        self._sessions: set[asyncio.Task[None]] = set()
        #: Channels of earlier attempts, closed once no session runs (`_retire_channel`), and their closes.
        self._retired: list[grpc.aio.Channel] = []
        self._closing_channels: set[asyncio.Future[None]] = set()
        self._standby: set[asyncio.Task[None]] = set()
        self._channel: grpc.aio.Channel | None = None
        self._closing = False
        #: The opening messages of the sessions being served, per user and in all (OPEN_USER_BYTES).
        self.opens = ByteShares(OPEN_TOTAL_BYTES, OPEN_USER_BYTES)
        self.held = HeldSessions(
            grace=config.resume_grace,
            replay_bytes=config.replay_buffer_bytes,
            total_bytes=config.replay_total_bytes,
        )
        self._held_changed = asyncio.Event()
        self.held.on_change = self._held_changed.set

    async def run(self) -> None:
        """Register and serve forever, reconnecting with exponential backoff and jitter.

        `--router-address` may list several routers (comma-separated): each attempt dials the next.
        """
        backoff = self.config.backoff_initial
        addresses = [a.strip() for a in self.config.dial.address.split(",") if a.strip()]
        attempt = 0
        while not self._closing:
            address = addresses[attempt % len(addresses)] if addresses else self.config.dial.address
            attempt += 1
            self._retire_channel()
            self._channel = open_channel(replace(self.config.dial, address=address))
            delay = backoff * (0.5 + random.random() / 2)
            try:
                await self._register_and_serve(self._channel)
                backoff = self.config.backoff_initial
            except grpc.aio.AioRpcError as err:
                if self.registered.is_set():
                    backoff = self.config.backoff_initial
                    delay = backoff * (0.5 + random.random() / 2)
                details = err.details() or ""
                explained = await explain_connection_error(details, self.config.dial, address)
                self._log_retry(address, f"{err.code().name}: {explained or details}", delay)
            except RouterError as err:
                self._log_retry(address, err.message, delay)
            finally:
                self.registered.clear()
            if self._closing:
                break
            await asyncio.sleep(delay)
            # Sessions held for their clients' resume need this agent registered again soon.
            backoff = min(backoff * 2, self.config.backoff_max if not len(self.held) else HELD_BACKOFF_MAX)

    def _retire_channel(self) -> None:
        """Put the last attempt's channel aside (see `_close_retired`)."""
        if self._channel is not None:
            self._retired.append(self._channel)
            self._channel = None
        self._close_retired()

    def _close_retired(self) -> None:
        """Close the channels of earlier attempts once no session runs.

        Each attempt dials a fresh channel (a grpcio channel's own reconnect backoff would delay the
        next one); the last one was left open, so an agent whose registration kept failing (a revoked
        token) held one more connection to the router per retry. A session in flight may still run on
        an older channel (its stream is cancelled with it): those close when the sessions are over.
        """
        if self._sessions or not self._retired:
            return
        retired, self._retired = self._retired, []
        for channel in retired:
            task = asyncio.ensure_future(channel.close(grace=None))
            self._closing_channels.add(task)
            task.add_done_callback(self._closing_channels.discard)

    def _log_retry(self, address: str, cause: str, delay: float) -> None:
        """One line per failed attempt: a registration refused or never made reads differently from a lost one."""
        if self.registered.is_set():
            message, event = "router connection lost: %s; retrying in %.1fs", "connection lost"
        else:
            message, event = "cannot register with the router: %s; retrying in %.1fs", "register failed"
        log.warning(message, cause, delay, extra={"fields": {"event": event, "router_address": address}})

    async def close(self) -> None:
        """Stop reconnecting, tell the clients of sessions in flight, end them, close the channel."""
        self._closing = True
        await self.held.end_all()
        # Unused standby streams are cancelled with their tasks: nothing was sent on them.
        for task in [*self._standby, *self._sessions]:
            task.cancel()
        await asyncio.gather(*self._standby, *self._sessions, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        for channel in self._retired:
            await channel.close(grace=None)
        await asyncio.gather(*self._closing_channels, return_exceptions=True)

    async def _register_and_serve(self, channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.RouterAgentServiceStub(channel)
        call = stub.Register(metadata=self.config.dial.metadata())
        await call.write(
            pb.RegisterRequest(
                hello=pb.AgentHello(
                    workflow_id=self.config.workflow_id,
                    task=self.config.task,
                    agent_id=self.config.agent_id,
                    operations=[pb.Operation.ValueType(BY_OPEN_FIELD[name].value) for name in self.handlers],
                    version=__version__,
                    resumes=True,  # agent/held_sessions.py: a resume it does not hold is refused, never run
                )
            )
        )
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "registered":
            raise RouterError("the router did not confirm the registration")
        interval = first.registered.heartbeat_seconds or self.config.heartbeat_interval
        log.info(
            "registered with router %s for workflow %s%s",
            first.registered.router_id,
            self.config.workflow_id,
            f" task {self.config.task}" if self.config.task else "",
            extra={"fields": {"event": "registered", "router_id": first.registered.router_id}},
        )
        self.registered.set()
        writes = asyncio.Lock()  # heartbeats and held-session reports share the stream
        heartbeat = asyncio.create_task(_send_heartbeats(call, interval, writes))
        reports = asyncio.create_task(self._report_held(call, writes))
        # Ended with the registration; the slots' parked streams are ended by the router then.
        registration_over = asyncio.Event()
        for _ in range(self.config.standby_streams):
            slot = asyncio.create_task(self._standby_slot(channel, registration_over))
            self._standby.add(slot)
            slot.add_done_callback(self._standby.discard)
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("kind") == "session_request":
                    self._start_session(channel, message.session_request.session_key)
        finally:
            registration_over.set()
            for task in (heartbeat, reports):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _start_session(self, channel: grpc.aio.Channel, session_key: str) -> None:
        task = asyncio.create_task(self._serve_session(channel, session_key))
        self._sessions.add(task)
        task.add_done_callback(self._session_ended)

    async def _serve_session(self, channel: grpc.aio.Channel, session_key: str) -> None:
        """Open the Connect stream of a requested session and serve it."""
        call = self._connect(channel)
        try:
            await call.write(self._connect_init(session_key=session_key))
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "open":
                return
            await self._serve_opened(call, first.open)
        except Exception as err:
            _log_session_end(session_key, err)
        finally:
            call.cancel()

    async def _standby_slot(self, channel: grpc.aio.Channel, registration_over: asyncio.Event) -> None:
        """Keep one standby Connect stream parked on the router for as long as the registration lasts.

        When the router opens a session on it, the session is served by a task of its own and a
        replacement is opened at once. A stream refused or ended unused is reopened after a backoff.
        """
        backoff = self.config.backoff_initial
        while not registration_over.is_set() and not self._closing:
            outcome = await self._standby_once(channel)
            if outcome == "used":
                backoff = self.config.backoff_initial
                continue
            if outcome == "unsupported" or registration_over.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff * (0.5 + random.random() / 2)):
                    await registration_over.wait()
            backoff = min(backoff * 2, self.config.backoff_max)

    async def _standby_once(self, channel: grpc.aio.Channel) -> str:
        """Park one standby stream and wait: "used" (a session started on it), "ended" or "unsupported"."""
        call = self._connect(channel)
        try:
            await call.write(self._connect_init(standby=True))
            first = await call.read()
        except grpc.aio.AioRpcError as err:
            log.debug("standby stream ended: %s %s", err.code().name, err.details())
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # A router from before standby streams asks for a session key: request-only then.
                log.info("the router does not park standby streams: %s", err.details())
                return "unsupported"
            return "ended"
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            call.cancel()
            return "ended"
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "open":
            call.cancel()
            return "ended"
        task = asyncio.create_task(self._serve_standby_session(call, first.open))
        self._sessions.add(task)
        task.add_done_callback(self._session_ended)
        return "used"

    async def _serve_standby_session(self, call: grpc.aio.StreamStreamCall, open_msg: pb.SessionOpen) -> None:
        key = open_msg.session_key
        log.debug("session %s on a standby stream", key[:8], extra={"fields": {"event": "standby session"}})
        try:
            await self._serve_opened(call, open_msg)
        except Exception as err:
            _log_session_end(key, err)
        finally:
            call.cancel()

    async def _serve_new(self, stream: FrameStream, open_msg: pb.SessionOpen) -> None:
        """A new session: its handler, on a resumable stream when the client asked for one."""
        if not self.held.begin(open_msg.session_key):
            # Its client resumed before the session got here and was told it never would: keep that true.
            await refuse(stream, grpc.StatusCode.CANCELLED, "the client gave the session up before it started")
            return
        handler = self.handlers.get(open_msg.WhichOneof("init") or "")
        if handler is None:
            await refuse(
                stream, grpc.StatusCode.UNIMPLEMENTED, f"this agent does not serve {open_msg.WhichOneof('init')}"
            )
            return
        size = open_msg.ByteSize()
        if not self.opens.take(open_msg.user, size):
            await refuse(
                stream,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the sessions of {open_msg.user or 'anonymous'} on this agent keep their maximum of"
                f" {self.opens.per_owner} bytes of opening messages; this one has {size}",
            )
            return
        try:
            await self._serve_handler(stream, open_msg, handler)
        finally:
            self.opens.give(open_msg.user, size)

    async def _serve_handler(self, stream: FrameStream, open_msg: pb.SessionOpen, handler: SessionHandler) -> None:
        """Run the session's handler, held for a resume when the client asked for one."""
        session: SessionStream = stream
        forward = open_msg.port_forward if open_msg.WhichOneof("init") == "port_forward" else None
        if forward is not None and (refusal := forward_refusal(forward, self.config)) is not None:
            await refuse_forward(stream, *refusal)  # before it is held: a refused session never says it resumes
            return
        if self.held.wants(open_msg):
            try:
                session = await self.held.start(stream, open_msg)
            except SessionLost as lost:
                await refuse(stream, lost.code, lost.message)
                return
        try:
            await handler(session, open_msg, self.config)
        except BaseException:
            self.held.forget(session)
            raise
        await self.held.finish(session)

    async def _report_held(self, call: grpc.aio.StreamStreamCall, writes: asyncio.Lock) -> None:
        """Send the held sessions on the Register stream: at once (a new router knows none), then on change.

        A change after a quiet spell goes at once (`exec --detach` then `sessions` finds the session);
        then at most one message per REPORT_DELAY, so a burst of attaches and detaches is a few
        messages. While any session is held the list goes again every REPORT_EVERY s (its
        replay-buffer bytes); the list is bounded (MAX_HELD entries, see HeldSessions.report).
        """
        if not len(self.held) and not self._held_changed.is_set():
            await self._held_changed.wait()
        while True:
            self._held_changed.clear()
            async with writes:
                await call.write(pb.RegisterRequest(held=self.held.report()))
            await asyncio.sleep(REPORT_DELAY)  # the changes meanwhile go together in the next message
            if self._held_changed.is_set():
                continue
            if len(self.held):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REPORT_EVERY):
                        await self._held_changed.wait()
            else:
                await self._held_changed.wait()

    def _session_ended(self, task: asyncio.Task[None]) -> None:
        """Forget a finished session; once the agent is quiet, give the memory of its buffers back (memtune)."""
        self._sessions.discard(task)
        if not self._closing:
            self._close_retired()
        memtune.trim_when_idle()

    def _connect(self, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
        # Data frames skip protobuf both ways (framecodec); everything else is parsed as usual.
        connect = fast_method(channel, f"/{AGENT_SERVICE}/Connect", pb.ConnectResponse)
        call: grpc.aio.StreamStreamCall = connect(metadata=self.config.dial.metadata())
        return call

    def _connect_init(self, *, session_key: str = "", standby: bool = False) -> pb.ConnectRequest:
        return pb.ConnectRequest(
            init=pb.ConnectInit(
                session_key=session_key,
                agent_id=self.config.agent_id,
                workflow_id=self.config.workflow_id,
                task=self.config.task,
                standby=standby,
            )
        )

    async def _serve_opened(self, call: grpc.aio.StreamStreamCall, open_msg: pb.SessionOpen) -> None:
        """Serve a session whose SessionOpen arrived, with the handler for its operation."""
        stream = FrameStream(call, lambda frame: pb.ConnectRequest(frame=frame), raw=True)
        if self.held.is_resume(open_msg):
            await self.held.attach(stream, open_msg)
        else:
            await self._serve_new(stream, open_msg)
        # Let the router take our last frames before the call is torn down.
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            async with asyncio.timeout(10):
                await call.code()


def _log_session_end(session_key: str, err: Exception) -> None:
    """Log how a session ended with an error."""
    if isinstance(err, grpc.aio.AioRpcError):
        log.info("session %s ended: %s %s", session_key[:8], err.code().name, err.details())
    elif isinstance(err, RouterError):
        log.info("session %s ended: %s", session_key[:8], err.message)
    else:
        log.error("session %s failed", session_key[:8], exc_info=err)


async def _send_heartbeats(call: grpc.aio.StreamStreamCall, interval: float, writes: asyncio.Lock) -> None:
    while True:
        await asyncio.sleep(interval)
        async with writes:
            await call.write(pb.RegisterRequest(heartbeat=pb.Heartbeat()))
