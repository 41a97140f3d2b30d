"""``chatctl``: the operator's command line (docs/admin.md shows every command).

It reads the same configuration as ``chatd serve`` (the flags below and the
same environment variables), opens the store and the broker through
:mod:`chatd.wiring`, and does everything through the ports
(:mod:`admin.ops`), so it works against a live cluster while chatd serves.

Tables for people, ``--json`` for scripts. Exit codes::

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

import getpass
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import trio

from chatd import __version__, crypto
from chatd.cli import config_options
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
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Ctx:
    flags: dict[str, Any]
    json: bool = False
    _config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load(os.environ, self.flags)
            except ConfigError as exc:
                fail(f"configuration: {exc}", EXIT_USAGE)
        return self._config


# -- running a command -------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
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
    """Run ``fn(store?, broker?)`` under trio and map failures to exit codes.

    ``broker``: True needs Redis, None uses it when configured, False skips it.
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


def load_ring(config: Config, purpose: str) -> crypto.Keyring:
    try:
        return crypto.load_keyring(
            config.keys or None, config.active_key or None, config.key_path, create=False
        )
    except crypto.KeyringError as exc:
        raise CtlError(
            f"{purpose} needs the keyring (CHATD_KEYS, or the key file {config.key_path}): {exc}",
            EXIT_USAGE,
        ) from None


def keyring_source(config: Config) -> str:
    return "CHATD_KEYS (environment)" if config.keys else str(config.key_path)


# -- output ------------------------------------------------------------------------------


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def pairs(rows: Sequence[tuple[str, Any]]) -> None:
    """A two-column block: names on the left, values on the right."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def age(ms: int | None, now: int | None = None) -> str:
    """How long ago ``ms`` was, shortly: 4s, 3m, 2h, 5d."""
    if ms is None:
        return "-"
    seconds = max(0, ((now or time.time_ns() // 1_000_000) - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


# -- the command tree ----------------------------------------------------------------------


json_flag = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def wants_json(ctx: Ctx, as_json: bool) -> bool:
    return as_json or ctx.json


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
def users_list(ctx: Ctx, as_json: bool) -> None:
    """Every account, with its status and (with Redis) whether it is online."""
    from admin import ops

    found = run(ctx, ops.list_users, store=True, broker=None)
    if wants_json(ctx, as_json):
        emit_json(found)
        return
    rows = [
        (
            u["username"],
            u["status"],
            when(u["created_ts"]),
            when(u["last_seen"]),
            "-" if u["online"] is None else ",".join(u["nodes"]) or "no",
        )
        for u in found
    ]
    table(("USER", "STATUS", "CREATED", "LAST SEEN", "ONLINE ON"), rows)
    click.echo(f"{plural(len(found), 'user')}")


@users.command("show")
@click.argument("name")
@json_flag
@pass_ctx
def users_show(ctx: Ctx, name: str, as_json: bool) -> None:
    """One account: presence, what is owed to it, its conversations."""
    from admin import ops

    info = run(ctx, lambda s, b: ops.show_user(s, b, name), store=True, broker=None)
    if wants_json(ctx, as_json):
        emit_json(info)
        return
    p = info["presence"]
    if p is None:
        online = "unknown (no Redis configured)"
    elif p["online"]:
        online = "yes, on " + ", ".join(p["nodes"])
    else:
        online = "no"
    owed = info["owed"]
    queue = "-" if owed["queue_entries"] is None else plural(owed["queue_entries"], "entry")
    pairs(
        [
            ("user", info["username"]),
            ("status", info["status"]),
            ("created", when(info["created_ts"])),
            ("last seen", f"{when(info['last_seen'])} ({age(info['last_seen'])} ago)"),
            ("online", online),
            (
                "owed to them",
                f"{plural(owed['messages'], 'message')}, {plural(owed['receipts'], 'receipt')}"
                " (store)",
            ),
            ("Redis queue", queue),
        ],
    )
    convs = info["conversations"]
    click.echo(f"\n{plural(len(convs), 'conversation')}:")
    if convs:
        table(
            ("ID", "KIND", "MEMBERS", "LAST SEQ", "LAST ACTIVITY", "UNREAD"),
            [
                (
                    c["id"],
                    c["kind"],
                    ", ".join(c["members"]),
                    c["last_seq"],
                    when(c["last_ts"]),
                    c["unread"],
                )
                for c in convs
            ],
        )


@users.command("create")
@click.argument("name")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input (for scripts).",
)
@json_flag
@pass_ctx
def users_create(ctx: Ctx, name: str, password_stdin: bool, as_json: bool) -> None:
    """Create an account (asks for the password, never takes it as an argument)."""
    from admin import ops

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        ops.check_password(password)
    except BadRequest as exc:
        fail(exc.message, EXIT_USAGE)
    info = run(ctx, lambda s: ops.create_user(s, name, password), store=True, broker=False)
    if wants_json(ctx, as_json):
        emit_json(info)
        return
    click.echo(f"created user {info['username']}")


def _set_disabled(ctx: Ctx, name: str, disabled: bool, as_json: bool) -> None:
    from admin import ops

    info = run(ctx, lambda s, b: ops.set_disabled(s, b, name, disabled), store=True, broker=None)
    if wants_json(ctx, as_json):
        emit_json(info)
        return
    if not disabled:
        click.echo(f"enabled {info['username']}: they can log in again")
        return
    click.echo(f"disabled {info['username']}: logins and new connections are refused")
    if info["online_on"]:
        click.echo(
            f"they are online on {', '.join(info['online_on'])}: open connections end when"
            " their token expires or they reconnect"
        )


@users.command("disable")
@click.argument("name")
@json_flag
@pass_ctx
def users_disable(ctx: Ctx, name: str, as_json: bool) -> None:
    """Refuse the account's logins and connections (messages to it are still kept)."""
    _set_disabled(ctx, name, True, as_json)


@users.command("enable")
@click.argument("name")
@json_flag
@pass_ctx
def users_enable(ctx: Ctx, name: str, as_json: bool) -> None:
    """Let a disabled account log in again."""
    _set_disabled(ctx, name, False, as_json)


@users.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_flag
@pass_ctx
def users_delete(ctx: Ctx, name: str, yes: bool, as_json: bool) -> None:
    """Delete an account; others' history stays (docs/admin.md says exactly what goes)."""
    from admin import ops

    if not yes:
        p = run(ctx, lambda s, b: ops.delete_preview(s, b, name), store=True, broker=None)
        queue = p["queue_entries"]
        click.echo(
            f"Deleting {p['username']} ({p['status']}):\n"
            f"  - the account can never log in again; the name stays taken\n"
            f"  - {plural(p['owed_messages'], 'message')} not yet delivered to them"
            " will not be delivered\n"
            f"  - {plural(p['owed_receipts'], 'receipt')} owed to them are dropped\n"
            + (
                f"  - their Redis queue ({plural(queue, 'entry')}) is purged\n"
                if queue is not None
                else "  - (no Redis configured: purge their queue later with chatctl queue purge)\n"
            )
            + "  Messages they sent and their conversations stay in everyone else's history.",
            err=True,
        )
        _confirm("Delete?")
    info = run(ctx, lambda s, b: ops.delete_user(s, b, name), store=True, broker=None)
    if wants_json(ctx, as_json):
        emit_json(info)
        return
    purged = info["queue_entries_purged"]
    click.echo(
        f"deleted {info['username']}: {plural(info['messages_dropped'], 'owed message')}"
        f" and {plural(info['receipts_settled'], 'owed receipt')} dropped"
        + (f", {plural(purged, 'queue entry')} purged" if purged is not None else "")
    )


def _confirm(question: str) -> None:
    try:
        ok = click.confirm(question, default=False, err=True)
    except click.Abort:
        ok = False
    if not ok:
        fail("aborted: nothing was changed", EXIT_REFUSED)


# -- queues --------------------------------------------------------------------------------


@main.group()
def queue() -> None:
    """The owed queues in Redis (the fast path; the store stays the authority)."""


@queue.command("list")
@json_flag
@pass_ctx
def queue_list(ctx: Ctx, as_json: bool) -> None:
    """Users with owed items: how many, and how long the oldest has waited."""
    from admin import ops

    found = run(ctx, ops.list_queues, broker=True)
    if wants_json(ctx, as_json):
        emit_json(found)
        return
    table(
        ("USER", "ENTRIES", "OLDEST QUEUED"),
        [(q["user"], q["entries"], f"{age(q['oldest_queued_at'])} ago") for q in found],
    )
    total = sum(q["entries"] for q in found)
    click.echo(f"{plural(len(found), 'user')}, {total} entries")


@queue.command("show")
@click.argument("name")
@click.option("--decrypt", is_flag=True, help="Show message bodies (needs the keyring).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show the oldest N.")
@json_flag
@pass_ctx
def queue_show(ctx: Ctx, name: str, decrypt: bool, limit: int | None, as_json: bool) -> None:
    """One user's owed queue, oldest first: ids, conversation, sender, age."""
    from admin import ops

    ring = None
    if decrypt:
        try:
            ring = load_ring(ctx.config, "--decrypt")
        except CtlError as exc:
            fail(exc.message, exc.code)
        click.echo(
            f"decrypting bodies with the keyring from {keyring_source(ctx.config)}", err=True
        )
    entries = run(ctx, lambda b: ops.show_queue(b, name, ring, limit), broker=True)
    if wants_json(ctx, as_json):
        emit_json(entries)
        return
    now = time.time_ns() // 1_000_000
    headers = ["KEY", "KIND", "CONVERSATION", "FROM", "SENT", "QUEUED"]
    if decrypt:
        headers.append("BODY")
    rows = []
    for e in entries:
        who = e.get("sender", "")
        if e.get("kind") == "receipt":
            who = f"{who} ({e['status']})"
        row = [
            e["key"],
            e["kind"],
            e.get("conversation", ""),
            who,
            f"{age(e.get('ts'), now)} ago" if e.get("ts") else "-",
            f"{age(e.get('queued_at'), now)} ago" if e.get("queued_at") else "-",
        ]
        if decrypt:
            row.append(e.get("body") if e.get("body") is not None else e.get("error", ""))
        rows.append(row)
    table(headers, rows)
    click.echo(plural(len(entries), "entry"))


@main.group()
def messages() -> None:
    """Look at one stored message; delete it for everyone (moderation)."""


@messages.command("show")
@click.argument("id")
@click.option("--decrypt", is_flag=True, help="Show the body (needs the keyring).")
@json_flag
@pass_ctx
def messages_show(ctx: Ctx, id: str, decrypt: bool, as_json: bool) -> None:
    """A message by id: conversation, seq, sender, receipts, reactions, edits."""
    from admin import ops

    ring = None
    if decrypt:
        try:
            ring = load_ring(ctx.config, "--decrypt")
        except CtlError as exc:
            fail(exc.message, exc.code)
    info = run(ctx, lambda s: ops.show_message(s, id, ring), store=True, broker=False)
    if wants_json(ctx, as_json):
        emit_json(info)
        return
    rows = [
        ("id", info["id"]),
        ("conversation", info["conversation"]),
        ("seq", info["seq"]),
        ("from", info["from"]),
        ("sent", when(info["ts"])),
        ("state", "deleted" if info["deleted"] else "stored"),
        ("key id", info["key_id"] or "-"),
        ("reply to", info["reply_to"] or "-"),
        ("edited", f"{when(info['edited_ts'])} ({info['edits']}x)" if info["edits"] else "-"),
        (
            "reactions",
            " ".join(f"{e} {n}" for e, n in info["reactions"].items()) or "-",
        ),
        ("delivered to", ", ".join(info["delivered_to"]) or "-"),
        ("seen by", ", ".join(info["seen_by"]) or "-"),
    ]
    if decrypt:
        rows.append(
            ("body", info.get("body") if info.get("body") is not None else info.get("error", "-"))
        )
    pairs(rows)


@messages.command("delete")
@click.argument("id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_flag
@pass_ctx
def messages_delete(ctx: Ctx, id: str, yes: bool, as_json: bool) -> None:
    """Delete a message for everyone: the body is erased, members get a
    'deleted' event. Writes an audit line to stderr."""
    from admin import ops

    if not yes:
        info = run(ctx, lambda s: ops.show_message(s, id, None), store=True, broker=False)
        click.echo(
            f"Deleting message {info['id']} (seq {info['seq']} of {info['conversation']},"
            f" from {info['from']}, sent {when(info['ts'])}) for everyone:\n"
            "  - its body is erased from the store and from Redis queues; it cannot be undone\n"
            "  - every member gets a 'deleted' event; history keeps a tombstone",
            err=True,
        )
        _confirm("Delete?")
    done = run(ctx, lambda s, b: ops.delete_message(s, b, id), store=True, broker=None)
    audit = {
        "audit": "message deleted",
        "by": "chatctl",
        "operator": getpass.getuser(),
        "id": done["id"],
        "conversation": done["conversation"],
        "from": done["from"],
        "eid": done["eid"],
        "ts": done["ts"],
    }
    click.echo(json.dumps(audit, ensure_ascii=False), err=True)
    if wants_json(ctx, as_json):
        emit_json(done)
        return
    click.echo(
        f"deleted {done['id']} (seq {done['seq']} of {done['conversation']}) for everyone;"
        f" event {done['eid']} owed to {plural(len(done['members']), 'member')}"
    )


@queue.command("requeue")
@click.argument("name")
@json_flag
@pass_ctx
def queue_requeue(ctx: Ctx, name: str, as_json: bool) -> None:
    """Rebuild a user's owed queue from what the store says is owed."""
    from admin import ops

    done = run(ctx, lambda s, b: ops.requeue(s, b, name), store=True, broker=True)
    if wants_json(ctx, as_json):
        emit_json(done)
        return
    click.echo(
        f"rebuilt the queue of {ops.username(name)} from the store:"
        f" {plural(done['messages'], 'message')} and {plural(done['receipts'], 'receipt')}"
        f" queued (it held {plural(done['purged'], 'entry')}). Nothing was delivered live: their"
        " devices get everything owed at their next connect."
    )


@queue.command("purge")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_flag
@pass_ctx
def queue_purge(ctx: Ctx, name: str, yes: bool, as_json: bool) -> None:
    """Empty a user's owed queue in Redis (asks first; --yes skips)."""
    from admin import ops

    if not yes:
        kinds = run(ctx, lambda b: ops.queue_summary(b, name), broker=True)
        total = sum(kinds.values())
        if total == 0:
            click.echo(f"the queue of {ops.username(name)} is empty: nothing to purge")
            return
        click.echo(
            f"Purging the Redis queue of {ops.username(name)} removes {total} entries"
            f" ({plural(kinds.get('message', 0), 'message')},"
            f" {plural(kinds.get('receipt', 0), 'receipt')}).\n"
            "They stay owed in the store, so their devices still get them at the next"
            " connect; what is lost is the fast path (and the copy Redis would serve"
            " while the store is down).",
            err=True,
        )
        _confirm("Purge?")
    removed = run(ctx, lambda b: ops.purge_queue(b, name), broker=True)
    if wants_json(ctx, as_json):
        emit_json({"user": ops.username(name), "purged": removed})
        return
    click.echo(f"purged {plural(removed, 'entry')} from the queue of {ops.username(name)}")


# -- presence, nodes, stats ----------------------------------------------------------------


@main.command()
@json_flag
@pass_ctx
def presence(ctx: Ctx, as_json: bool) -> None:
    """Who is online, on which replica."""
    from admin import ops

    found = run(ctx, ops.presence, broker=True)
    if wants_json(ctx, as_json):
        emit_json(found)
        return
    table(("USER", "NODES"), [(p["user"], ", ".join(p["nodes"])) for p in found])
    click.echo(f"{plural(len(found), 'user')} online")


@main.command()
@json_flag
@pass_ctx
def nodes(ctx: Ctx, as_json: bool) -> None:
    """Live replicas: connections, users, last heartbeat; then the Redis
    deployment (a cluster's shards, Sentinel's master)."""
    from admin import ops

    found, redis = run(ctx, ops.nodes_and_redis, broker=True)
    if wants_json(ctx, as_json):
        emit_json(found)
        return
    table(
        ("NODE", "INCARNATION", "CONNECTIONS", "USERS", "HEARTBEAT", "UP SINCE"),
        [
            (
                n["node"],
                n["incarnation"],
                n["connections"],
                n["users"],
                "-"
                if n["heartbeat_age_ms"] is None
                else f"{n['heartbeat_age_ms'] / 1000:.1f}s ago",
                when(n["started_at"]),
            )
            for n in found
        ],
    )
    click.echo(f"{plural(len(found), 'live node')}")
    if redis is not None:
        click.echo("")
        redis_lines(redis)


def redis_lines(redis: dict[str, Any]) -> None:
    """The Redis deployment, for people."""
    pubsub = "sharded pub/sub" if redis.get("sharded_pubsub") else "classic pub/sub"
    mode = redis["mode"]
    if mode == "cluster":
        shards = redis["shards"]
        click.echo(f"redis: cluster, {plural(len(shards), 'shard')}, {pubsub}")
        table(
            ("MASTER", "REPLICAS", "SLOTS"),
            [(s["master"], ", ".join(s["replicas"]) or "-", s["slots"]) for s in shards],
        )
    elif mode == "sentinel":
        click.echo(
            f"redis: sentinel, master {redis['master_name']!r} at {redis['master'] or '?'}"
            f" (sentinels {', '.join(redis['sentinels'])}), {pubsub}"
        )
    else:
        click.echo(f"redis: {mode}, {redis.get('server', '?')}, {pubsub}")


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
def stats(ctx: Ctx, window: float, as_json: bool) -> None:
    """Messages stored and owed, delivered/seen rates, per-node connections."""
    from admin import ops

    st = run(ctx, lambda s, b: ops.stats(s, b, window), store=True, broker=None)
    if wants_json(ctx, as_json):
        emit_json(st)
        return
    span = f"last {window:g} s"
    u, m = st["users"], st["messages"]
    rows = [
        ("users", f"{u['total']} ({u['disabled']} disabled, {u['deleted']} deleted)"),
        ("conversations", st["conversations"]),
        (
            "messages",
            f"{m['stored']} stored; {m['in_window']} in the {span} ({m['per_minute']}/min)",
        ),
        (
            "owed (store)",
            f"{plural(st['owed']['messages'], 'message')},"
            f" {plural(st['owed']['receipts'], 'receipt')}",
        ),
        (
            "delivered",
            f"{st['delivered']['in_window']} in the {span} ({st['delivered']['per_minute']}/min)",
        ),
        ("seen", f"{st['seen']['in_window']} in the {span} ({st['seen']['per_minute']}/min)"),
        ("keys", ", ".join(f"{k}: {n}" for k, n in sorted(st["keys"].items())) or "-"),
    ]
    q = st["queues"]
    if q is None:
        rows.append(("queues, nodes", "unknown (no Redis configured)"))
    else:
        rows.append(
            (
                "queues (Redis)",
                f"{plural(q['users'], 'user')}, {q['entries']} entries, oldest queued"
                f" {age(q['oldest_queued_at'])} ago",
            )
        )
        rows.append(
            (
                "connections",
                ", ".join(f"{n}: {c}" for n, c in st["nodes"].items()) or "no live node",
            )
        )
    pairs(rows)
    if st.get("redis") is not None:
        redis_lines(st["redis"])


# -- keys ----------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """The encryption keyring: list, rotate, re-encrypt, retire."""


@keys.command("list")
@json_flag
@pass_ctx
def keys_list(ctx: Ctx, as_json: bool) -> None:
    """Keys in the keyring, which one is active, and how many messages each seals."""
    from admin import ops

    ring = _ring(ctx, "keys list")
    found = run(ctx, lambda s: ops.list_keys(s, ring), store=True, broker=False)
    if wants_json(ctx, as_json):
        emit_json({"source": keyring_source(ctx.config), "keys": found})
        return
    click.echo(f"keyring: {keyring_source(ctx.config)}")
    table(
        ("KEY", "ACTIVE", "MESSAGES", "IN KEYRING"),
        [
            (
                k["key"],
                "*" if k["active"] else "",
                k["messages"],
                "yes" if k["in_keyring"] else "NO",
            )
            for k in found
        ],
    )
    missing = [k["key"] for k in found if not k["in_keyring"]]
    if missing:
        click.echo(
            f"warning: messages are sealed with keys missing from the keyring: {', '.join(missing)}"
            " (they cannot be opened)",
            err=True,
        )


def _ring(ctx: Ctx, purpose: str) -> crypto.Keyring:
    try:
        return load_ring(ctx.config, purpose)
    except CtlError as exc:
        fail(exc.message, exc.code)


@keys.command("rotate")
@click.option("--kid", default=None, help="The new key's id (default: generated).")
@json_flag
@pass_ctx
def keys_rotate(ctx: Ctx, kid: str | None, as_json: bool) -> None:
    """Add a new key and make it the active one."""
    config = ctx.config
    ring = _ring(ctx, "keys rotate")
    try:
        new = ring.with_new_key(kid)
    except crypto.KeyringError as exc:
        fail(str(exc), EXIT_REFUSED)
    if config.keys:
        value = crypto.keys_env_value(new)
        if as_json or ctx.json:
            emit_json({"active": new.active, "keys": list(new.keys), "CHATD_KEYS": value})
        else:
            click.echo(f"CHATD_KEYS={value}")
            click.echo(f"CHATD_ACTIVE_KEY={new.active}")
        click.echo(
            "The keyring comes from CHATD_KEYS, so nothing was written. Set these values on"
            " every replica and restart them one by one, then run chatctl keys reencrypt"
            " with the same environment.",
            err=True,
        )
        return
    crypto.write_key_file(config.key_path, new)
    if as_json or ctx.json:
        emit_json({"active": new.active, "keys": list(new.keys), "key_file": str(config.key_path)})
    else:
        click.echo(
            f"new active key {new.active} in {config.key_path} (keys: {', '.join(new.keys)})"
        )
        click.echo(
            "Replicas reading this file seal with it within a second (kill -HUP makes it"
            " immediate). Then: chatctl keys reencrypt"
        )
    if config.active_key:
        click.echo(
            f"warning: CHATD_ACTIVE_KEY={config.active_key} is set here; replicas with it set"
            " keep sealing with that key",
            err=True,
        )


@keys.command("reencrypt")
@click.option("--batch", type=click.IntRange(1, 5000), default=500, show_default=True)
@json_flag
@pass_ctx
def keys_reencrypt(ctx: Ctx, batch: int, as_json: bool) -> None:
    """Re-seal stored bodies with the active key (safe while chatd serves; resumable)."""
    from admin import ops

    ring = _ring(ctx, "keys reencrypt")

    async def go(store: Store) -> dict[str, Any]:
        counts = await store.count_by_key()
        total = sum(n for k, n in counts.items() if k != ring.active and k in ring.keys)
        with click.progressbar(
            length=max(total, 1),
            label=f"re-encrypting to {ring.active}",
            file=sys.stderr,
        ) as bar:
            return await ops.reencrypt(store, ring, batch=batch, progress=bar.update)

    done = run(ctx, go, store=True, broker=False)
    if wants_json(ctx, as_json):
        emit_json(done)
    else:
        click.echo(
            f"re-sealed {plural(done['resealed'], 'message')} with {done['active']}"
            f" ({done['skipped']} changed meanwhile and were re-read,"
            f" {done['failed']} could not be opened)"
        )
    if done["remaining"]:
        left = ", ".join(f"{k}: {n}" for k, n in done["remaining"].items())
        fail(
            f"messages still sealed with other keys ({left}): a replica still seals with an old"
            " key, or a key is missing from the keyring; run it again",
            EXIT_REFUSED,
        )
    if not (as_json or ctx.json):
        click.echo(f"every stored message is sealed with {done['active']}")


@keys.command("retire")
@click.argument("kid")
@json_flag
@pass_ctx
def keys_retire(ctx: Ctx, kid: str, as_json: bool) -> None:
    """Remove a key from the keyring, once no stored message uses it."""
    config = ctx.config
    ring = _ring(ctx, "keys retire")
    if kid not in ring.keys:
        fail(f"no key '{kid}' in the keyring ({keyring_source(config)})", EXIT_NOT_FOUND)
    if kid == ring.active:
        fail(f"'{kid}' is the active key: rotate first", EXIT_REFUSED)

    async def count(store: Store) -> int:
        return (await store.count_by_key()).get(kid, 0)

    used = run(ctx, count, store=True, broker=False)
    if used:
        fail(
            f"{plural(used, 'message')} still sealed with '{kid}': run chatctl keys reencrypt"
            " first",
            EXIT_REFUSED,
        )
    new = ring.without(kid)
    if config.keys:
        value = crypto.keys_env_value(new)
        if as_json or ctx.json:
            emit_json({"retired": kid, "keys": list(new.keys), "CHATD_KEYS": value})
        else:
            click.echo(f"CHATD_KEYS={value}")
        click.echo(
            "The keyring comes from CHATD_KEYS, so nothing was written: set this value on"
            " every replica and restart them one by one.",
            err=True,
        )
        return
    crypto.write_key_file(config.key_path, new)
    if as_json or ctx.json:
        emit_json({"retired": kid, "keys": list(new.keys), "key_file": str(config.key_path)})
    else:
        click.echo(f"retired {kid} from {config.key_path} (keys: {', '.join(new.keys)})")


if __name__ == "__main__":
    main()
