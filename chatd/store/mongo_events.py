"""Events on MongoDB: reactions, edits and deletions (and the members events
of :mod:`chatd.store.mongo_groups`), stored, applied and owed.

Owns ``apply_events`` (the events half of ``write``), bringing a message up
to date with its events (``settled``, ``apply_to_message``), ``ack_events``
and ``owed_events``. Each function runs in the store's worker thread and
takes the store's :class:`~chatd.store.mongo_schema.Collections`; judging an
event is :func:`chatd.store.mongo_plan.judge_event`.

**Events** are claimed like messages: one insert into ``events`` carries
``(conversation, eseq)`` and ``(by, cid)``, both under unique indexes, so
eseq has no gaps and no repeats and an event is stored once. The insert is
the commit point and happens only after :func:`chatd.core.events.judge` has
passed; a refused event writes nothing. The judgement is serialised by that
same index: it is made against the message with every event up to the
conversation's highest eseq applied, and the insert of the next eseq fails
(and the event is judged again) if any event of the conversation was stored
meanwhile. The message document is then brought up to date by a
compare-and-set on its ``applied_eseq``, which any process does for any
stored event it finds not yet applied (so a crash between the two writes is
repaired by the next event on the message, or by the retry). Reactions live
in the message document (``reactions``); who is still owed an event is the
event's ``owed`` array, as ``undelivered`` is for a message. An event in a
group reads the members after its eseq guess, so the eseq index serialises
it with the members events: it is owed to (and allowed for) the members as
of its eseq.
"""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.errors import DuplicateKeyError

from chatd.core.errors import Unavailable
from chatd.core.model import EventKind, EventResult, NewEvent, Sealed, StoredEvent
from chatd.core.names import GROUP_PREFIX
from chatd.store.mongo_docs import applying, erased, event_doc, to_event, to_sealed
from chatd.store.mongo_groups import announce
from chatd.store.mongo_plan import EVENT_CONFLICTS, judge_event, need, owed_query
from chatd.store.mongo_schema import DELETE_FIELDS, TARGET_FIELDS, Collections


def apply_events(c: Collections, batch: list[NewEvent]) -> list[EventResult]:
    # One at a time: a later event of the batch is judged against what
    # the earlier ones did.
    return [apply_event(c, ev) for ev in batch]


def apply_event(c: Collections, ev: NewEvent) -> EventResult:
    if ev.kind is EventKind.EDITED and ev.body is None:
        raise ValueError("an edit without a body")
    fields = DELETE_FIELDS if ev.kind is EventKind.DELETED else TARGET_FIELDS
    for _ in range(EVENT_CONFLICTS):
        found = c.events.find_one({"by": ev.by, "cid": ev.cid})
        if found is not None:
            # Stored already (a retry): make sure it reached its message
            # (its writer may have stopped in between), answer the first.
            settled(c, found["message_id"], {"_id": 1})
            return EventResult(to_event(found), duplicate=True)
        # Read the highest eseq first, then the group's members and the
        # message with every event up to it applied: the insert of the
        # next eseq below succeeds only if no event of the conversation
        # (a members event included) was stored in between, so the
        # judgement holds at the moment the event is stored.
        top = c.events.find_one(
            {"conversation": ev.conversation}, {"eseq": 1}, sort=[("eseq", DESCENDING)]
        )
        eseq = (top["eseq"] if top else 0) + 1
        group: dict[str, Any] | None = None
        if ev.conversation.startswith(GROUP_PREFIX):
            group = c.conversations.find_one(
                {"_id": ev.conversation, "kind": "group"},
                {"members": 1, "admins": 1, "joined": 1, "pending": 1, "e2e": 1},
            )
            if group is not None and group.get("pending") is not None:
                # A change committed, its event not stored yet: it goes first.
                announce(c, group["pending"])
                continue
        e2e = False
        if ev.kind is EventKind.EDITED and group is None:
            # An edit must fit its conversation's mode (a group's was read
            # with its members). The switch is a second write after the
            # first end-to-end message (docs/mongo.md, Known limits).
            conv = c.conversations.find_one({"_id": ev.conversation}, {"e2e": 1})
            e2e = bool(conv is not None and conv.get("e2e"))
        doc = settled(c, ev.message_id, fields)
        refusal, to = judge_event(ev, group, doc, e2e)
        if refusal is not None:
            return EventResult(None, refused=refusal.code, reason=refusal.reason)
        stored = event_doc(ev, eseq, to)
        try:
            c.events.insert_one(stored)
        except DuplicateKeyError:
            # Lost (by, cid) to a concurrent duplicate (the next round
            # answers it) or the eseq to another event (the next round
            # plans and judges again).
            if (
                c.events.find_one({"by": ev.by, "cid": ev.cid}, {"_id": 1}) is None
                and c.events.find_one({"_id": ev.id}, {"_id": 1}) is not None
            ):
                raise Unavailable(f"event id {ev.id} is already taken") from None
            continue
        before, dropped = apply_to_message(c, stored)
        if ev.kind is EventKind.DELETED:
            # The message as this call erased it; as judged if another
            # process applied the deletion first.
            dropped = erased(before or need(doc)) + dropped
        body = ev.body if ev.kind is EventKind.EDITED else None
        return EventResult(
            to_event(stored, body), dropped=tuple(dropped), recipients=tuple(stored["owed"])
        )
    raise Unavailable("too much contention applying events")


def settled(c: Collections, message_id: str, fields: dict[str, int]) -> dict[str, Any] | None:
    """The message document with every stored event of it applied (those
    a crashed or slower process left unapplied are applied here, in eseq
    order); None if there is no such message."""
    doc = c.messages.find_one({"_id": message_id}, {**fields, "applied_eseq": 1})
    if doc is None:
        return None
    late = list(
        c.events.find(
            {"message_id": message_id, "eseq": {"$gt": doc.get("applied_eseq", 0)}},
            sort=[("eseq", ASCENDING)],
        )
    )
    if not late:
        return doc
    for ev in late:
        apply_to_message(c, ev)
    return c.messages.find_one({"_id": message_id}, {**fields, "applied_eseq": 1})


def apply_to_message(
    c: Collections, ev: dict[str, Any]
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """Apply stored event ``ev`` to its message, once, whoever calls: the
    message as it was before (None if it was applied already) and, for a
    deletion, the (member, event id) entries it took out of the queues."""
    kind = EventKind(ev["kind"])
    dropped: list[tuple[str, str]] = []
    if kind is EventKind.EDITED and "body" not in ev:
        # Its body is unset only once it is applied (read late, by a helper).
        return None, dropped
    if kind is EventKind.DELETED:
        # The earlier events first (all stored before this one was
        # judged): nothing is owed of them any more, and their bodies go.
        # Before the message, so that a crash in between is repaired by
        # applying the deletion again.
        earlier = {"message_id": ev["message_id"], "_id": {"$ne": ev["_id"]}}
        for other in c.events.find(
            {**earlier, "owed.0": {"$exists": True}}, {"owed": 1}, sort=[("eseq", ASCENDING)]
        ):
            dropped += [(user, other["_id"]) for user in other["owed"]]
        c.events.update_many(earlier, {"$set": {"owed": []}, "$unset": {"body": ""}})
    # Compare-and-set on applied_eseq: the events of one message are
    # applied in eseq order, each exactly once.
    before = c.messages.find_one_and_update(
        {"_id": ev["message_id"], "applied_eseq": {"$not": {"$gte": ev["eseq"]}}},
        applying(ev),
        projection=DELETE_FIELDS if kind is EventKind.DELETED else {"_id": 1},
        return_document=ReturnDocument.BEFORE,
    )
    if kind is EventKind.EDITED:
        # Applied (by this call or another): the message holds the body now.
        c.events.update_one({"_id": ev["_id"]}, {"$unset": {"body": ""}})
    return before, dropped


def ack_events(c: Collections, acks: list[tuple[str, str]]) -> None:
    # The filter makes an ack of an event not owed to that user a no-op.
    c.events.bulk_write(
        [
            UpdateOne({"_id": event_id, "owed": user}, {"$pull": {"owed": user}})
            for user, event_id in acks
        ],
        ordered=True,
    )


def owed_events(
    c: Collections, username: str, limit: int, after: tuple[str, int] | None
) -> list[StoredEvent]:
    docs = list(
        c.events.find(
            owed_query("owed", username, "eseq", after),
            {"owed": 0, "body": 0},
            sort=[("conversation", ASCENDING), ("eseq", ASCENDING)],
            limit=limit,
        )
    )
    # An edit carries the message's body as it is now (none once deleted).
    edited = sorted({d["message_id"] for d in docs if d["kind"] == EventKind.EDITED})
    bodies: dict[str, Sealed] = {}
    if edited:
        for m in c.messages.find({"_id": {"$in": edited}, "deleted": {"$ne": True}}, {"body": 1}):
            bodies[m["_id"]] = to_sealed(m["body"])
    return [
        to_event(d, bodies.get(d["message_id"]) if d["kind"] == EventKind.EDITED else None)
        for d in docs
    ]
