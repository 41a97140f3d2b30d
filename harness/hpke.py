"""HPKE (RFC 9180), mode_base, one suite: DHKEM(X25519, HKDF-SHA256) /
HKDF-SHA256 / AES-128-GCM, written out from the X25519, HKDF and AES-GCM
primitives of ``cryptography``.

Why not ``cryptography``'s own ``hpke.Suite``: its public API takes no
associated data and no fixed ephemeral key, so it could not be checked
against RFC 9180's known answers (which all carry an ``aad``); and
setup.cfg allows ``cryptography`` 42, which has no HPKE at all. The tests
check this implementation against those answers (Appendix A.1.1) and
against ``hpke.Suite`` where it exists.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

_KEM_ID, _KDF_ID, _AEAD_ID = 0x0020, 0x0001, 0x0001
_KEM_SUITE = b"KEM" + _KEM_ID.to_bytes(2, "big")
_HPKE_SUITE = (
    b"HPKE" + _KEM_ID.to_bytes(2, "big") + _KDF_ID.to_bytes(2, "big") + _AEAD_ID.to_bytes(2, "big")
)
_MODE_BASE = 0x00
_N_SECRET = 32  # Nsecret of the KEM, Nh of HKDF-SHA256
_N_K, _N_N = 16, 12  # AES-128-GCM key and nonce sizes
N_ENC = 32  # an X25519 public key


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    # HKDF-Extract is HMAC(salt, ikm); an empty salt is HMAC's zero key,
    # which is what RFC 5869 asks for.
    return hmac.new(salt, b"HPKE-v1" + suite + label + ikm, hashlib.sha256).digest()


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled = length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info
    return HKDFExpand(hashes.SHA256(), length, labeled).derive(prk)


def _dh(sk: X25519PrivateKey, pk: X25519PublicKey) -> bytes:
    # cryptography refuses an all-zero shared secret (a small-order point),
    # the check RFC 9180 section 7.1.4 requires; it raises ValueError.
    return sk.exchange(pk)


def _shared_secret(dh: bytes, enc: bytes, pk_rm: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + pk_rm, _N_SECRET)


def hpke_derive_key_pair(ikm: bytes) -> X25519PrivateKey:
    """DeriveKeyPair of DHKEM(X25519, HKDF-SHA256) (RFC 9180 7.1.3)."""
    dkp_prk = _labeled_extract(_KEM_SUITE, b"", b"dkp_prk", ikm)
    return X25519PrivateKey.from_private_bytes(_labeled_expand(_KEM_SUITE, dkp_prk, b"sk", b"", 32))


@dataclass(frozen=True, slots=True)
class HpkeContext:
    """An HPKE encryption context (RFC 9180 5.1): what KeySchedule made."""

    shared_secret: bytes
    key: bytes
    base_nonce: bytes
    exporter_secret: bytes

    def _nonce(self, seq: int) -> bytes:
        return (int.from_bytes(self.base_nonce, "big") ^ seq).to_bytes(_N_N, "big")

    def seal(self, aad: bytes, pt: bytes, seq: int = 0) -> bytes:
        return AESGCM(self.key).encrypt(self._nonce(seq), pt, aad)

    def open(self, aad: bytes, ct: bytes, seq: int = 0) -> bytes:
        """Raises InvalidTag if ``ct`` does not open."""
        return AESGCM(self.key).decrypt(self._nonce(seq), ct, aad)

    def export(self, exporter_context: bytes, length: int) -> bytes:
        return _labeled_expand(_HPKE_SUITE, self.exporter_secret, b"sec", exporter_context, length)


def _key_schedule(shared_secret: bytes, info: bytes) -> HpkeContext:
    # Base mode: no PSK, so psk and psk_id are empty.
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = bytes([_MODE_BASE]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    return HpkeContext(
        shared_secret=shared_secret,
        key=_labeled_expand(_HPKE_SUITE, secret, b"key", context, _N_K),
        base_nonce=_labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, _N_N),
        exporter_secret=_labeled_expand(_HPKE_SUITE, secret, b"exp", context, _N_SECRET),
    )


def hpke_setup_base_s(
    pk_r: bytes, info: bytes, *, ephemeral: X25519PrivateKey | None = None
) -> tuple[bytes, HpkeContext]:
    """SetupBaseS: (enc, context). ``ephemeral`` fixes skE, for known
    answers only. Raises ValueError if ``pk_r`` is not a usable X25519 key."""
    sk_e = X25519PrivateKey.generate() if ephemeral is None else ephemeral
    enc = sk_e.public_key().public_bytes_raw()
    dh = _dh(sk_e, X25519PublicKey.from_public_bytes(pk_r))
    return enc, _key_schedule(_shared_secret(dh, enc, pk_r), info)


def hpke_setup_base_r(sk_r: X25519PrivateKey | bytes, enc: bytes, info: bytes) -> HpkeContext:
    """SetupBaseR. Raises ValueError if ``enc`` or ``sk_r`` is malformed or
    the shared secret is all zero."""
    if isinstance(sk_r, bytes):
        sk_r = X25519PrivateKey.from_private_bytes(sk_r)
    if len(enc) != N_ENC:
        raise ValueError("enc must be 32 bytes")
    dh = _dh(sk_r, X25519PublicKey.from_public_bytes(enc))
    return _key_schedule(_shared_secret(dh, enc, sk_r.public_key().public_bytes_raw()), info)


def hpke_seal(pk_r: bytes, info: bytes, aad: bytes, pt: bytes) -> tuple[bytes, bytes]:
    """SealBase: (enc, ct), one Seal per setup (sequence number 0). Raises
    ValueError if ``pk_r`` is not a usable X25519 public key."""
    enc, context = hpke_setup_base_s(pk_r, info)
    return enc, context.seal(aad, pt)


def hpke_open(
    sk_r: X25519PrivateKey | bytes, enc: bytes, info: bytes, aad: bytes, ct: bytes
) -> bytes:
    """OpenBase at sequence number 0. Raises ValueError when it does not
    open, for whatever cause (malformed enc or key, wrong info/aad, a
    damaged ct): callers have one thing to catch."""
    try:
        return hpke_setup_base_r(sk_r, enc, info).open(aad, ct)
    except InvalidTag:
        raise ValueError("HPKE ciphertext does not open") from None
