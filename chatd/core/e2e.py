"""End-to-end conversations (issue 12): the server's side of the rules.

The server never decrypts anything here. It checks shapes (the ``e2e``
object of a ``send`` or ``edit``, epoch ids, sealed shares), decides whether
an epoch's shares cover the devices they must (:func:`coverage`), whether an
upload of shares may go into an epoch (:func:`judge_epoch_upload`, which
both stores call), whether an edit's content fits its conversation's mode
(:func:`edit_mismatch`, which both stores' event judgement calls), and keeps
an end-to-end message apart from a plain body in what it stores
(:func:`stored_text`, :func:`parse_stored`). The formats the clients use are
in ``docs/e2e-crypto.md``. Plain functions; the service and stores call them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from chatd.core.devices import b64url, check_device_id
from chatd.core.errors import BadRequest, TooLarge

VERSION = 1
#: The most characters of an ``e2e.ct`` (base64url): a 4,000-character body
#: of 4-byte characters in JSON, plus the tag, with room to spare.
MAX_CT_CHARS = 22_000
_EPOCH = re.compile(r"[A-Za-z0-9_-]{8,64}")
#: A share is HPKE's ``enc`` (32 bytes) and the sealed 32-byte key (48).
SHARE_BYTES = 80
#: Shares one ``PUT .../e2e/epochs/{epoch}`` may carry (send more in chunks).
MAX_SHARES_PER_PUT = 256
#: Epochs one ``GET .../e2e/shares?epochs=`` may name.
MAX_EPOCHS_PER_GET = 100

#: The ``reason`` of a plain ``body`` refused in an end-to-end conversation
#: (a ``bad_request``), and of an end-to-end ``edit`` refused in a plain one;
#: with the message each is answered with. A store answers these as
#: ``Appended.refused`` / ``EventResult.refused``.
E2E_REQUIRED = "e2e_required"
E2E_OFF = "e2e_off"
REFUSED: dict[str, str] = {
    E2E_REQUIRED: "this conversation is end-to-end: send 'e2e', not 'body'",
    E2E_OFF: "this conversation is not end-to-end: edit with 'body'",
}

# What the server stores for an end-to-end message, sealed at rest like any
# body: this mark, then the ``e2e`` object as JSON. A plain body that
# happens to begin with NUL is stored with one more NUL in front, so the two
# never mix up (bodies are otherwise stored exactly as sent).
_NUL = "\x00"
_E2E_MARK = "\x00e2e:"


def stored_text(*, body: str | None = None, e2e: Mapping[str, Any] | None = None) -> str:
    """The text the server seals at rest for a plain ``body`` or an ``e2e`` object."""
    if e2e is not None:
        return _E2E_MARK + orjson.dumps(e2e, option=orjson.OPT_SORT_KEYS).decode()
    if body is None:
        raise ValueError("a body or an e2e object")
    return _NUL + body if body.startswith(_NUL) else body


@dataclass(frozen=True, slots=True)
class Content:
    """What a stored text holds: a plain ``body`` or an ``e2e`` object."""

    body: str | None
    e2e: dict[str, Any] | None = None

    def fields(self) -> dict[str, Any]:
        """The wire's fields: ``{"body": ...}`` or ``{"e2e": {...}}``."""
        return {"e2e": self.e2e} if self.e2e is not None else {"body": self.body}


def split_stored(text: str) -> tuple[str | None, dict[str, Any] | None]:
    """The inverse of :func:`stored_text`: (body, None) or (None, e2e). On
    the delivery path of every message: a plain body that does not begin
    with NUL (all but a few) costs one comparison."""
    if text[:1] != _NUL:
        return text, None
    if text.startswith(_E2E_MARK):
        return None, orjson.loads(text[len(_E2E_MARK) :])
    return (text[1:] if text.startswith(_NUL + _NUL) else text), None


def parse_stored(text: str) -> Content:
    """:func:`split_stored` as a :class:`Content`."""
    return Content(*split_stored(text))


def check_epoch_id(epoch: object, *, cid: str | None = None) -> str:
    if not isinstance(epoch, str) or not _EPOCH.fullmatch(epoch):
        raise BadRequest("an epoch id is 8-64 characters of A-Z a-z 0-9 _ -", cid=cid)
    return epoch


def check_message(obj: object, *, cid: str | None = None) -> dict[str, Any]:
    """An ``e2e`` object of a ``send`` or ``edit``, checked for shape only
    (``v`` 1, the device and epoch ids, a 12-byte ``iv``, a ``ct`` of at
    most :data:`MAX_CT_CHARS` holding at least the 16-byte tag, a 64-byte
    ``sig``); returned with exactly those fields. BadRequest / TooLarge."""
    if not isinstance(obj, dict):
        raise BadRequest("'e2e' must be an object", cid=cid)
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise BadRequest(f"'e2e.v' must be {VERSION}", cid=cid)
    try:
        device = check_device_id(obj.get("device"))
        epoch = check_epoch_id(obj.get("epoch"))
        ct = obj.get("ct")
        if isinstance(ct, str) and len(ct) > MAX_CT_CHARS:
            raise TooLarge(f"'e2e.ct' is over {MAX_CT_CHARS} characters")
        b64url(obj.get("iv"), 12, "e2e.iv")
        b64url(obj.get("sig"), 64, "e2e.sig")
        if len(b64url(ct, None, "e2e.ct")) < 16:
            raise BadRequest("'e2e.ct' must hold at least the 16-byte tag")
    except (BadRequest, TooLarge) as exc:
        raise exc.with_cid(cid) from None
    return {
        "v": VERSION,
        "device": device,
        "epoch": epoch,
        "iv": obj["iv"],
        "ct": ct,
        "sig": obj["sig"],
    }


def check_shares(obj: object, *, sender_device: str) -> dict[str, str]:
    """The ``shares`` of an epoch upload: device id → base64url of
    :data:`SHARE_BYTES` bytes, at most :data:`MAX_SHARES_PER_PUT`, never to
    the sending device itself (it keeps its own key). Empty is fine: an
    epoch nobody else can read yet (no other device in the conversation).
    BadRequest."""
    if not isinstance(obj, dict):
        raise BadRequest("'shares' must be an object of device id to sealed key")
    if len(obj) > MAX_SHARES_PER_PUT:
        raise BadRequest(f"at most {MAX_SHARES_PER_PUT} shares per request; send the rest after")
    out: dict[str, str] = {}
    for device, share in obj.items():
        check_device_id(device)
        if device == sender_device:
            raise BadRequest("no share for the sending device itself")
        b64url(share, SHARE_BYTES, f"shares.{device}")
        out[device] = share
    return out


def check_epoch_list(raw: str | None) -> list[str]:
    """``?epochs=a,b``: the epoch ids named, deduplicated, at most
    :data:`MAX_EPOCHS_PER_GET`."""
    names = [e for e in (raw or "").split(",") if e]
    if not names:
        raise BadRequest("'epochs' names one or more epoch ids, comma-separated")
    if len(names) > MAX_EPOCHS_PER_GET:
        raise BadRequest(f"at most {MAX_EPOCHS_PER_GET} epochs per request")
    return list(dict.fromkeys(check_epoch_id(e) for e in names))


def coverage(
    recipients: Iterable[str], active: Iterable[str], sender_device: str
) -> tuple[list[str], list[str]]:
    """(missing, extra) of an epoch whose shares go to ``recipients``, when
    the members' active devices are ``active``: every active device but the
    sending one must have a share (missing: those without), and no share may
    go to a device that is removed or no longer a member's (extra)."""
    want = set(active) - {sender_device}
    have = set(recipients)
    return sorted(want - have), sorted(have - want)


def edit_mismatch(*, sealed: bool, e2e: bool) -> str | None:
    """Why an edit may not go into a conversation, judged against its mode
    as stored: a plain edit in an end-to-end conversation is
    :data:`E2E_REQUIRED`, an end-to-end (``sealed``) edit in a plain one
    :data:`E2E_OFF` (only a ``send`` switches a conversation); None if the
    edit fits."""
    if e2e and not sealed:
        return E2E_REQUIRED
    if sealed and not e2e:
        return E2E_OFF
    return None


@dataclass(frozen=True, slots=True)
class EpochUpload:
    """What uploading shares into an epoch does: ``outcome`` is ``created``
    (a new epoch), ``added`` (shares added to the same device's epoch) or
    ``conflict`` (nothing changes); ``new`` are the shares to store (those
    the epoch does not hold yet; empty on a conflict)."""

    outcome: str
    new: dict[str, str]


def judge_epoch_upload(
    maker: tuple[str, str] | None,
    have: Mapping[str, str],
    user: str,
    device: str,
    shares: Mapping[str, str],
) -> EpochUpload:
    """May (``user``, ``device``) upload ``shares`` (recipient device ->
    sealed key) into an epoch made by ``maker`` (user, device; None: no such
    epoch yet) that holds the shares ``have``? The rules: an epoch belongs
    to the one sending device that made it (another device, or another
    user, is a conflict), and a share is written once (another share for a
    recipient that has one is a conflict; the same one again is fine, so a
    retried chunk is ``added``). Both stores call this inside their write
    and do what it says."""
    if maker is not None and tuple(maker) != (user, device):
        return EpochUpload("conflict", {})
    if any(have.get(d, s) != s for d, s in shares.items()):
        return EpochUpload("conflict", {})
    new = {d: s for d, s in shares.items() if d not in have}
    return EpochUpload("created" if maker is None else "added", new)
