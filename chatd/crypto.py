"""Encryption at rest: an AES-256-GCM keyring.

Each body is sealed with the active key and a fresh 96-bit nonce; the
associated data binds the ciphertext to its message id and conversation,
so a ciphertext copied onto another message fails to open. The key id is
stored with each message, so keys can rotate and old ones keep opening
what they sealed.

Keys come from ``CHATD_KEYS`` (``kid:base64key,…``; the active one is
``CHATD_ACTIVE_KEY`` or the last listed) or from a key file (JSON,
``{"active": kid, "keys": {kid: base64key}}``). In embedded mode the key
file is created in the data dir on first run, mode 0600. Keys are never
logged: ``repr`` shows only ids.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from chatd.core.model import Sealed
from chatd.files import create_secret_file, replace_secret_file

KEY_BYTES = 32
NONCE_BYTES = 12
_AAD_PREFIX = b"chatd/v1\x00"


class KeyringError(Exception):
    """The keyring could not be loaded, or a key is missing or wrong."""


def _aad(message_id: str, conversation: str) -> bytes:
    return _AAD_PREFIX + message_id.encode() + b"\x00" + conversation.encode()


@dataclass(frozen=True, repr=False)
class Keyring:
    keys: dict[str, bytes]
    active: str

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise KeyringError(f"active key '{self.active}' is not in the keyring")
        for kid, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key '{kid}' is {len(key)} bytes; AES-256 needs 32")
            if not kid or ":" in kid or "," in kid:
                raise KeyringError(f"key id '{kid}' must be non-empty without ':' or ','")

    def __repr__(self) -> str:
        return f"Keyring(active={self.active!r}, ids={sorted(self.keys)!r})"

    def seal(self, plaintext: str, message_id: str, conversation: str) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)
        ct = AESGCM(self.keys[self.active]).encrypt(
            nonce, plaintext.encode("utf-8"), _aad(message_id, conversation)
        )
        return Sealed(key_id=self.active, nonce=nonce, ciphertext=ct)

    def open(self, sealed: Sealed, message_id: str, conversation: str) -> str:
        key = self.keys.get(sealed.key_id)
        if key is None:
            raise KeyringError(f"no key '{sealed.key_id}' in the keyring")
        try:
            data = AESGCM(key).decrypt(
                sealed.nonce, sealed.ciphertext, _aad(message_id, conversation)
            )
        except InvalidTag:
            raise KeyringError(
                f"message {message_id} does not open with key '{sealed.key_id}'"
            ) from None
        return data.decode("utf-8")

    def with_new_key(self, kid: str | None = None) -> Keyring:
        """A keyring with one more key, made active (rotation)."""
        kid = kid or f"k{len(self.keys) + 1}-{secrets.token_hex(3)}"
        if kid in self.keys:
            raise KeyringError(f"key id '{kid}' already exists")
        return Keyring(keys={**self.keys, kid: secrets.token_bytes(KEY_BYTES)}, active=kid)


def _decode_key(kid: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"key '{kid}' is not valid base64") from None


def parse_keys_env(value: str, active: str | None) -> Keyring:
    keys: dict[str, bytes] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        kid, sep, text = part.partition(":")
        if not sep:
            raise KeyringError("CHATD_KEYS entries look like kid:base64key")
        keys[kid.strip()] = _decode_key(kid, text.strip())
    if not keys:
        raise KeyringError("CHATD_KEYS holds no keys")
    return Keyring(keys=keys, active=active or list(keys)[-1])


def load_key_file(path: Path) -> Keyring:
    try:
        doc = json.loads(path.read_text())
        keys = {kid: _decode_key(kid, text) for kid, text in doc["keys"].items()}
        return Keyring(keys=keys, active=doc["active"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyringError(f"cannot read key file {path}: {exc}") from None


def _key_file_text(ring: Keyring) -> str:
    doc = {
        "active": ring.active,
        "keys": {kid: base64.b64encode(key).decode() for kid, key in ring.keys.items()},
    }
    return json.dumps(doc, indent=2) + "\n"


def write_key_file(path: Path, ring: Keyring) -> None:
    """Replace the key file atomically (mode 0600)."""
    replace_secret_file(path, _key_file_text(ring))


def load_keyring(
    keys_env: str | None, active_env: str | None, key_file: Path, *, create: bool
) -> Keyring:
    """The keyring from the environment, else the key file (created if allowed)."""
    if keys_env:
        return parse_keys_env(keys_env, active_env)
    if key_file.exists():
        ring = load_key_file(key_file)
        if active_env:
            ring = Keyring(keys=ring.keys, active=active_env)
        return ring
    if not create:
        raise KeyringError(f"no keyring: set CHATD_KEYS or provide {key_file}")
    ring = Keyring(keys={"k1": secrets.token_bytes(KEY_BYTES)}, active="k1")
    # If another replica sharing the data dir created it first, use theirs.
    create_secret_file(key_file, _key_file_text(ring))
    return load_key_file(key_file)
