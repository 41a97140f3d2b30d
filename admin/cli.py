"""``chatctl``: the admin CLI. Its commands arrive with the admin issue."""

from __future__ import annotations

import click

from chatd import __version__


@click.group()
@click.version_option(__version__, prog_name="chatctl")
def main() -> None:
    """chatctl: inspect and manage a chatd deployment.

    Not built yet: users, queues, presence, nodes, keys and stats commands
    come with the admin issue (see docs/admin.md).
    """


if __name__ == "__main__":
    main()
