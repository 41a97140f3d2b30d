"""What chatctl prints for people (``--json`` prints the data as it is).

The table helpers, then one function per command, each taking what its
operation in :mod:`admin.ops` returned and printing it with ``click.echo``.
Previews and warnings go to standard error, so that standard output holds
only the answer.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Sequence
from typing import Any

import click

from admin import ops

# -- helpers -------------------------------------------------------------------------------


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
    """How long before ``now`` (default: the time now) ``ms`` was, shortly:
    4s, 3m, 2h, 5d."""
    if ms is None:
        return "-"
    seconds = max(0, ((now or ops.clock.now_ms()) - ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def body(item: dict[str, Any], missing: str) -> str:
    """The body ``--decrypt`` opened, or why it could not (``missing``: neither)."""
    if item.get("body") is not None:
        return item["body"]
    return item.get("error", missing)


# -- users ---------------------------------------------------------------------------------


def users(found: list[dict[str, Any]]) -> None:
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


def user(info: dict[str, Any]) -> None:
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


def created(info: dict[str, Any]) -> None:
    click.echo(f"created user {info['username']}")


def disabled(info: dict[str, Any]) -> None:
    click.echo(f"disabled {info['username']}: logins and new connections are refused")
    if info["online_on"]:
        click.echo(
            f"they are online on {', '.join(info['online_on'])}: open connections end when"
            " their token expires or they reconnect"
        )


def enabled(info: dict[str, Any]) -> None:
    click.echo(f"enabled {info['username']}: they can log in again")


def delete_user_preview(p: dict[str, Any]) -> None:
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


def deleted_user(info: dict[str, Any]) -> None:
    purged = info["queue_entries_purged"]
    click.echo(
        f"deleted {info['username']}: {plural(info['messages_dropped'], 'owed message')}"
        f" and {plural(info['receipts_settled'], 'owed receipt')} dropped"
        + (f", {plural(purged, 'queue entry')} purged" if purged is not None else "")
    )


# -- queues --------------------------------------------------------------------------------


def queues(found: list[dict[str, Any]]) -> None:
    table(
        ("USER", "ENTRIES", "OLDEST QUEUED"),
        [(q["user"], q["entries"], f"{age(q['oldest_queued_at'])} ago") for q in found],
    )
    total = sum(q["entries"] for q in found)
    click.echo(f"{plural(len(found), 'user')}, {total} entries")


def queue(entries: list[dict[str, Any]], decrypt: bool) -> None:
    now = ops.clock.now_ms()
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
            row.append(body(e, ""))
        rows.append(row)
    table(headers, rows)
    click.echo(plural(len(entries), "entry"))


def requeued(user: str, done: dict[str, int]) -> None:
    click.echo(
        f"rebuilt the queue of {user} from the store:"
        f" {plural(done['messages'], 'message')} and {plural(done['receipts'], 'receipt')}"
        f" queued (it held {plural(done['purged'], 'entry')}). Nothing was delivered live: their"
        " devices get everything owed at their next connect."
    )


def purge_preview(user: str, kinds: dict[str, int]) -> bool:
    """Say what purging the queue of ``user`` removes; False (and say so)
    when it is empty."""
    total = sum(kinds.values())
    if total == 0:
        click.echo(f"the queue of {user} is empty: nothing to purge")
        return False
    click.echo(
        f"Purging the Redis queue of {user} removes {total} entries"
        f" ({plural(kinds.get('message', 0), 'message')},"
        f" {plural(kinds.get('receipt', 0), 'receipt')}).\n"
        "They stay owed in the store, so their devices still get them at the next"
        " connect; what is lost is the fast path (and the copy Redis would serve"
        " while the store is down).",
        err=True,
    )
    return True


def purged(done: dict[str, Any]) -> None:
    click.echo(f"purged {plural(done['purged'], 'entry')} from the queue of {done['user']}")


# -- messages ------------------------------------------------------------------------------


def message(info: dict[str, Any], decrypt: bool) -> None:
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
        rows.append(("body", body(info, "-")))
    pairs(rows)


def delete_message_preview(info: dict[str, Any]) -> None:
    click.echo(
        f"Deleting message {info['id']} (seq {info['seq']} of {info['conversation']},"
        f" from {info['from']}, sent {when(info['ts'])}) for everyone:\n"
        "  - its body is erased from the store and from Redis queues; it cannot be undone\n"
        "  - every member gets a 'deleted' event; history keeps a tombstone",
        err=True,
    )


def audit(done: dict[str, Any]) -> None:
    """The audit line of a deletion, one JSON object on standard error."""
    line = {
        "audit": "message deleted",
        "by": "chatctl",
        "operator": getpass.getuser(),
        "id": done["id"],
        "conversation": done["conversation"],
        "from": done["from"],
        "eid": done["eid"],
        "ts": done["ts"],
    }
    click.echo(json.dumps(line, ensure_ascii=False), err=True)


def deleted_message(done: dict[str, Any]) -> None:
    click.echo(
        f"deleted {done['id']} (seq {done['seq']} of {done['conversation']}) for everyone;"
        f" event {done['eid']} owed to {plural(len(done['members']), 'member')}"
    )


# -- presence, nodes, stats ----------------------------------------------------------------


def presence(found: list[dict[str, Any]]) -> None:
    table(("USER", "NODES"), [(p["user"], ", ".join(p["nodes"])) for p in found])
    click.echo(f"{plural(len(found), 'user')} online")


def nodes(found_and_redis: tuple[list[dict[str, Any]], dict[str, Any] | None]) -> None:
    found, redis = found_and_redis
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
    """The Redis deployment."""
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


def stats(st: dict[str, Any]) -> None:
    span = f"last {st['window_seconds']:g} s"
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


def keys(listing: dict[str, Any]) -> None:
    found = listing["keys"]
    click.echo(f"keyring: {listing['source']}")
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


def rotated(new: dict[str, Any]) -> None:
    """The new keyring: the values to set (CHATD_KEYS), or the file written."""
    if "CHATD_KEYS" in new:
        click.echo(f"CHATD_KEYS={new['CHATD_KEYS']}")
        click.echo(f"CHATD_ACTIVE_KEY={new['active']}")
        return
    click.echo(
        f"new active key {new['active']} in {new['key_file']} (keys: {', '.join(new['keys'])})"
    )
    click.echo(
        "Replicas reading this file seal with it within a second (kill -HUP makes it"
        " immediate). Then: chatctl keys reencrypt"
    )


def reencrypted(done: dict[str, Any]) -> None:
    click.echo(
        f"re-sealed {plural(done['resealed'], 'message')} with {done['active']}"
        f" ({done['skipped']} changed meanwhile and were re-read,"
        f" {done['failed']} could not be opened)"
    )
    if not done["remaining"]:
        click.echo(f"every stored message is sealed with {done['active']}")


def retired(new: dict[str, Any]) -> None:
    """The keyring without the retired key: the value to set, or the file written."""
    if "CHATD_KEYS" in new:
        click.echo(f"CHATD_KEYS={new['CHATD_KEYS']}")
        return
    click.echo(f"retired {new['retired']} from {new['key_file']} (keys: {', '.join(new['keys'])})")
