"""Rsync sessions in daemon mode: OSMO's old rsync client speaks rsync's daemon protocol (module `osmo`).

A session an orchestrator created with an rsync module and path (RouterControlService) reaches the
agent as RsyncInit.daemon: the agent runs `rsync --config=FILE --server --daemon .` (rsync's daemon
over a remote shell, the session being the shell) with a generated configuration that serves that
one module, and carries its stdin and stdout like any rsync session. With --rsync-root the module's
path must lie inside a root, as every path of an `rsync --server` session must.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from osmo_router.wire.errors import PermissionDenied
from osmo_router.wire.protocol import pb

#: Characters a module name may not hold (they would end or open a section of the configuration).
FORBIDDEN_IN_MODULE = frozenset("[]\n\r\0")


def check_daemon(daemon: pb.RsyncDaemon, roots: tuple[str, ...]) -> str:
    """The module's real path, once the module is acceptable; PermissionDenied with the reason otherwise."""
    if not daemon.module or FORBIDDEN_IN_MODULE & set(daemon.module) or daemon.module.strip() != daemon.module:
        raise PermissionDenied(f"rsync module name {daemon.module!r} is not acceptable")
    if not os.path.isabs(daemon.path) or any(ord(ch) < 0x20 for ch in daemon.path):
        raise PermissionDenied(f"rsync module path {daemon.path!r} must be an absolute path")
    path = os.path.realpath(daemon.path)
    if roots:
        real_roots = [os.path.realpath(root) for root in roots]
        if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in real_roots):
            raise PermissionDenied(f"rsync module path {daemon.path!r} is outside the allowed rsync roots")
    return path


def daemon_config(daemon: pb.RsyncDaemon, path: str) -> str:
    """The rsyncd.conf text serving one module as this process's user (no chroot, nothing logged)."""
    return (
        f"uid = {os.getuid()}\ngid = {os.getgid()}\nuse chroot = false\nlog file = /dev/null\n"
        f"[{daemon.module}]\n    path = {path}\n    read only = {'false' if daemon.writable else 'true'}\n"
    )


@contextlib.contextmanager
def daemon_argv(binary: str, daemon: pb.RsyncDaemon, path: str):  # type: ignore[no-untyped-def]
    """The argv of the daemon, its configuration written to a private file removed afterwards."""
    folder = tempfile.mkdtemp(prefix="osmo-rsyncd-")
    try:
        config = os.path.join(folder, "rsyncd.conf")
        with open(config, "w", encoding="utf-8") as f:
            f.write(daemon_config(daemon, path))
        yield [binary, f"--config={config}", "--server", "--daemon", "."]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
