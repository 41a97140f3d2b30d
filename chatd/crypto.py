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
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from chatd.core.model import Sealed
from chatd.files import create_secret_file, replace_secret_file

log = logging.getLogger("chatd.keys")

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
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise KeyringError(f"active key '{self.active}' is not in the keyring")
        for kid, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key '{kid}' is {len(key)} bytes; AES-256 needs 32")
            if not kid or ":" in kid or "," in kid:
                raise KeyringError(f"key id '{kid}' must be non-empty without ':' or ','")
        # One cipher object per key, made once: seal and open run per message.
        object.__setattr__(self, "_ciphers", {kid: AESGCM(key) for kid, key in self.keys.items()})

    def __repr__(self) -> str:
        return f"Keyring(active={self.active!r}, ids={sorted(self.keys)!r})"

    def seal(self, plaintext: str, message_id: str, conversation: str) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)
        ct = self._ciphers[self.active].encrypt(
            nonce, plaintext.encode("utf-8"), _aad(message_id, conversation)
        )
        return Sealed(key_id=self.active, nonce=nonce, ciphertext=ct)

    def open(self, sealed: Sealed, message_id: str, conversation: str) -> str:
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise KeyringError(f"no key '{sealed.key_id}' in the keyring")
        try:
            data = cipher.decrypt(sealed.nonce, sealed.ciphertext, _aad(message_id, conversation))
        except InvalidTag:
            raise KeyringError(
                f"message {message_id} does not open with key '{sealed.key_id}'"
            ) from None
        return data.decode("utf-8")

    def without(self, kid: str) -> Keyring:
        """A keyring without key ``kid`` (retiring it); the active key stays."""
        if kid not in self.keys:
            raise KeyringError(f"no key '{kid}' in the keyring")
        if kid == self.active:
            raise KeyringError(f"key '{kid}' is the active key")
        return Keyring(keys={k: v for k, v in self.keys.items() if k != kid}, active=self.active)

    def with_new_key(self, kid: str | None = None) -> Keyring:
        """A keyring with one more key, made active (rotation)."""
        kid = kid or f"k{len(self.keys) + 1}-{secrets.token_hex(3)}"
        if kid in self.keys:
            raise KeyringError(f"key id '{kid}' already exists")
        return Keyring(keys={**self.keys, kid: secrets.token_bytes(KEY_BYTES)}, active=kid)


class Keys(Protocol):
    """What the service needs from a keyring: :class:`Keyring` or :class:`LiveKeyring`."""

    @property
    def active(self) -> str: ...

    def seal(self, plaintext: str, message_id: str, conversation: str) -> Sealed: ...

    def open(self, sealed: Sealed, message_id: str, conversation: str) -> str: ...


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class LiveKeyring:
    """The keyring of a running chatd, following its key file.

    It seals with the file's active key and opens with any key in the file.
    :meth:`refresh` re-reads the file when its inode, size or mtime changed
    (one ``stat`` otherwise, so it is cheap to call often): the server calls
    it every second and on SIGHUP, so ``chatctl keys rotate`` reaches every
    replica without a restart. Opening a body sealed with a key id this ring
    does not know refreshes at once, so a replica opens what another replica
    sealed with a key it picked up a moment earlier. A file that cannot be
    read, or is invalid, is logged and the current keys are kept.

    Without a path (keys from ``CHATD_KEYS``) it is a fixed keyring.
    ``active_override`` (``CHATD_ACTIVE_KEY``) wins over the file's choice.
    """

    def __init__(
        self, ring: Keyring, path: Path | None = None, active_override: str | None = None
    ) -> None:
        self.ring = ring
        self.path = path
        self.active_override = active_override or None
        # Unknown until the first refresh reads the file again: a rotation that
        # lands between loading ``ring`` and building this object is not missed.
        self._seen: tuple[int, int, int] | None = None
        self.reloads = 0

    def __repr__(self) -> str:
        return f"LiveKeyring({self.ring!r}, path={self.path})"

    @property
    def active(self) -> str:
        return self.ring.active

    @property
    def keys(self) -> dict[str, bytes]:
        return self.ring.keys

    def seal(self, plaintext: str, message_id: str, conversation: str) -> Sealed:
        return self.ring.seal(plaintext, message_id, conversation)

    def open(self, sealed: Sealed, message_id: str, conversation: str) -> str:
        if sealed.key_id not in self.ring.keys:
            self.refresh()
        return self.ring.open(sealed, message_id, conversation)

    def refresh(self) -> bool:
        """Re-read the key file if it changed on disk; True if the keys changed."""
        if self.path is None:
            return False
        seen = _signature(self.path)
        if seen is None or seen == self._seen:
            return False
        self._seen = seen
        try:
            ring = load_key_file(self.path)
            if self.active_override:
                ring = Keyring(keys=ring.keys, active=self.active_override)
        except KeyringError as exc:
            log.error(
                "key file changed but cannot be used; keeping the keys in use",
                extra={"reason": str(exc)},
            )
            return False
        if ring.keys == self.ring.keys and ring.active == self.ring.active:
            return False
        self.ring = ring
        self.reloads += 1
        log.info("keyring reloaded", extra={"active": ring.active, "keys": sorted(ring.keys)})
        return True


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


def keys_env_value(ring: Keyring) -> str:
    """The ``CHATD_KEYS`` value that gives ``ring`` (the active key listed last)."""
    order = [k for k in ring.keys if k != ring.active] + [ring.active]
    return ",".join(f"{kid}:{base64.b64encode(ring.keys[kid]).decode()}" for kid in order)


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


#: Checked by the type checker (``make lint``): both keyrings are Keys.
_ARE_KEYS: tuple[type[Keys], ...] = (Keyring, LiveKeyring)
