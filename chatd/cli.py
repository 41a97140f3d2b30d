"""``chatd``: the daemon's command line. ``chatd serve --help`` lists every setting."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import click
import trio

from chatd import __version__
from chatd.config import SETTINGS, ConfigError, load, require_shared_secrets


def config_options(names: Collection[str] | None = None) -> Callable[[Any], Any]:
    """Click options for the settings that are flags (only ``names``, if given),
    with their defaults and environment names in the help. chatctl uses it too."""

    def decorate(fn: Any) -> Any:
        return _add_options(fn, names)

    return decorate


def _add_options(fn: Any, names: Collection[str] | None) -> Any:
    for setting in reversed(SETTINGS):
        if not setting.flag or (names is not None and setting.name not in names):
            continue
        param_type: Any = {int: int, float: float, Path: click.Path(path_type=Path)}.get(
            setting.type, str
        )
        default = "" if setting.default in (None, "") else f" [default: {setting.default}]"
        fn = click.option(
            "--" + setting.name.replace("_", "-"),
            setting.name,
            type=param_type,
            default=None,
            help=f"{setting.help}{default} (env: {', '.join(setting.env)})",
        )(fn)
    return fn


_ENV_ONLY = "\n".join(f"  {', '.join(s.env)}: {s.help}" for s in SETTINGS if not s.flag)


@click.group()
@click.version_option(__version__, prog_name="chatd")
def main() -> None:
    """chatd: a real-time chat engine."""


@main.command(
    epilog="\b\nSecrets are read from the environment only:\n" + _ENV_ONLY,
)
@config_options()
def serve(**flags: Any) -> None:
    """Run the chat daemon: HTTP API (and web client) plus the WebSocket endpoint."""
    try:
        config = load(os.environ, flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        require_shared_secrets(config)
    except ConfigError as exc:
        click.echo(f"chatd: {exc}", err=True)
        sys.exit(2)

    from chatd import logs
    from chatd.crypto import KeyringError
    from chatd.server import serve as run_server

    logs.setup(config.node, config.log_level, config.log_format)
    try:
        trio.run(run_server, config)
    except (ConfigError, KeyringError) as exc:
        click.echo(f"chatd: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"chatd: cannot start: {exc}", err=True)
        sys.exit(1)


@main.command("config")
def show_config() -> None:
    """Print the configuration table (flags, environment, defaults)."""
    from chatd.config import settings_table

    click.echo(settings_table())


if __name__ == "__main__":
    main()
