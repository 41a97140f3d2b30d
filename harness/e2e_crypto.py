"""The end-to-end formats of docs/e2e-crypto.md (v1), Python side: HPKE
shares of epoch keys, signed AES-256-GCM messages, the recipient's checks
and safety numbers. Plain functions over ``cryptography``; the test client
and the tests use them to produce and check the same bytes as the web
client.

HPKE (RFC 9180) is :mod:`harness.hpke`; its names are re-exported
here for the tests and clients that use them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness.hpke import (  # re-exported: the tests and clients use them from here
    N_ENC,
    HpkeContext,  # noqa: F401
    hpke_derive_key_pair,  # noqa: F401
    hpke_open,
    hpke_seal,
    hpke_setup_base_r,  # noqa: F401
    hpke_setup_base_s,  # noqa: F401
)

# -- encoding ---------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
#: Device and epoch ids: the fields of ``ad`` and ``info`` are joined by LF,
#: so an id must never hold one (nor anything outside this set).
_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(s: str) -> bytes:
    """Decode base64url, padding optional; raises ValueError if it is not."""
    if not isinstance(s, str) or not _B64URL.fullmatch(s):
        raise ValueError("not base64url")
    bare = s.rstrip("=")
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


class DecryptError(Exception):
    """A message that must not be shown; ``reason`` is the spec's text after
    "couldn't decrypt: " (e.g. "bad signature")."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"couldn't decrypt: {reason}")
        self.reason = reason


# -- epochs and shares ------------------------------------------------------

EPOCH_KEY_LEN = 32
SHARE_LEN = N_ENC + EPOCH_KEY_LEN + 16  # enc, the key, the AES-GCM tag


def new_epoch_id() -> str:
    """22 characters: base64url of 16 random bytes."""
    return b64url(secrets.token_bytes(16))


def new_epoch_key() -> bytes:
    return secrets.token_bytes(EPOCH_KEY_LEN)


def _check_id(value: str, what: str) -> str:
    """Raises ValueError: ids are joined by LF into signed and HPKE inputs,
    so one outside the id alphabet could make two inputs read alike."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be 8-64 characters of A-Z a-z 0-9 _ -")
    return value


def share_info(
    conversation: str, epoch: str, sender: str, sender_device: str, recipient_device: str
) -> bytes:
    """The HPKE ``info`` of a share."""
    return (
        f"chatd-e2e/v1 share\n{conversation}\n{epoch}\n{sender}\n"
        f"{sender_device}\n{recipient_device}"
    ).encode()


def seal_share(
    recipient_dh_key: str,
    *,
    conversation: str,
    epoch: str,
    sender: str,
    sender_device: str,
    recipient_device: str,
    epoch_key: bytes,
) -> str:
    """The epoch key sealed to one device's ``dh_key`` (base64url), 107
    characters. Raises ValueError on a malformed key, id or epoch key."""
    _check_id(epoch, "epoch")
    _check_id(sender_device, "sender_device")
    _check_id(recipient_device, "recipient_device")
    if len(epoch_key) != EPOCH_KEY_LEN:
        raise ValueError("an epoch key is 32 bytes")
    pk_r = unb64url(recipient_dh_key)
    if len(pk_r) != 32:
        raise ValueError("dh_key must be 32 bytes")
    info = share_info(conversation, epoch, sender, sender_device, recipient_device)
    enc, ct = hpke_seal(pk_r, info, b"", epoch_key)
    return b64url(enc + ct)


def open_share(
    dh: X25519PrivateKey,
    share: str,
    *,
    conversation: str,
    epoch: str,
    sender: str,
    sender_device: str,
    recipient_device: str,
) -> bytes:
    """The epoch key in ``share``. Raises DecryptError("bad key share") if
    it is malformed or does not open under this info (another epoch,
    conversation, sender or device)."""
    try:
        raw = unb64url(share)
    except ValueError:
        raise DecryptError("bad key share") from None
    if len(raw) != SHARE_LEN:
        raise DecryptError("bad key share")
    info = share_info(conversation, epoch, sender, sender_device, recipient_device)
    try:
        # 80 bytes in, so a share that opens holds exactly 32.
        return hpke_open(dh, raw[:N_ENC], info, b"", raw[N_ENC:])
    except ValueError:
        raise DecryptError("bad key share") from None


# -- messages ---------------------------------------------------------------

MAX_BODY_CHARS = 4000  # the plain rule (chatd.core.frames), in code points
IV_LEN = 12
TAG_LEN = 16
SIG_LEN = 64
KC_LEN = 32
_KC_PREFIX = b"chatd-e2e/v1 key\n"


def message_ad(conversation: str, sender: str, device: str, epoch: str) -> bytes:
    """The AES-GCM associated data of a message, also the head of what is signed."""
    return f"chatd-e2e/v1 msg\n{conversation}\n{sender}\n{device}\n{epoch}".encode()


def key_commitment(epoch_key: bytes) -> bytes:
    """``kc = SHA-256(utf8("chatd-e2e/v1 key\\n") ‖ epoch key)``, 32 bytes:
    what ties a message's signature to one epoch key (AES-GCM does not)."""
    return hashlib.sha256(_KC_PREFIX + epoch_key).digest()


def signed_bytes(ad: bytes, epoch_key: bytes, iv: bytes, ct: bytes) -> bytes:
    """What a message's ``sig`` signs: ``ad ‖ 0x00 ‖ kc ‖ iv ‖ ct``. The NUL
    ends ``ad`` (no id or username holds one) and ``kc`` and ``iv`` have
    fixed sizes, so no byte can pass from one field into the next."""
    if len(iv) != IV_LEN:
        raise ValueError("an iv is 12 bytes")
    return ad + b"\x00" + key_commitment(epoch_key) + iv + ct


def _check_epoch_key(epoch_key: object) -> bytes:
    if not isinstance(epoch_key, bytes | bytearray) or len(epoch_key) != EPOCH_KEY_LEN:
        raise ValueError("an epoch key is 32 bytes")
    return bytes(epoch_key)


def encrypt(
    epoch_key: bytes,
    sign: Ed25519PrivateKey,
    *,
    conversation: str,
    sender: str,
    device: str,
    epoch: str,
    plaintext: dict[str, Any],
) -> dict[str, Any]:
    """The ``e2e`` object of a message. Raises ValueError on a malformed
    epoch key or id."""
    _check_id(device, "device")
    _check_id(epoch, "epoch")
    epoch_key = _check_epoch_key(epoch_key)
    ad = message_ad(conversation, sender, device, epoch)
    iv = secrets.token_bytes(IV_LEN)
    pt = json.dumps(plaintext, ensure_ascii=False, separators=(",", ":")).encode()
    ct = AESGCM(epoch_key).encrypt(iv, pt, ad)
    sig = sign.sign(signed_bytes(ad, epoch_key, iv, ct))
    return {
        "v": 1,
        "device": device,
        "epoch": epoch,
        "iv": b64url(iv),
        "ct": b64url(ct),
        "sig": b64url(sig),
    }


@dataclass(frozen=True, slots=True)
class Fields:
    """An ``e2e`` object of the right shape (step 1), decoded."""

    device: str
    epoch: str
    iv: bytes
    ct: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class Verified:
    """An ``e2e`` object whose signature verified under ``epoch_key``
    (steps 1-3 passed)."""

    device: str
    epoch: str
    iv: bytes
    ct: bytes
    ad: bytes
    epoch_key: bytes


def parse(e2e: object) -> Fields:
    """Step 1, the shape: ``v`` 1, device and epoch ids, a 12-byte ``iv``, a
    ``ct`` of at least the 16-byte tag, a 64-byte ``sig``. Raises
    DecryptError("damaged message")."""
    if not isinstance(e2e, dict):
        raise DecryptError("damaged message")
    v = e2e.get("v")
    if isinstance(v, bool) or v != 1:  # 1 or 1.0 (JSON cannot tell them apart), not true
        raise DecryptError("damaged message")
    device, epoch = e2e.get("device"), e2e.get("epoch")
    if not (isinstance(device, str) and _ID.fullmatch(device)):
        raise DecryptError("damaged message")
    if not (isinstance(epoch, str) and _ID.fullmatch(epoch)):
        raise DecryptError("damaged message")
    try:
        iv, ct, sig = (unb64url(e2e.get(k)) for k in ("iv", "ct", "sig"))  # type: ignore[arg-type]
    except ValueError:
        raise DecryptError("damaged message") from None
    if len(iv) != IV_LEN or len(ct) < TAG_LEN or len(sig) != SIG_LEN:
        raise DecryptError("damaged message")
    return Fields(device, epoch, iv, ct, sig)


def sig_key_of(devices: list[dict[str, Any]], device: str) -> str:
    """Step 1: the ``sig_key`` of ``device`` in a sender's device list,
    removed devices included (their old messages still verify). Raises
    DecryptError("unknown device")."""
    for d in devices:
        if d.get("device") == device:
            return d["sig_key"]
    raise DecryptError("unknown device")


def _usable_key(epoch_key: bytes | None) -> bytes:
    """Step 2 for a key the caller already holds: None is "no key for this
    device", anything but 32 bytes "bad key share"."""
    if epoch_key is None:
        raise DecryptError("no key for this device")
    try:
        return _check_epoch_key(epoch_key)
    except ValueError:
        raise DecryptError("bad key share") from None


def _verify(
    sig_key: str, f: Fields, epoch_key: bytes, *, conversation: str, sender: str
) -> Verified:
    ad = message_ad(conversation, sender, f.device, f.epoch)
    try:
        public = Ed25519PublicKey.from_public_bytes(unb64url(sig_key))
        public.verify(f.sig, signed_bytes(ad, epoch_key, f.iv, f.ct))
    except (InvalidSignature, ValueError, TypeError):
        raise DecryptError("bad signature") from None
    return Verified(f.device, f.epoch, f.iv, f.ct, ad, epoch_key)


def verify(
    sig_key: str, e2e: dict[str, Any], *, conversation: str, sender: str, epoch_key: bytes
) -> Verified:
    """Step 3 (after step 1's shape): the signature over
    ``ad ‖ 0x00 ‖ kc ‖ iv ‖ ct``, with ``kc`` of ``epoch_key``, the key the
    recipient opened from its share (step 2). Raises DecryptError:
    "damaged message" (malformed object), "bad key share" (an epoch key
    that is not 32 bytes), "bad signature" (also: signed for another key)."""
    f = parse(e2e)
    key = _usable_key(epoch_key)
    return _verify(sig_key, f, key, conversation=conversation, sender=sender)


def decrypt(
    epoch_key: bytes | None,
    sig_key: str | None,
    e2e: dict[str, Any],
    *,
    conversation: str,
    sender: str,
) -> dict[str, Any]:
    """Steps 1-4 for a caller that holds the epoch key: the shape, then the
    signature under ``kc`` of ``epoch_key``, then AES-256-GCM, then a JSON
    object (its kind is :func:`check_kind`'s). Raises DecryptError, in this
    order: "damaged message" (malformed object), "unknown device"
    (``sig_key`` None), "no key for this device" (``epoch_key`` None), "bad
    key share" (an epoch key that is not 32 bytes), "bad signature",
    "damaged message" (no open, or not a UTF-8 JSON object)."""
    f = parse(e2e)
    if sig_key is None:
        raise DecryptError("unknown device")
    key = _usable_key(epoch_key)
    return _open_verified(_verify(sig_key, f, key, conversation=conversation, sender=sender))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _open_verified(v: Verified) -> dict[str, Any]:
    """Step 4 on a verified object; see :func:`decrypt`."""
    try:
        pt = AESGCM(v.epoch_key).decrypt(v.iv, v.ct, v.ad)
    except InvalidTag:
        raise DecryptError("damaged message") from None
    try:
        # Strict JSON, as the web client's JSON.parse reads it: no NaN or
        # Infinity, no byte-order mark (json.loads refuses one in a str).
        obj = json.loads(pt.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DecryptError("damaged message") from None
    if not isinstance(obj, dict):
        raise DecryptError("damaged message")
    return obj


def check_kind(plaintext: dict[str, Any], *, edit_of: str | None = None) -> str:
    """Step 5: the body of a message (``edit_of`` None) or of an edit of
    message ``edit_of``. Raises DecryptError("wrong kind") for another
    ``t``, another ``id``, or a body the plain rules refuse (1 to 4,000 code
    points, not all whitespace to ``str.strip``)."""
    if edit_of is None:
        if plaintext.get("t") != "msg":
            raise DecryptError("wrong kind")
    elif plaintext.get("t") != "edit" or plaintext.get("id") != edit_of:
        raise DecryptError("wrong kind")
    body = plaintext.get("body")
    if not isinstance(body, str) or len(body) > MAX_BODY_CHARS or not body.strip():
        raise DecryptError("wrong kind")
    return body


class ReplayGuard:
    """Step 6: a ``(device, epoch, iv)`` seen under one message id is
    refused under any other (the server could replay a ciphertext as a new
    message). Memory grows with the messages seen: fine for a test client."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, bytes], str] = {}

    def check(self, device: str, epoch: str, iv: str | bytes, message_id: str) -> None:
        """Raises DecryptError("replayed"). ``iv`` as raw bytes or as its
        base64url text (decoded first: padding must not make a new iv)."""
        raw = unb64url(iv) if isinstance(iv, str) else bytes(iv)
        seen = self._seen.setdefault((device, epoch, raw), message_id)
        if seen != message_id:
            raise DecryptError("replayed")


def read_message(
    e2e: dict[str, Any],
    *,
    conversation: str,
    sender: str,
    sender_devices: list[dict[str, Any]],
    dh: X25519PrivateKey,
    recipient_device: str,
    share: str | None,
    message_id: str,
    guard: ReplayGuard,
    edit_of: str | None = None,
) -> str:
    """The six recipient steps in the spec's order; the body that passed
    them all. ``share`` is this device's share of ``e2e["epoch"]`` (None if
    it has none). Raises DecryptError with the first step's reason; "no key
    for this device" stands for both texts of step 2 (whether the message
    predates the device is the client's call)."""
    f = parse(e2e)  # 1
    sig_key = sig_key_of(sender_devices, f.device)
    if share is None:  # 2
        raise DecryptError("no key for this device")
    epoch_key = open_share(
        dh,
        share,
        conversation=conversation,
        epoch=f.epoch,
        sender=sender,
        sender_device=f.device,
        recipient_device=recipient_device,
    )
    v = _verify(sig_key, f, epoch_key, conversation=conversation, sender=sender)  # 3
    body = check_kind(_open_verified(v), edit_of=edit_of)  # 4, 5
    guard.check(v.device, v.epoch, v.iv, message_id)  # 6
    return body


# -- safety numbers ---------------------------------------------------------

SAFETY_ITERATIONS = 5200  # one SHA-512 of the input, then 5,199 more


def _safety_digits(username: str, devices: list[dict[str, Any]]) -> str:
    active = sorted((d for d in devices if d.get("removed_ts") is None), key=lambda d: d["device"])
    text = f"chatd-e2e/v1 safety\n{username}\n" + "".join(
        f"{d['device']} {d['sig_key']} {d['dh_key']}\n" for d in active
    )
    data = text.encode()
    h = hashlib.sha512(data).digest()
    for _ in range(SAFETY_ITERATIONS - 1):
        h = hashlib.sha512(h + data).digest()
    return "".join(f"{int.from_bytes(h[5 * i : 5 * i + 5], 'big') % 100000:05d}" for i in range(6))


def safety_number(
    user_a: str, devices_a: list[dict[str, Any]], user_b: str, devices_b: list[dict[str, Any]]
) -> str:
    """60 digits: the smaller username's 30, then the other's. Devices are
    directory entries (``device``, ``sig_key``, ``dh_key``); those with a
    ``removed_ts`` are left out."""
    a, b = _safety_digits(user_a, devices_a), _safety_digits(user_b, devices_b)
    return a + b if user_a <= user_b else b + a


def format_safety_number(s: str) -> str:
    """12 groups of 5 digits, separated by spaces."""
    return " ".join(s[i : i + 5] for i in range(0, len(s), 5))
