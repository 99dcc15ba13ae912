"""--ws-workflow-aliases (router/ws/aliases.py): parsing, reloading, keeping the last good map."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from osmo_router.router.ws.aliases import WorkflowAliases, parse_aliases
from osmo_router.wire.errors import InvalidArgument


def write(path: Path, text: str, stamp: int) -> None:
    """Write the file with a distinct modification time (the reload key), whatever the clock's resolution."""
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))


def test_without_a_file_names_are_their_own() -> None:
    assert WorkflowAliases(None).resolve("my-wf") == "my-wf"


def test_resolves_and_rereads_on_change_keeping_the_last_good_map(tmp_path: Path) -> None:
    path = tmp_path / "aliases.json"
    aliases = WorkflowAliases(str(path))
    assert aliases.resolve("uuid-1") == "uuid-1"  # no file yet
    write(path, json.dumps({"uuid-1": "wf-1"}), 1_000_000_000)
    assert (aliases.resolve("uuid-1"), aliases.resolve("wf-1"), aliases.resolve("x")) == ("wf-1", "wf-1", "x")
    write(path, json.dumps({"uuid-1": "wf-2"}), 2_000_000_000)
    assert aliases.resolve("uuid-1") == "wf-2"
    write(path, "{not json", 3_000_000_000)
    assert aliases.resolve("uuid-1") == "wf-2"  # a malformed file keeps the last good map
    path.unlink()
    assert aliases.resolve("uuid-1") == "wf-2"  # so does a missing one
    write(path, json.dumps({"uuid-1": "wf-3"}), 4_000_000_000)
    assert aliases.resolve("uuid-1") == "wf-3"


@pytest.mark.parametrize(
    "text", ['["wf-1"]', '{"a": 1}', '{"a": ""}', '{"": "wf-1"}', '{"a": "wf\\u0000x"}', '{"a": "' + "w" * 300 + '"}']
)
def test_malformed_maps_are_refused(text: str) -> None:
    with pytest.raises((ValueError, InvalidArgument)):
        parse_aliases(text.encode())
