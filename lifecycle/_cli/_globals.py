"""The global options (``--backend``, ``--log-format``, ``--log-level``), accepted before
the command and after it, and the settings they make (logging configured), shared by
every command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ._logs import LEVELS, configure

BACKENDS = ["asyncio", "trio"]


def global_params() -> list[click.Option]:
    """Fresh option objects (click keeps state on them, so each command needs its own)."""
    return [
        click.Option(["--backend"], type=click.Choice(BACKENDS), default=None, help="Event loop (default: asyncio)."),
        click.Option(
            ["--log-format"],
            type=click.Choice(["console", "json"]),
            default=None,
            help="Default: console on a terminal, JSON lines otherwise.",
        ),
        click.Option(["--log-level"], type=click.Choice(LEVELS, case_sensitive=False), default=None),
    ]


def with_globals(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with the global options."""
    for param in reversed(global_params()):
        fn = click.option(*param.opts, type=param.type, default=None, help=param.help)(fn)
    return fn


def settings(ctx: click.Context, **given: Any) -> dict[str, Any]:
    """Global options may come before or after the command; the later one wins.
    Configures logging and returns the settings (``backend``, ``log_level``,
    ``log_format``)."""
    chosen = dict(ctx.find_root().meta.get("lifecycle.settings", {}))
    chosen.update({key: value for key, value in given.items() if value is not None})
    chosen.setdefault("backend", "asyncio")
    chosen.setdefault("log_level", "info")
    chosen["log_format"] = configure(chosen.get("log_format"), chosen["log_level"])
    return chosen
