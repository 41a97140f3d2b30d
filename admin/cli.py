"""``chatctl``: the operator's command line (docs/admin.md shows every command).

It reads the same configuration as ``chatd serve`` (the flags below and the
same environment variables), opens the store and the broker through
:mod:`chatd.wiring`, and does everything through the ports
(:mod:`admin.ops`), so it works against a live cluster while chatd serves.

A command is its options and a call of :func:`report`: run an operation
of :mod:`admin.ops`, then print what it returned, as JSON with ``--json``
or for people with its function in :mod:`admin.text`. Commands that ask
first run their preview before it; ``keys rotate`` and ``keys retire``,
which change the keyring rather than the store, print with :func:`show`.

Exit codes::

    0  done
    1  not found: no such user or key
    2  usage or configuration: bad arguments, no Redis configured for a
       command that needs it, no store at --data-dir, keyring not readable
    3  unavailable: the store or Redis did not answer
    4  refused or aborted: a taken name, a deleted user, a key still in use,
       a confirmation answered no, re-encryption left messages behind
    5  unexpected error (a bug: please report it)
"""

from __future__ import annotations

import sys
from typing import Any

import click

from admin import ops, text
from admin.runner import (  # noqa: F401 - the names commands and tests use
    EXIT_INTERNAL,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    FLAGS,
    NO_BROKER,
    CtlError,
    Ctx,
    confirm,
    fail,
    keyring,
    keyring_source,
    report,
    run,
    show,
)
from chatd import __version__, crypto
from chatd.auth import check_password
from chatd.cli import config_options
from chatd.core.errors import BadRequest
from chatd.ports import Broker, Store


def _json_after_command(click_ctx: click.Context, _: click.Parameter, value: bool) -> None:
    ctx = click_ctx.find_object(Ctx)
    if value and ctx is not None:
        ctx.json = True


#: ``--json`` after a command: the same as ``chatctl --json`` before it.
json_flag = click.option(
    "--json",
    "as_json",
    is_flag=True,
    expose_value=False,
    callback=_json_after_command,
    help="Print JSON for scripts.",
)

pass_ctx = click.make_pass_decorator(Ctx)


@click.group(
    epilog="\b\nExit codes: 0 done, 1 not found, 2 usage or configuration, 3 store or Redis"
    " unavailable, 4 refused or aborted, 5 unexpected error.\nSecrets (CHATD_KEYS,"
    " CHATD_ACTIVE_KEY) are read from the environment, as chatd serve does."
)
@click.version_option(__version__, prog_name="chatctl")
@config_options(FLAGS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (every command).")
@click.pass_context
def main(click_ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """chatctl: inspect and manage a chatd deployment.

    Reads the same settings as `chatd serve` (these flags or the same
    environment variables) and talks to the store and to Redis through
    chatd's own ports, so it is safe to run while chatd serves.
    """
    click_ctx.obj = Ctx(flags={k: v for k, v in flags.items() if v is not None}, json=as_json)


# -- users ---------------------------------------------------------------------------------


@main.group()
def users() -> None:
    """List, show, create, disable, enable and delete accounts."""


@users.command("list")
@json_flag
@pass_ctx
def users_list(ctx: Ctx) -> None:
    """Every account, with its status and (with Redis) whether it is online."""
    report(ctx, ops.list_users, text.users, store=True, broker=None)


@users.command("show")
@click.argument("name")
@json_flag
@pass_ctx
def users_show(ctx: Ctx, name: str) -> None:
    """One account: presence, what is owed to it, its conversations."""
    report(ctx, lambda s, b: ops.show_user(s, b, name), text.user, store=True, broker=None)


def read_password(from_stdin: bool) -> str:
    """A new password: the first line of standard input, or asked twice
    (hidden). Exits 2 when it breaks the password rule."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        return check_password(password)
    except BadRequest as exc:
        fail(exc.message, EXIT_USAGE)


@users.command("create")
@click.argument("name")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input (for scripts).",
)
@json_flag
@pass_ctx
def users_create(ctx: Ctx, name: str, password_stdin: bool) -> None:
    """Create an account (asks for the password, never takes it as an argument)."""
    password = read_password(password_stdin)
    report(
        ctx, lambda s: ops.create_user(s, name, password), text.created, store=True, broker=False
    )


@users.command("disable")
@click.argument("name")
@json_flag
@pass_ctx
def users_disable(ctx: Ctx, name: str) -> None:
    """Refuse the account's logins and connections (messages to it are still kept)."""
    report(
        ctx, lambda s, b: ops.set_disabled(s, b, name, True), text.disabled, store=True, broker=None
    )


@users.command("enable")
@click.argument("name")
@json_flag
@pass_ctx
def users_enable(ctx: Ctx, name: str) -> None:
    """Let a disabled account log in again."""
    report(
        ctx, lambda s, b: ops.set_disabled(s, b, name, False), text.enabled, store=True, broker=None
    )


@users.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_flag
@pass_ctx
def users_delete(ctx: Ctx, name: str, yes: bool) -> None:
    """Delete an account; others' history stays (docs/admin.md says exactly what goes)."""
    if not yes:
        preview = run(ctx, lambda s, b: ops.delete_preview(s, b, name), store=True, broker=None)
        text.delete_user_preview(preview)
        confirm("Delete?")
    report(
        ctx, lambda s, b: ops.delete_user(s, b, name), text.deleted_user, store=True, broker=None
    )


# -- queues --------------------------------------------------------------------------------


@main.group()
def queue() -> None:
    """The owed queues in Redis (the fast path; the store stays the authority)."""


@queue.command("list")
@json_flag
@pass_ctx
def queue_list(ctx: Ctx) -> None:
    """Users with owed items: how many, and how long the oldest has waited."""
    report(ctx, ops.list_queues, text.queues, broker=True)


@queue.command("show")
@click.argument("name")
@click.option("--decrypt", is_flag=True, help="Show message bodies (needs the keyring).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show the oldest N.")
@json_flag
@pass_ctx
def queue_show(ctx: Ctx, name: str, decrypt: bool, limit: int | None) -> None:
    """One user's owed queue, oldest first: ids, conversation, sender, age."""
    ring = None
    if decrypt:
        ring = keyring(ctx, "--decrypt")
        click.echo(
            f"decrypting bodies with the keyring from {keyring_source(ctx.config)}", err=True
        )
    report(
        ctx,
        lambda b: ops.show_queue(b, name, ring, limit),
        lambda entries: text.queue(entries, decrypt),
        broker=True,
    )


@queue.command("requeue")
@click.argument("name")
@json_flag
@pass_ctx
def queue_requeue(ctx: Ctx, name: str) -> None:
    """Rebuild a user's owed queue from what the store says is owed."""
    report(
        ctx,
        lambda s, b: ops.requeue(s, b, name),
        lambda done: text.requeued(ops.username(name), done),
        store=True,
        broker=True,
    )


@queue.command("purge")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_flag
@pass_ctx
def queue_purge(ctx: Ctx, name: str, yes: bool) -> None:
    """Empty a user's owed queue in Redis (asks first; --yes skips)."""
    if not yes:
        kinds = run(ctx, lambda b: ops.queue_summary(b, name), broker=True)
        if not text.purge_preview(ops.username(name), kinds):
            return
        confirm("Purge?")
    report(ctx, lambda b: ops.purge_queue(b, name), text.purged, broker=True)


# -- messages ------------------------------------------------------------------------------


@main.group()
def messages() -> None:
    """Look at one stored message; delete it for everyone (moderation)."""


@messages.command("show")
@click.argument("id")
@click.option("--decrypt", is_flag=True, help="Show the body (needs the keyring).")
@json_flag
@pass_ctx
def messages_show(ctx: Ctx, id: str, decrypt: bool) -> None:
    """A message by id: conversation, seq, sender, receipts, reactions, edits."""
    ring = keyring(ctx, "--decrypt") if decrypt else None
    report(
        ctx,
        lambda s: ops.show_message(s, id, ring),
        lambda info: text.message(info, decrypt),
        store=True,
        broker=False,
    )


@messages.command("delete")
@click.argument("id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_flag
@pass_ctx
def messages_delete(ctx: Ctx, id: str, yes: bool) -> None:
    """Delete a message for everyone: the body is erased, members get a
    'deleted' event. Writes an audit line to stderr."""
    if not yes:
        info = run(ctx, lambda s: ops.show_message(s, id, None), store=True, broker=False)
        text.delete_message_preview(info)
        confirm("Delete?")

    async def delete(store: Store, broker: Broker | None) -> dict[str, Any]:
        done = await ops.delete_message(store, broker, id)
        text.audit(done)  # on standard error, --json or not
        return done

    report(ctx, delete, text.deleted_message, store=True, broker=None)


# -- presence, nodes, stats ----------------------------------------------------------------


@main.command()
@json_flag
@pass_ctx
def presence(ctx: Ctx) -> None:
    """Who is online, on which replica."""
    report(ctx, ops.presence, text.presence, broker=True)


@main.command()
@json_flag
@pass_ctx
def nodes(ctx: Ctx) -> None:
    """Live replicas: connections, users, last heartbeat; then the Redis
    deployment (a cluster's shards, Sentinel's master)."""
    # --json prints the nodes only.
    report(ctx, ops.nodes_and_redis, text.nodes, broker=True, as_json=lambda both: both[0])


@main.command()
@click.option(
    "--window",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds the rates are measured over.",
)
@json_flag
@pass_ctx
def stats(ctx: Ctx, window: float) -> None:
    """Messages stored and owed, delivered/seen rates, per-node connections."""
    report(ctx, lambda s, b: ops.stats(s, b, window), text.stats, store=True, broker=None)


# -- keys ----------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """The encryption keyring: list, rotate, re-encrypt, retire."""


@keys.command("list")
@json_flag
@pass_ctx
def keys_list(ctx: Ctx) -> None:
    """Keys in the keyring, which one is active, and how many messages each seals."""
    ring = keyring(ctx, "keys list")

    async def listing(store: Store) -> dict[str, Any]:
        return {"source": keyring_source(ctx.config), "keys": await ops.list_keys(store, ring)}

    report(ctx, listing, text.keys, store=True, broker=False)


@keys.command("rotate")
@click.option("--kid", default=None, help="The new key's id (default: generated).")
@json_flag
@pass_ctx
def keys_rotate(ctx: Ctx, kid: str | None) -> None:
    """Add a new key and make it the active one."""
    config = ctx.config
    ring = keyring(ctx, "keys rotate")
    try:
        new = ring.with_new_key(kid)
    except crypto.KeyringError as exc:
        fail(str(exc), EXIT_REFUSED)
    saved = ops.save_keyring(config, new)
    show(ctx, {"active": new.active, "keys": list(new.keys), **saved}, text.rotated)
    if config.keys:
        click.echo(
            "The keyring comes from CHATD_KEYS, so nothing was written. Set these values on"
            " every replica and restart them one by one, then run chatctl keys reencrypt"
            " with the same environment.",
            err=True,
        )
    elif config.active_key:
        click.echo(
            f"warning: CHATD_ACTIVE_KEY={config.active_key} is set here; replicas with it set"
            " keep sealing with that key",
            err=True,
        )


@keys.command("reencrypt")
@click.option("--batch", type=click.IntRange(1, 5000), default=500, show_default=True)
@json_flag
@pass_ctx
def keys_reencrypt(ctx: Ctx, batch: int) -> None:
    """Re-seal stored bodies with the active key (safe while chatd serves; resumable)."""
    ring = keyring(ctx, "keys reencrypt")

    async def reencrypt(store: Store) -> dict[str, Any]:
        counts = await store.count_by_key()
        total = sum(n for k, n in counts.items() if k != ring.active and k in ring.keys)
        with click.progressbar(
            length=max(total, 1),
            label=f"re-encrypting to {ring.active}",
            file=sys.stderr,
        ) as bar:
            return await ops.reencrypt(store, ring, batch=batch, progress=bar.update)

    done = report(ctx, reencrypt, text.reencrypted, store=True, broker=False)
    if done["remaining"]:
        left = ", ".join(f"{k}: {n}" for k, n in done["remaining"].items())
        fail(
            f"messages still sealed with other keys ({left}): a replica still seals with an old"
            " key, or a key is missing from the keyring; run it again",
            EXIT_REFUSED,
        )


@keys.command("retire")
@click.argument("kid")
@json_flag
@pass_ctx
def keys_retire(ctx: Ctx, kid: str) -> None:
    """Remove a key from the keyring, once no stored message uses it."""
    config = ctx.config
    ring = keyring(ctx, "keys retire")
    if kid not in ring.keys:
        fail(f"no key '{kid}' in the keyring ({keyring_source(config)})", EXIT_NOT_FOUND)
    if kid == ring.active:
        fail(f"'{kid}' is the active key: rotate first", EXIT_REFUSED)

    async def count(store: Store) -> int:
        return (await store.count_by_key()).get(kid, 0)

    used = run(ctx, count, store=True, broker=False)
    if used:
        fail(
            f"{text.plural(used, 'message')} still sealed with '{kid}': run chatctl keys reencrypt"
            " first",
            EXIT_REFUSED,
        )
    new = ring.without(kid)
    saved = ops.save_keyring(config, new)
    show(ctx, {"retired": kid, "keys": list(new.keys), **saved}, text.retired)
    if config.keys:
        click.echo(
            "The keyring comes from CHATD_KEYS, so nothing was written: set this value on"
            " every replica and restart them one by one.",
            err=True,
        )


if __name__ == "__main__":
    main()
