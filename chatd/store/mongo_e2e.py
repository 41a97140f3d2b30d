"""End-to-end keys on MongoDB: devices and epochs.

Owns the device registry (``put_device``, ``remove_device``, ``devices``,
``active_devices``) and the epochs with their shares (``put_epoch``,
``get_epoch``, ``epoch_check``, ``epoch_shares``). Each function runs in
the store's worker thread and takes the store's
:class:`~chatd.store.mongo_schema.Collections`;
the decisions are :mod:`chatd.store.mongo_plan`'s (``same_device``,
``free_slot``, ``new_shares``: the upload rule of
:func:`chatd.core.e2e.judge_epoch_upload`, which the SQLite store keeps
too).

**Devices** are claimed by one insert into ``devices`` that carries
``(user, device)`` and ``(user, slot)``, both under unique indexes: an id is
registered once (a second writer of it fails and reads it back: ``same`` or
``conflict``), and a user holds at most ``limit`` devices because each takes
a distinct slot below ``limit`` (slots are never given back, as removed ids
stay taken). A removal is one conditional update (``removed_ts`` null ->
ts).

**Epochs**: one document per epoch, ``_id`` "conversation:epoch", the device
that made it, and ``shares`` {recipient device: sealed key} (device ids are
A-Z a-z 0-9 _ -: safe as field names). Made by one insert; shares are added
by a compare-and-set on their absence, so a share is never replaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from chatd.core.errors import Unavailable
from chatd.core.model import Device, Epoch, EpochCheck, EpochShare
from chatd.store.mongo_docs import to_device
from chatd.store.mongo_plan import APPEND_CONFLICTS, free_slot, new_shares, same_device
from chatd.store.mongo_schema import Collections

# -- devices -----------------------------------------------------------------------


def put_device(c: Collections, device: Device, limit: int) -> str:
    """Register ``device``: the insert that claims its id also claims the
    lowest free slot below ``limit`` (unique on (user, device) and on
    (user, slot)), so concurrent registrations cannot exceed the bound.
    A duplicate key sends it round again: the id registered meanwhile is
    answered ``same`` / ``conflict``, a slot taken meanwhile makes it
    pick another. Each slot lost is one more slot taken for good (slots
    are never given back), so ``limit + 2`` rounds always suffice."""
    key = {"user": device.user, "device": device.device}
    keys = {"sig_key": device.sig_key, "dh_key": device.dh_key, "self_sig": device.self_sig}
    for _ in range(max(limit, 0) + 2):
        found = c.devices.find_one(key, {**dict.fromkeys(keys, 1), "removed_ts": 1})
        if found is not None:
            if not same_device(found, keys):
                return "conflict"
            # Compare-and-set: a removal that landed since wins (conflict).
            done = c.devices.update_one(
                {**key, **keys, "removed_ts": None}, {"$set": {"name": device.name}}
            )
            return "same" if done.matched_count == 1 else "conflict"
        if c.devices.find_one({"device": device.device}, {"_id": 1}) is not None:
            return "conflict"  # another user's device id
        taken = {d.get("slot") for d in c.devices.find({"user": device.user}, {"slot": 1})}
        slot = free_slot(taken, limit)
        if slot is None:
            return "full"
        try:
            c.devices.insert_one(
                {
                    **key,
                    "slot": slot,
                    **keys,
                    "name": device.name,
                    "created_ts": device.created_ts,
                    "removed_ts": None,
                }
            )
        except DuplicateKeyError:
            continue  # the id or the slot was taken meanwhile: look again
        return "created"
    raise Unavailable(f"too much contention registering device {device.device}")


def remove_device(c: Collections, user: str, device: str, ts: int) -> bool:
    done = c.devices.update_one(
        {"user": user, "device": device, "removed_ts": None},
        {"$set": {"removed_ts": ts}},
    )
    return done.matched_count == 1


def devices(c: Collections, user: str) -> list[Device]:
    docs = c.devices.find({"user": user}, sort=[("created_ts", ASCENDING), ("device", ASCENDING)])
    return [to_device(d) for d in docs]


def active_devices(c: Collections, users: Sequence[str]) -> list[str]:
    docs = c.devices.find({"user": {"$in": list(users)}, "removed_ts": None}, {"device": 1})
    return sorted(d["device"] for d in docs)


# -- epochs ------------------------------------------------------------------------


def put_epoch(
    c: Collections,
    conversation: str,
    epoch: str,
    user: str,
    device: str,
    shares: Mapping[str, str],
    ts: int,
) -> str:
    key = f"{conversation}:{epoch}"
    for _ in range(APPEND_CONFLICTS):
        doc = c.epochs.find_one({"_id": key})
        if doc is None:
            try:
                c.epochs.insert_one(
                    {
                        "_id": key,
                        "conversation": conversation,
                        "epoch": epoch,
                        "user": user,
                        "device": device,
                        "created_ts": ts,
                        "shares": dict(shares),
                    }
                )
            except DuplicateKeyError:
                continue  # made meanwhile: look again
            return "created"
        new = new_shares(doc, user, device, shares)
        if new is None:
            return "conflict"
        if not new:
            return "added"
        # Compare-and-set: a share added meanwhile sends it round again.
        done = c.epochs.update_one(
            {"_id": key, **{f"shares.{d}": {"$exists": False} for d in new}},
            {"$set": {f"shares.{d}": s for d, s in new.items()}},
        )
        if done.matched_count == 1:
            return "added"
    raise Unavailable(f"too much contention adding shares to epoch {epoch}")


def get_epoch(c: Collections, conversation: str, epoch: str) -> Epoch | None:
    doc = c.epochs.find_one({"_id": f"{conversation}:{epoch}"})
    if doc is None:
        return None
    return Epoch(
        conversation,
        epoch,
        doc["user"],
        doc["device"],
        tuple(sorted(doc.get("shares") or {})),
        doc["created_ts"],
    )


def epoch_check(c: Collections, conversation: str, epoch: str, users: Sequence[str]) -> EpochCheck:
    """:func:`get_epoch` and :func:`active_devices` in one thread hop."""
    active = tuple(active_devices(c, users)) if users else ()
    return EpochCheck(get_epoch(c, conversation, epoch), active)


def epoch_shares(
    c: Collections, conversation: str, epochs: Sequence[str], devices: Sequence[str]
) -> list[EpochShare]:
    ids = [f"{conversation}:{e}" for e in epochs]
    mine = set(devices)
    out = []
    for doc in c.epochs.find({"_id": {"$in": ids}}, sort=[("_id", ASCENDING)]):
        for to, share in sorted((doc.get("shares") or {}).items()):
            if to in mine:
                out.append(EpochShare(doc["epoch"], doc["user"], doc["device"], to, share))
    return out
