"""The agent's one-module rsync daemon for created sessions (agent/rsync_daemon.py): what it accepts and runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from osmo_router.agent.rsync_daemon import check_daemon, daemon_argv, daemon_config
from osmo_router.wire.errors import PermissionDenied
from osmo_router.wire.protocol import pb


def test_module_inside_the_roots_is_accepted_by_its_real_path(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    daemon = pb.RsyncDaemon(module="osmo", path=str(tmp_path / "link"), writable=True)
    assert check_daemon(daemon, (str(tmp_path),)) == os.path.realpath(tmp_path / "data")


@pytest.mark.parametrize(
    ("module", "path", "reason"),
    [
        ("os]mo", "/tmp", "module name"),
        ("osmo\n[evil]", "/tmp", "module name"),
        (" osmo", "/tmp", "module name"),
        ("osmo", "relative", "absolute"),
        ("osmo", "/etc", "outside the allowed rsync roots"),
    ],
)
def test_refusals(tmp_path: Path, module: str, path: str, reason: str) -> None:
    with pytest.raises(PermissionDenied, match=reason):
        check_daemon(pb.RsyncDaemon(module=module, path=path), (str(tmp_path),))


def test_read_only_unless_writable_and_the_config_is_removed_afterwards(tmp_path: Path) -> None:
    read_only = daemon_config(pb.RsyncDaemon(module="osmo", path=str(tmp_path)), str(tmp_path))
    assert "[osmo]" in read_only and "read only = true" in read_only and "use chroot = false" in read_only
    with daemon_argv("rsync", pb.RsyncDaemon(module="osmo", writable=True), str(tmp_path)) as argv:
        config = argv[1].removeprefix("--config=")
        assert argv[2:] == ["--server", "--daemon", "."]
        assert "read only = false" in Path(config).read_text()
    assert not Path(config).exists()


def test_rsync_lists_the_one_module_over_stdio(tmp_path: Path) -> None:
    """The generated configuration is one rsync's daemon accepts: a module listing through it names `osmo`."""
    with daemon_argv("rsync", pb.RsyncDaemon(module="osmo", path=str(tmp_path)), str(tmp_path)) as argv:
        shell = f"sh -c 'shift; exec {' '.join(argv)}' x"
        result = subprocess.run(["rsync", "-e", shell, "x::"], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [b"osmo"]
