"""Rsync sessions: run `rsync --server ...` in the container, its stdin/stdout carried by the session.

The client's local rsync uses `osmo-net-client rsync-shell` as its remote shell; what that shell
was asked to run arrives here as RsyncInit.server_args. It is checked (rsync_args) and then the
configured rsync binary is exec'd directly with those arguments, with pipes: stdin from the data
frames, stdout as data frames, stderr as stderr frames, then the exit status and a half-close.
"""

from __future__ import annotations

import logging
import shutil

import grpc

from osmo_router.agent.config import AgentConfig
from osmo_router.agent.exec import run_piped
from osmo_router.agent.rsync_args import check_server_args, server_cwd
from osmo_router.agent.rsync_daemon import check_daemon, daemon_argv
from osmo_router.cli.logs import cut
from osmo_router.transport import SessionStream
from osmo_router.wire.codec import BULK_PAYLOAD
from osmo_router.wire.errors import PermissionDenied
from osmo_router.wire.protocol import BULK_CHUNK_SIZE, pb

log = logging.getLogger(__name__)
#: Longest user name a refusal's log line shows (a token's subject, as the router passed it).
USER_SHOWN = 256

#: Pipe size and largest read for rsync's bulk data: large frames keep the per-message cost small.
BULK_CHUNK = BULK_CHUNK_SIZE
#: How long streaming output may wait to fill a frame (downloads).
LINGER = 0.001
INSTALL_HINT = (
    "install it in the container image (apt-get install rsync, apk add rsync or dnf install rsync) "
    "or point the agent at it with --rsync-binary"
)


async def serve_rsync(stream: SessionStream, open_msg: pb.SessionOpen, config: AgentConfig) -> None:
    """Serve one rsync session to its end; refusals and a missing rsync are reported as Error frames."""
    if open_msg.rsync.HasField("daemon"):
        await _serve_daemon(stream, open_msg, config)
        return
    cwd = server_cwd(config.workdir, config.rsync_roots)
    try:
        command = check_server_args(list(open_msg.rsync.server_args), config.rsync_roots, cwd)
    except PermissionDenied as err:
        # The reason quotes the client's arguments (up to --max-message-size): cut, as the audit's are.
        user = cut(open_msg.user, USER_SHOWN)
        log.warning(
            "rsync refused for %s: %s",
            user or "anonymous",
            cut(err.message),
            extra={"fields": {"event": "rsync_refused", "user": user}},
        )
        await _refuse(stream, grpc.StatusCode.PERMISSION_DENIED, err.message)
        return
    binary = shutil.which(config.rsync_binary)
    if binary is None:
        await _refuse(
            stream,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"rsync is missing in the container ({config.rsync_binary!r} not found): {INSTALL_HINT}",
        )
        return
    log.info(
        "rsync %s %s for %s",
        "sending" if command.sender else "receiving",
        " ".join(command.paths),
        open_msg.user or "anonymous",
        extra={"fields": {"event": "rsync_start", "sender": command.sender, "paths": command.paths}},
    )
    try:
        await run_piped(
            stream, [binary, *command.args], None, cwd, chunk_size=BULK_PAYLOAD, pipe_size=BULK_CHUNK, linger=LINGER
        )
    except OSError as err:
        await _refuse(stream, grpc.StatusCode.FAILED_PRECONDITION, f"cannot run rsync in the container: {err}")


async def _serve_daemon(stream: SessionStream, open_msg: pb.SessionOpen, config: AgentConfig) -> None:
    """The daemon protocol for the one module of RsyncInit.daemon (agent/rsync_daemon.py)."""
    daemon = open_msg.rsync.daemon
    try:
        path = check_daemon(daemon, config.rsync_roots)
    except PermissionDenied as err:
        log.warning("rsync daemon refused for %s: %s", open_msg.user or "anonymous", err.message)
        await _refuse(stream, grpc.StatusCode.PERMISSION_DENIED, err.message)
        return
    binary = shutil.which(config.rsync_binary)
    if binary is None:
        message = f"rsync is missing in the container ({config.rsync_binary!r} not found): {INSTALL_HINT}"
        await _refuse(stream, grpc.StatusCode.FAILED_PRECONDITION, message)
        return
    log.info("rsync daemon, module %s at %s, for %s", daemon.module, path, open_msg.user or "anonymous")
    with daemon_argv(binary, daemon, path) as argv:
        try:
            await run_piped(stream, argv, None, path, chunk_size=BULK_PAYLOAD, pipe_size=BULK_CHUNK, linger=LINGER)
        except OSError as err:
            await _refuse(stream, grpc.StatusCode.FAILED_PRECONDITION, f"cannot run rsync in the container: {err}")


async def _refuse(stream: SessionStream, code: grpc.StatusCode, message: str) -> None:
    """Report an error, then end our direction properly (a half-close before the end)."""
    await stream.send_error(code, message)
    await stream.send(pb.Frame(half_close=pb.HalfClose()))
    await stream.close()


__all__ = ["INSTALL_HINT", "serve_rsync"]
