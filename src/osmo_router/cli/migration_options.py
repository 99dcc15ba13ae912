"""The `osmo-router serve` flags of the migration: OSMO's backends and workflow names on the WebSocket port."""

from __future__ import annotations

from typing import Any

import click

from osmo_router.cli.options import DURATION


def migration_options(f: Any) -> Any:
    """OSMO backend tokens, workflow aliases and created sessions (docs/migration.md, docs/security.md)."""
    options = [
        click.option(
            "--ws-backend-role",
            default="",
            help="Role value (in the token's `roles` list or `role`) of OSMO backends' workflow tokens: such a "
            "token may serve the workflow its --ws-backend-workflow-claim names, on the WebSocket backend "
            "endpoint only (docs/security.md). Empty: none is accepted.",
        ),
        click.option(
            "--ws-backend-workflow-claim",
            default="osmo_workflow_id",
            show_default=True,
            help="Claim of an OSMO backend token that names its workflow.",
        ),
        click.option("--ws-backend-issuer", default=None, help="When set, OSMO backend tokens must have this `iss`."),
        click.option(
            "--ws-workflow-aliases",
            default=None,
            help='JSON file {"name or UUID": "workflow id"} the orchestrator keeps: a WebSocket client\'s URL '
            "workflow is resolved through it (re-read when it changes), so OSMO's CLI meets osmo-ctrl, which "
            "dials with the ID. The client's token must reach the resolved workflow.",
        ),
        click.option(
            "--created-session-ttl",
            type=DURATION,
            default="10m",
            show_default=True,
            help="How long a session an orchestrator created (RouterControlService.CreateSession) lives unused; "
            "each use starts it again. A session's own ttl_seconds wins.",
        ),
        click.option(
            "--max-created-sessions",
            type=int,
            default=10_000,
            show_default=True,
            help="Most created sessions held at once (each service: --max-created-per-service).",
        ),
        click.option(
            "--max-created-per-service",
            type=int,
            default=1000,
            show_default=True,
            help="Most created sessions one service identity (token subject) holds at once.",
        ),
        click.option(
            "--max-created-bytes",
            type=int,
            default=64 * 1024 * 1024,
            show_default=True,
            help="Most bytes created sessions (and their announced connection keys) hold at once.",
        ),
        click.option(
            "--max-created-bytes-per-service",
            type=int,
            default=4 * 1024 * 1024,
            show_default=True,
            help="Most bytes one service identity's created sessions hold at once.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f
