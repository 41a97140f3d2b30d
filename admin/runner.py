"""How a ``chatctl`` command runs: its context, opening the store and the
broker, running one operation of :mod:`admin.ops` in trio with every
failure mapped to an exit code, and printing the result (JSON with
``--json``, else the command's function in :mod:`admin.text`). The
commands themselves are in :mod:`admin.cli`; the exit codes are listed
there."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import trio

from chatd import crypto
from chatd.config import Config, ConfigError, load
from chatd.core.errors import BadRequest, ChatError, Conflict, NotFound, Unavailable
from chatd.ports import Broker, Store

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_INTERNAL = 5

#: The ``chatd serve`` settings chatctl takes as flags (the rest do not apply).
FLAGS = ("data_dir", "store", "broker", "redis_url", "redis_mode", "mongo_uri", "key_file")

NO_BROKER = (
    "this command needs the Redis broker: set --redis-url or CHATD_REDIS_URL (a chatd"
    " without Redis keeps presence and queues in its own memory, which chatctl cannot see)"
)


class CtlError(Exception):
    """A failure with its exit code, raised inside :func:`run`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Ctx:
    flags: dict[str, Any]
    #: ``--json``, before the command or after it.
    json: bool = False
    _config: Config | None = None

    @property
    def config(self) -> Config:
        """The settings; exits 2 when they are wrong."""
        if self._config is None:
            try:
                self._config = load(os.environ, self.flags)
            except ConfigError as exc:
                fail(f"configuration: {exc}", EXIT_USAGE)
        return self._config


# -- running a command -------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    """Print ``chatctl: message`` on standard error and exit with ``code``
    (raises SystemExit)."""
    click.echo(f"chatctl: {message}", err=True)
    sys.exit(code)


def _open_store(config: Config) -> Store:
    from chatd import wiring

    # chatctl never creates a store: a wrong data dir must not look empty.
    return wiring.open_store(config, create=False)


def _open_broker(config: Config, required: bool) -> Broker | None:
    from chatd import wiring

    if config.broker_kind == "memory":
        if required:
            raise CtlError(NO_BROKER, EXIT_USAGE)
        return None
    return wiring.open_broker(config)


def run(
    ctx: Ctx,
    fn: Callable[..., Awaitable[Any]],
    *,
    store: bool = False,
    broker: bool | None = None,
) -> Any:
    """Run ``fn(store?, broker?)`` under trio and return what it returns.

    ``broker``: True needs Redis, None uses it when configured, False skips it.
    A failure exits (SystemExit, through :func:`fail`) with its exit code
    and one line: the module docstring lists them.
    """
    config = ctx.config

    async def main() -> Any:
        s = _open_store(config) if store else None
        b = _open_broker(config, required=broker is True) if broker is not False else None
        if b is None:
            return await _main(s, b)
        async with b:
            return await _main(s, b)

    async def _main(s: Store | None, b: Broker | None) -> Any:
        try:
            # Fail fast with one clear line when a backend is away.
            for name, port in (("store", s), ("Redis", b)):
                if port is not None:
                    try:
                        with trio.fail_after(5):
                            await port.ping()
                    except (Unavailable, trio.TooSlowError) as exc:
                        reason = getattr(exc, "message", "no answer within 5 s")
                        raise CtlError(f"{name} unavailable: {reason}", EXIT_UNAVAILABLE) from None
            args = [p for p, wanted in ((s, store), (b, broker is not False)) if wanted]
            return await fn(*args)
        finally:
            with trio.CancelScope(shield=True):
                if b is not None:
                    await b.aclose()
                if s is not None:
                    await s.aclose()

    try:
        return trio.run(main)
    except CtlError as exc:
        fail(exc.message, exc.code)
    except NotFound as exc:
        fail(exc.message, EXIT_NOT_FOUND)
    except Unavailable as exc:
        fail(f"unavailable: {exc.message}", EXIT_UNAVAILABLE)
    except (Conflict, BadRequest) as exc:
        fail(exc.message, EXIT_REFUSED if isinstance(exc, Conflict) else EXIT_USAGE)
    except ChatError as exc:
        fail(exc.message, EXIT_INTERNAL)
    except crypto.KeyringError as exc:
        fail(f"keyring: {exc}", EXIT_USAGE)
    except ConfigError as exc:
        fail(f"configuration: {exc}", EXIT_USAGE)
    except (click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug: one line, not a traceback
        fail(f"unexpected error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)


def show(
    ctx: Ctx,
    data: Any,
    print_text: Callable[[Any], None],
    as_json: Callable[[Any], Any] | None = None,
) -> None:
    """Print ``data``: as JSON with ``--json`` (``as_json(data)`` when
    given), for people with ``print_text(data)`` otherwise."""
    if ctx.json:
        click.echo(json.dumps(data if as_json is None else as_json(data), indent=2))
    else:
        print_text(data)


def report(
    ctx: Ctx,
    fn: Callable[..., Awaitable[Any]],
    print_text: Callable[[Any], None],
    *,
    store: bool = False,
    broker: bool | None = None,
    as_json: Callable[[Any], Any] | None = None,
) -> Any:
    """What a command does: :func:`run` ``fn``, :func:`show` what it
    returned, and return that too. Exits as :func:`run` does on failure."""
    data = run(ctx, fn, store=store, broker=broker)
    show(ctx, data, print_text, as_json)
    return data


def confirm(question: str) -> None:
    """Ask ``question`` on standard error; exits 4 unless the answer is yes."""
    try:
        ok = click.confirm(question, default=False, err=True)
    except click.Abort:
        ok = False
    if not ok:
        fail("aborted: nothing was changed", EXIT_REFUSED)


def keyring(ctx: Ctx, purpose: str) -> crypto.Keyring:
    """The keyring, for ``purpose``; exits 2 when it cannot be read."""
    config = ctx.config
    try:
        return crypto.load_keyring(
            config.keys or None, config.active_key or None, config.key_path, create=False
        )
    except crypto.KeyringError as exc:
        fail(
            f"{purpose} needs the keyring (CHATD_KEYS, or the key file {config.key_path}): {exc}",
            EXIT_USAGE,
        )


def keyring_source(config: Config) -> str:
    return "CHATD_KEYS (environment)" if config.keys else str(config.key_path)


# -- the command tree ----------------------------------------------------------------------
