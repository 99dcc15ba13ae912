"""Every flag a user can see in --help says what it does."""

from __future__ import annotations

import click

from osmo_router.cli.main import main_group as router_group
from osmo_router.client.cli import main_group as client_group


def _silent_options(group: click.Group, prefix: str) -> list[str]:
    found: list[str] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _silent_options(command, f"{prefix} {name}")
        elif not command.hidden:
            found += [
                f"{prefix} {name} {option.opts[0]}"
                for option in command.params
                if isinstance(option, click.Option) and not option.hidden and not option.help
            ]
    return found


def test_every_visible_option_has_help_text() -> None:
    assert _silent_options(client_group, "osmo-net-client") + _silent_options(router_group, "osmo-router") == []
