"""The end-to-end device directory's rules (issue 12, step 1): what a device
registration must be, and how its self-signature is checked.

A device (one browser profile, one app install) holds an Ed25519 signing key
and an X25519 key-agreement key. It registers their public halves under a
random device id, self-signed: ``self_sig`` is the Ed25519 signature, by
``sig_key``, over the UTF-8 bytes of::

    "chatd-e2e/v1 device\\n" + username + "\\n" + device + "\\n" + dh_key

with the keys as the base64url strings sent. A device's keys never change.
Plain functions; the service checks, the store keeps.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from chatd.core.errors import BadRequest

_DEVICE = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_DEVICE_NAME = 64
#: Devices one account may register (removed ones included: ids stay taken).
MAX_DEVICES = 32
SIGNED_PREFIX = "chatd-e2e/v1 device\n"


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    """A registration as sent (base64url strings), checked."""

    device: str
    sig_key: str
    dh_key: str
    name: str
    self_sig: str


def b64url(raw: object, size: int | None, what: str) -> bytes:
    """Decode base64url (padding optional) of exactly ``size`` bytes (any
    length when ``size`` is None), else BadRequest."""
    if not isinstance(raw, str) or not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", raw):
        raise BadRequest(f"'{what}' must be base64url")
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{what}' must be base64url") from None
    if size is not None and len(data) != size:
        raise BadRequest(f"'{what}' must hold {size} bytes")
    return data


def check_device_id(device: object) -> str:
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise BadRequest("a device id is 8-64 characters of A-Z a-z 0-9 _ -")
    return device


def signed_text(username: str, device: str, dh_key: str) -> bytes:
    return f"{SIGNED_PREFIX}{username}\n{device}\n{dh_key}".encode()


def check_registration(username: str, device: object, body: dict) -> DeviceKeys:
    """A registration body checked: the id, the two 32-byte public keys, a
    name, and a self-signature that verifies (else BadRequest)."""
    device = check_device_id(device)
    sig_key, dh_key, self_sig = body.get("sig_key"), body.get("dh_key"), body.get("self_sig")
    public = b64url(sig_key, 32, "sig_key")
    b64url(dh_key, 32, "dh_key")
    signature = b64url(self_sig, 64, "self_sig")
    # Checked above: base64url strings.
    sig_key, dh_key, self_sig = str(sig_key), str(dh_key), str(self_sig)
    name = body.get("name", "")
    if name is None:
        name = ""
    if not isinstance(name, str) or len(name) > MAX_DEVICE_NAME or not name.isprintable():
        raise BadRequest(f"'name' must be at most {MAX_DEVICE_NAME} printable characters")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            signature, signed_text(username, device, dh_key)
        )
    except (InvalidSignature, ValueError):
        raise BadRequest("the self-signature does not verify") from None
    return DeviceKeys(device, sig_key, dh_key, name, self_sig)
