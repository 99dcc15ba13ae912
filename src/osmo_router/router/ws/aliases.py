"""`--ws-workflow-aliases FILE`: the workflow a WebSocket client's URL names, resolved to its ID.

OSMO's CLI puts the workflow in its URLs as the user typed it (its ID or its UUID), osmo-ctrl its
ID (docs/migration.md 1.3); the old router ignored both, this one scopes session keys by workflow.
The file is a JSON object `{"typed": "workflow id", ...}` that the orchestrator (OSMO's service, or
whatever knows both spellings) keeps up to date; it is read again whenever its modification time
or size changes. Only the WebSocket client endpoint resolves through it: the session then lives in
the resolved workflow's key space, and the client's token must reach the resolved workflow, as if
the URL had named it. gRPC clients and every backend are untouched.

A missing, unreadable or malformed file keeps the last good map (and says so in the log, once per
change); names not in the map are used as they are.
"""

from __future__ import annotations

import json
import logging
import os

from osmo_router.router.core.sessions import check_id
from osmo_router.wire.errors import InvalidArgument

log = logging.getLogger(__name__)

#: Largest alias file read (bytes): a bound on the memory and the parse time of one reload.
MAX_ALIAS_FILE = 16 * 1024 * 1024


class WorkflowAliases:
    """The alias map of `--ws-workflow-aliases` (empty, and never read, without a path)."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._aliases: dict[str, str] = {}

    def resolve(self, workflow: str) -> str:
        """The workflow ID `workflow` stands for (itself when the map does not name it)."""
        if not self._path:
            return workflow
        self._reload(self._path)
        return self._aliases.get(workflow, workflow)

    def _reload(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError as err:
            if self._stamp != (-1, -1):
                self._stamp = (-1, -1)
                log.warning("workflow alias file %s: %s (keeping %d aliases)", path, err, len(self._aliases))
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            if st.st_size > MAX_ALIAS_FILE:
                raise ValueError(f"larger than {MAX_ALIAS_FILE} bytes")
            with open(path, "rb") as f:
                self._aliases = parse_aliases(f.read())
        except (OSError, ValueError, InvalidArgument) as err:
            log.warning("workflow alias file %s not used: %s (keeping %d aliases)", path, err, len(self._aliases))


def parse_aliases(data: bytes) -> dict[str, str]:
    """The alias map of a file's bytes: a JSON object of workflow names to workflow IDs (ValueError otherwise)."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    for typed, workflow_id in value.items():
        if not isinstance(workflow_id, str):
            raise ValueError(f"the alias {typed!r} does not name a workflow id")
        check_id("workflow_id", typed, required=True)
        check_id("workflow_id", workflow_id, required=True)
    return dict(value)
