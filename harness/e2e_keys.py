"""A test device's keys for the end-to-end directory (Python side): an
Ed25519 signing key and an X25519 key-agreement key, and the registration
body the server expects (keys as base64url, self-signed)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from chatd.core.devices import signed_text
from harness.e2e_crypto import b64url


def _raw(public: object) -> bytes:
    return public.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@dataclass
class KeyedDevice:
    username: str
    device: str = field(default_factory=lambda: "py-" + secrets.token_urlsafe(9))
    name: str = "python"
    sign: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    dh: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    @property
    def sig_key(self) -> str:
        return b64url(_raw(self.sign.public_key()))

    @property
    def dh_key(self) -> str:
        return b64url(_raw(self.dh.public_key()))

    def registration(self) -> dict[str, str]:
        """The body of ``PUT /api/e2e/devices/{device}``."""
        sig = self.sign.sign(signed_text(self.username, self.device, self.dh_key))
        return {
            "sig_key": self.sig_key,
            "dh_key": self.dh_key,
            "name": self.name,
            "self_sig": b64url(sig),
        }

    def public(self, removed_ts: int | None = None) -> dict[str, object]:
        """This device as ``GET /api/users/{name}/devices`` lists it (less
        ``created_ts``, which only the server knows)."""
        return {"device": self.device, **self.registration(), "removed_ts": removed_ts}
