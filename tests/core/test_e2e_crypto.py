"""The end-to-end formats of docs/e2e-crypto.md, Python side: HPKE against
RFC 9180's known answers, shares, signed messages and every refusal the
recipient steps name (in the spec's order), the replay guard and safety
numbers."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from harness import e2e_crypto as e2e
from harness.e2e_crypto import DecryptError
from harness.e2e_keys import KeyedDevice

ROOT = Path(__file__).resolve().parents[2]

# -- RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
# AES-128-GCM, mode_base ("Base Setup Information", "Encryptions" and
# "Exported Values"), copied from the CFRG draft's source text that became
# the RFC (github.com/cfrg/draft-irtf-cfrg-hpke, draft-irtf-cfrg-hpke.md).

RFC_INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")  # "Ode on a Grecian Urn"
RFC_IKM_E = bytes.fromhex("7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234")
RFC_PK_EM = bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
RFC_SK_EM = bytes.fromhex("52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736")
RFC_IKM_R = bytes.fromhex("6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037")
RFC_PK_RM = bytes.fromhex("3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d")
RFC_SK_RM = bytes.fromhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8")
RFC_ENC = bytes.fromhex("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
RFC_SHARED = bytes.fromhex("fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc")
RFC_AEAD_KEY = bytes.fromhex("4531685d41d65f03dc48f6b8302c05b0")
RFC_BASE_NONCE = bytes.fromhex("56d890e5accaaf011cff4b7d")
RFC_EXPORTER = bytes.fromhex("45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8")
RFC_PT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
# (sequence number, aad, nonce, ct)
RFC_ENCRYPTIONS = [
    (
        0,
        "436f756e742d30",
        "56d890e5accaaf011cff4b7d",
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a9"
        "6d8770ac83d07bea87e13c512a",
    ),
    (
        1,
        "436f756e742d31",
        "56d890e5accaaf011cff4b7c",
        "af2d7e9ac9ae7e270f46ba1f975be53c09f8d875bdc8535458c2494e8a6eab25"
        "1c03d0c22a56b8ca42c2063b84",
    ),
    (
        2,
        "436f756e742d32",
        "56d890e5accaaf011cff4b7f",
        "498dfcabd92e8acedc281e85af1cb4e3e31c7dc394a1ca20e173cb7251649158"
        "8d96a19ad4a683518973dcc180",
    ),
    (
        4,
        "436f756e742d34",
        "56d890e5accaaf011cff4b79",
        "583bd32bc67a5994bb8ceaca813d369bca7b2a42408cddef5e22f880b631215a"
        "09fc0012bc69fccaa251c0246d",
    ),
    (
        255,
        "436f756e742d323535",
        "56d890e5accaaf011cff4b82",
        "7175db9717964058640a3a11fb9007941a5d1757fda1a6935c805c21af32505b"
        "f106deefec4a49ac38d71c9e0a",
    ),
    (
        256,
        "436f756e742d323536",
        "56d890e5accaaf011cff4a7d",
        "957f9800542b0b8891badb026d79cc54597cb2d225b54c00c5238c25d05c30e3"
        "fbeda97d2e0e1aba483a2df9f2",
    ),
]
# (exporter_context, L, exported_value)
RFC_EXPORTS = [
    ("", 32, "3853fe2b4035195a573ffc53856e77058e15d9ea064de3e59f4961d0095250ee"),
    ("00", 32, "2e8f0b54673c7029649d4eb9d5e33bf1872cf76d623ff164ac185da9e88c21a5"),
    (
        "54657374436f6e74657874",
        32,
        "e9e43065102c3836401bed8c3c3c75ae46be1639869391d62c61f1ec7af54931",
    ),
]


def test_rfc9180_open_of_sequence_0():
    _, aad, _, ct = RFC_ENCRYPTIONS[0]
    for sk_r in (RFC_SK_RM, X25519PrivateKey.from_private_bytes(RFC_SK_RM)):
        assert e2e.hpke_open(sk_r, RFC_ENC, RFC_INFO, bytes.fromhex(aad), bytes.fromhex(ct)) == (
            RFC_PT
        )


def test_rfc9180_derive_key_pair():
    for ikm, sk, pk in ((RFC_IKM_E, RFC_SK_EM, RFC_PK_EM), (RFC_IKM_R, RFC_SK_RM, RFC_PK_RM)):
        derived = e2e.hpke_derive_key_pair(ikm)
        assert derived.private_bytes_raw() == sk
        assert derived.public_key().public_bytes_raw() == pk


def test_rfc9180_setup_with_the_vector_ephemeral_key():
    ephemeral = X25519PrivateKey.from_private_bytes(RFC_SK_EM)
    enc, sender = e2e.hpke_setup_base_s(RFC_PK_RM, RFC_INFO, ephemeral=ephemeral)
    receiver = e2e.hpke_setup_base_r(RFC_SK_RM, enc, RFC_INFO)
    assert enc == RFC_ENC
    for context in (sender, receiver):
        assert context.shared_secret == RFC_SHARED
        assert context.key == RFC_AEAD_KEY
        assert context.base_nonce == RFC_BASE_NONCE
        assert context.exporter_secret == RFC_EXPORTER


@pytest.mark.parametrize(("seq", "aad", "nonce", "ct"), RFC_ENCRYPTIONS)
def test_rfc9180_encryptions(seq, aad, nonce, ct):
    context = e2e.hpke_setup_base_r(RFC_SK_RM, RFC_ENC, RFC_INFO)
    assert context._nonce(seq) == bytes.fromhex(nonce)
    assert context.seal(bytes.fromhex(aad), RFC_PT, seq) == bytes.fromhex(ct)
    assert context.open(bytes.fromhex(aad), bytes.fromhex(ct), seq) == RFC_PT


@pytest.mark.parametrize(("exporter_context", "length", "value"), RFC_EXPORTS)
def test_rfc9180_exports(exporter_context, length, value):
    context = e2e.hpke_setup_base_r(RFC_SK_RM, RFC_ENC, RFC_INFO)
    assert context.export(bytes.fromhex(exporter_context), length) == bytes.fromhex(value)


def test_hpke_round_trip_and_refusals():
    sk = X25519PrivateKey.generate()
    pk = sk.public_key().public_bytes_raw()
    enc, ct = e2e.hpke_seal(pk, b"info", b"aad", b"hello")
    assert (len(enc), len(ct)) == (32, 5 + 16)
    assert e2e.hpke_open(sk, enc, b"info", b"aad", ct) == b"hello"
    damaged = bytes([ct[0] ^ 1]) + ct[1:]
    for args in (
        (sk, enc, b"other", b"aad", ct),
        (sk, enc, b"info", b"other", ct),
        (sk, enc, b"info", b"aad", damaged),
        (X25519PrivateKey.generate(), enc, b"info", b"aad", ct),
        (sk, enc[:31], b"info", b"aad", ct),
        (sk, bytes(32), b"info", b"aad", ct),  # a small-order point: all-zero DH
    ):
        with pytest.raises(ValueError):
            e2e.hpke_open(*args)


def test_hpke_agrees_with_cryptography_own_suite():
    hpke = pytest.importorskip("cryptography.hazmat.primitives.hpke")
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    sk = X25519PrivateKey.generate()
    enc, ct = e2e.hpke_seal(sk.public_key().public_bytes_raw(), b"info", b"", b"ours")
    assert suite.decrypt(enc + ct, sk, info=b"info") == b"ours"
    theirs = suite.encrypt(b"theirs", sk.public_key(), info=b"info")
    assert e2e.hpke_open(sk, theirs[:32], b"info", b"", theirs[32:]) == b"theirs"


# -- encoding and ids --------------------------------------------------------


def test_b64url_padding_is_optional_on_input():
    assert e2e.b64url(b"\xfb\xff") == "-_8"
    assert e2e.unb64url("-_8") == e2e.unb64url("-_8=") == b"\xfb\xff"
    for bad in ("+/8", "a b", "abc==="):
        with pytest.raises(ValueError):
            e2e.unb64url(bad)


def test_new_epochs():
    epoch = e2e.new_epoch_id()
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", epoch)
    assert epoch != e2e.new_epoch_id()
    assert len(e2e.new_epoch_key()) == 32


# -- shares ------------------------------------------------------------------

CONV = "g:team"
ALICE, BOB = "alice", "bob"
WHERE = {
    "conversation": CONV,
    "epoch": "epoch-0001",
    "sender": ALICE,
    "sender_device": "alice-phone",
    "recipient_device": "bob-laptop",
}


def test_share_info_is_the_spec_text():
    assert e2e.share_info(**WHERE) == (
        b"chatd-e2e/v1 share\ng:team\nepoch-0001\nalice\nalice-phone\nbob-laptop"
    )


def test_a_share_opens_for_its_device():
    bob = KeyedDevice(BOB, device="bob-laptop")
    epoch_key = e2e.new_epoch_key()
    share = e2e.seal_share(bob.dh_key, epoch_key=epoch_key, **WHERE)
    assert len(share) == 107 and re.fullmatch(r"[A-Za-z0-9_-]+", share)
    assert e2e.open_share(bob.dh, share, **WHERE) == epoch_key
    assert e2e.open_share(bob.dh, share + "=", **WHERE) == epoch_key  # padding accepted


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("conversation", "g:other"),
        ("epoch", "epoch-0002"),
        ("sender", "mallory"),
        ("sender_device", "alice-laptop"),
        ("recipient_device", "bob-phone-1"),
    ],
)
def test_a_share_moved_elsewhere_does_not_open(field, other):
    bob = KeyedDevice(BOB, device="bob-laptop")
    share = e2e.seal_share(bob.dh_key, epoch_key=e2e.new_epoch_key(), **WHERE)
    with pytest.raises(DecryptError) as caught:
        e2e.open_share(bob.dh, share, **{**WHERE, field: other})
    assert caught.value.reason == "bad key share"


def test_a_damaged_or_foreign_share_does_not_open():
    bob = KeyedDevice(BOB, device="bob-laptop")
    share = e2e.seal_share(bob.dh_key, epoch_key=e2e.new_epoch_key(), **WHERE)
    raw = e2e.unb64url(share)
    flipped = e2e.b64url(raw[:40] + bytes([raw[40] ^ 1]) + raw[41:])
    for dh, bad in (
        (bob.dh, flipped),
        (bob.dh, share[:-4]),
        (bob.dh, "not a share!"),
        (X25519PrivateKey.generate(), share),  # sealed to another device
    ):
        with pytest.raises(DecryptError) as caught:
            e2e.open_share(dh, bad, **WHERE)
        assert caught.value.reason == "bad key share"


def test_sealing_refuses_what_would_blur_the_info():
    bob = KeyedDevice(BOB, device="bob-laptop")
    for change in ({"epoch": "epoch\n0001"}, {"recipient_device": "short"}):
        with pytest.raises(ValueError):
            e2e.seal_share(bob.dh_key, epoch_key=e2e.new_epoch_key(), **{**WHERE, **change})
    with pytest.raises(ValueError):
        e2e.seal_share(bob.dh_key, epoch_key=bytes(16), **WHERE)


# -- messages ----------------------------------------------------------------


@pytest.fixture
def phone():
    return KeyedDevice(ALICE, device="alice-phone")


def _send(phone: KeyedDevice, epoch_key: bytes, plaintext: dict, epoch: str = "epoch-0001"):
    return e2e.encrypt(
        epoch_key,
        phone.sign,
        conversation=CONV,
        sender=ALICE,
        device=phone.device,
        epoch=epoch,
        plaintext=plaintext,
    )


def _reason(call) -> str:
    with pytest.raises(DecryptError) as caught:
        call()
    return caught.value.reason


def _kc(epoch_key: bytes) -> bytes:
    """kc, written out from the spec (not through e2e_crypto)."""
    return hashlib.sha256(b"chatd-e2e/v1 key\n" + epoch_key).digest()


def _signed_by_hand(ad: bytes, epoch_key: bytes, iv: bytes, ct: bytes) -> bytes:
    return ad + b"\x00" + _kc(epoch_key) + iv + ct


def _hand_made(phone: KeyedDevice, epoch_key: bytes, iv: bytes, ct: bytes, **over) -> dict:
    """An e2e object of epoch-0001 signed by ``phone`` over the spec's bytes."""
    ad = e2e.message_ad(CONV, ALICE, phone.device, "epoch-0001")
    sig = phone.sign.sign(_signed_by_hand(ad, epoch_key, iv, ct))
    obj = {"v": 1, "device": phone.device, "epoch": "epoch-0001"}
    return {**obj, "iv": e2e.b64url(iv), "ct": e2e.b64url(ct), "sig": e2e.b64url(sig), **over}


def test_message_ad_is_the_spec_text():
    assert e2e.message_ad(CONV, ALICE, "alice-phone", "epoch-0001") == (
        b"chatd-e2e/v1 msg\ng:team\nalice\nalice-phone\nepoch-0001"
    )


def test_a_message_round_trips(phone):
    epoch_key = e2e.new_epoch_key()
    obj = _send(phone, epoch_key, {"t": "msg", "body": "héllo ✓"})
    assert set(obj) == {"v", "device", "epoch", "iv", "ct", "sig"}
    assert (obj["v"], obj["device"], obj["epoch"]) == (1, "alice-phone", "epoch-0001")
    assert len(e2e.unb64url(obj["iv"])) == 12 and len(e2e.unb64url(obj["sig"])) == 64
    plaintext = e2e.decrypt(epoch_key, phone.sig_key, obj, conversation=CONV, sender=ALICE)
    assert plaintext == {"t": "msg", "body": "héllo ✓"}
    assert e2e.check_kind(plaintext) == "héllo ✓"
    # "v" as JSON's 1.0 is the same number (the web client cannot tell them apart).
    assert e2e.decrypt(epoch_key, phone.sig_key, {**obj, "v": 1.0}, conversation=CONV, sender=ALICE)


def test_the_bytes_are_the_spec_bytes(phone):
    """Rebuilt by hand from the spec: ct is AES-256-GCM over the JSON under
    ad; the signature is over ad ‖ 0x00 ‖ kc ‖ iv ‖ ct, kc the SHA-256 of
    "chatd-e2e/v1 key\\n" ‖ epoch key."""
    epoch_key = e2e.new_epoch_key()
    obj = _send(phone, epoch_key, {"t": "msg", "body": "x"})
    ad = b"chatd-e2e/v1 msg\ng:team\nalice\nalice-phone\nepoch-0001"
    iv, ct, sig = (e2e.unb64url(obj[k]) for k in ("iv", "ct", "sig"))
    assert json.loads(AESGCM(epoch_key).decrypt(iv, ct, ad)) == {"t": "msg", "body": "x"}
    kc = hashlib.sha256(b"chatd-e2e/v1 key\n" + epoch_key).digest()
    phone.sign.public_key().verify(sig, ad + b"\x00" + kc + iv + ct)  # raises if not
    assert e2e.key_commitment(epoch_key) == kc
    assert e2e.signed_bytes(ad, epoch_key, iv, ct) == ad + b"\x00" + kc + iv + ct


VECTOR = json.loads((ROOT / "web" / "test" / "e2e-message-vector.json").read_text("utf-8"))


def test_the_fixed_message_vector(monkeypatch):
    """web/test/e2e-message-vector.json, which the web client's tests check
    too: one message of fixed keys, iv and plaintext, built by hand."""
    v = VECTOR
    seed, epoch_key = bytes.fromhex(v["sign_seed"]), bytes.fromhex(v["epoch_key"])
    sign = Ed25519PrivateKey.from_private_bytes(seed)
    iv, ct, sig = (e2e.unb64url(v["e2e"][k]) for k in ("iv", "ct", "sig"))
    where = {"conversation": v["conversation"], "sender": v["sender"]}
    ad = e2e.message_ad(v["conversation"], v["sender"], v["device"], v["epoch"])
    assert ad.hex() == v["ad"]
    assert _kc(epoch_key).hex() == e2e.key_commitment(epoch_key).hex() == v["kc"]
    assert _signed_by_hand(ad, epoch_key, iv, ct).hex() == v["signed"]
    assert e2e.signed_bytes(ad, epoch_key, iv, ct).hex() == v["signed"]
    assert e2e.b64url(sign.public_key().public_bytes_raw()) == v["sig_key"]
    assert sign.sign(bytes.fromhex(v["signed"])) == sig  # Ed25519 is deterministic
    assert e2e.decrypt(epoch_key, v["sig_key"], v["e2e"], **where) == json.loads(v["plaintext"])
    # encrypt() with the vector's iv gives the vector's object, byte for byte.

    class FixedIv:
        @staticmethod
        def token_bytes(n: int) -> bytes:
            assert n == 12
            return iv

    monkeypatch.setattr(e2e, "secrets", FixedIv)
    got = e2e.encrypt(
        epoch_key,
        sign,
        device=v["device"],
        epoch=v["epoch"],
        plaintext=json.loads(v["plaintext"]),
        **where,
    )
    assert got == v["e2e"]


def _flip(obj: dict, field: str) -> dict:
    raw = bytearray(e2e.unb64url(obj[field]))
    raw[len(raw) // 2] ^= 0x01
    return {**obj, field: e2e.b64url(bytes(raw))}


@pytest.mark.parametrize("field", ["iv", "ct", "sig"])
def test_a_flipped_byte_never_gives_text(phone, field):
    epoch_key = e2e.new_epoch_key()
    obj = _flip(_send(phone, epoch_key, {"t": "msg", "body": "secret plans"}), field)
    reason = _reason(
        lambda: e2e.decrypt(epoch_key, phone.sig_key, obj, conversation=CONV, sender=ALICE)
    )
    # The signature covers iv and ct and is checked before AES-GCM.
    assert reason == "bad signature"


def test_a_second_key_is_a_bad_signature(phone):
    """Different keys for different recipients: the one signed object,
    checked under a key it was not signed for, fails at the signature (kc),
    not only at AES-GCM."""
    obj = _send(phone, e2e.new_epoch_key(), {"t": "msg", "body": "hi"})
    reason = _reason(
        lambda: e2e.decrypt(
            e2e.new_epoch_key(), phone.sig_key, obj, conversation=CONV, sender=ALICE
        )
    )
    assert reason == "bad signature"


# AES-GCM by hand, enough to build one ciphertext that opens under two keys
# (GCM does not commit to its key: "invisible salamanders").

_GCM_R = 0xE1 << 120


def _gf_mul(x: int, y: int) -> int:
    """GF(2^128) product of GCM (SP 800-38D 6.3): bit 0 is the block's MSB."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _GCM_R if v & 1 else v >> 1
    return z


def _gf_inv(x: int) -> int:
    """x^(2^128 - 2), the inverse of x != 0."""
    result, base, e = 1 << 127, x, (1 << 128) - 2  # 1 << 127 is the field's 1
    while e:
        if e & 1:
            result = _gf_mul(result, base)
        base = _gf_mul(base, base)
        e >>= 1
    return result


def _aes_block(key: bytes, block: bytes) -> int:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return int.from_bytes(enc.update(block) + enc.finalize(), "big")


def _gcm_tag(key: bytes, iv: bytes, ad: bytes, ct: bytes) -> int:
    h = _aes_block(key, bytes(16))

    def blocks(data: bytes) -> list[int]:
        padded = data + bytes(-len(data) % 16)
        return [int.from_bytes(padded[i : i + 16], "big") for i in range(0, len(padded), 16)]

    x = 0
    lengths = ((len(ad) * 8) << 64) | (len(ct) * 8)
    for b in [*blocks(ad), *blocks(ct), lengths]:
        x = _gf_mul(x ^ b, h)
    return _aes_block(key, iv + b"\x00\x00\x00\x01") ^ x


def _one_ciphertext_for_two_keys(k1: bytes, k2: bytes, iv: bytes, ad: bytes) -> bytes:
    """ct ‖ tag of 3 blocks that AES-GCM opens under both keys: the last
    block solves tag(k1) = tag(k2), which is linear in it."""
    head = secrets.token_bytes(32)

    def tags(last: int) -> tuple[int, int]:
        ct = head + last.to_bytes(16, "big")
        return _gcm_tag(k1, iv, ad, ct), _gcm_tag(k2, iv, ad, ct)

    t1, t2 = tags(0)
    u1, u2 = tags(1 << 127)  # the field's 1: the tags move by H^e
    last = _gf_mul(t1 ^ t2, _gf_inv(u1 ^ t1 ^ u2 ^ t2))
    ct = head + last.to_bytes(16, "big")
    tag = _gcm_tag(k1, iv, ad, ct)
    assert tag == _gcm_tag(k2, iv, ad, ct)
    return ct + tag.to_bytes(16, "big")


def test_one_ciphertext_under_two_keys_verifies_under_one_only(phone, laptop):
    """The attack kc stops: a sender seals k1 to one recipient and k2 to
    another, and sends one ciphertext that AES-GCM opens under both. The
    signature holds for k1 alone, so the k2 recipient reads nothing."""
    k1, k2 = e2e.new_epoch_key(), e2e.new_epoch_key()
    iv = secrets.token_bytes(12)
    ad = e2e.message_ad(CONV, ALICE, phone.device, "epoch-0001")
    ct = _one_ciphertext_for_two_keys(k1, k2, iv, ad)
    opened = AESGCM(k1).decrypt(iv, ct, ad), AESGCM(k2).decrypt(iv, ct, ad)
    assert opened[0] != opened[1]  # both open (InvalidTag otherwise), to different bytes
    obj = _hand_made(phone, k1, iv, ct)
    where = {"conversation": CONV, "sender": ALICE}
    assert e2e.verify(phone.sig_key, obj, epoch_key=k1, **where).epoch_key == k1
    assert _reason(lambda: e2e.verify(phone.sig_key, obj, epoch_key=k2, **where)) == (
        "bad signature"
    )
    # Through the shares, as the two recipients would read it.
    carol = KeyedDevice("carol", device="carol-laptop")
    share_1 = e2e.seal_share(laptop.dh_key, epoch_key=k1, **WHERE)
    share_2 = e2e.seal_share(
        carol.dh_key, epoch_key=k2, **{**WHERE, "recipient_device": carol.device}
    )
    assert _reason(lambda: _read(laptop, obj, devices=[phone.public()], share=share_1)) == (
        "damaged message"  # signed for k1, but the free block is no JSON
    )
    assert _reason(lambda: _read(carol, obj, devices=[phone.public()], share=share_2)) == (
        "bad signature"
    )


def _shifted(obj: dict, direction: str) -> dict:
    """A byte moved between the epoch id and the iv (and iv and ct), so that
    ad ‖ iv ‖ ct stays the same bytes."""
    iv, ct = e2e.unb64url(obj["iv"]), e2e.unb64url(obj["ct"])
    if direction == "iv into epoch":
        epoch, iv, ct = obj["epoch"] + chr(iv[0]), iv[1:] + ct[:1], ct[1:]
    else:
        epoch, iv, ct = obj["epoch"][:-1], obj["epoch"][-1].encode() + iv, ct
        iv, ct = iv[:12], iv[12:] + ct
    return {**obj, "epoch": epoch, "iv": e2e.b64url(iv), "ct": e2e.b64url(ct)}


@pytest.mark.parametrize("direction", ["iv into epoch", "epoch into iv"])
def test_a_byte_moved_between_epoch_and_iv_is_a_bad_signature(phone, direction):
    """Under the old signed bytes (ad ‖ iv ‖ ct) such a move kept the
    signature whenever the byte was an id character; the 0x00 after ad now
    breaks it."""
    epoch_key = e2e.new_epoch_key()
    while True:
        obj = _send(phone, epoch_key, {"t": "msg", "body": "hi"})
        if re.fullmatch(r"[A-Za-z0-9_-]", chr(e2e.unb64url(obj["iv"])[0])):
            break
    moved = _shifted(obj, direction)
    assert moved["epoch"] != obj["epoch"] and re.fullmatch(r"[A-Za-z0-9_-]{8,64}", moved["epoch"])

    def old_signed(o: dict) -> bytes:
        ad = e2e.message_ad(CONV, ALICE, o["device"], o["epoch"])
        return ad + e2e.unb64url(o["iv"]) + e2e.unb64url(o["ct"])

    assert old_signed(moved) == old_signed(obj)  # the move the old format allowed
    reason = _reason(
        lambda: e2e.decrypt(epoch_key, phone.sig_key, moved, conversation=CONV, sender=ALICE)
    )
    assert reason == "bad signature"


@pytest.mark.parametrize(
    ("sig_key", "where"),
    [
        ("other device", {"conversation": CONV, "sender": ALICE}),
        ("own", {"conversation": "g:other", "sender": ALICE}),
        ("own", {"conversation": CONV, "sender": "mallory"}),
        ("garbage", {"conversation": CONV, "sender": ALICE}),
    ],
)
def test_a_signature_that_does_not_verify(phone, sig_key, where):
    epoch_key = e2e.new_epoch_key()
    obj = _send(phone, epoch_key, {"t": "msg", "body": "hi"})
    key_text = {
        "own": phone.sig_key,
        "other device": KeyedDevice(ALICE).sig_key,
        "garbage": "AAAA",
    }[sig_key]
    assert _reason(lambda: e2e.decrypt(epoch_key, key_text, obj, **where)) == "bad signature"


def test_a_relabelled_epoch_or_device_breaks_the_signature(phone):
    epoch_key = e2e.new_epoch_key()
    obj = _send(phone, epoch_key, {"t": "msg", "body": "hi"})
    for change in ({"epoch": "epoch-0002"}, {"device": "alice-laptop"}):
        moved = {**obj, **change}
        reason = _reason(
            lambda m=moved: e2e.decrypt(
                epoch_key, phone.sig_key, m, conversation=CONV, sender=ALICE
            )
        )
        assert reason == "bad signature"


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"v": True},
        {"v": "1"},
        {"iv": None},
        {"iv": "not base64!"},
        {"iv": e2e.b64url(bytes(11))},
        {"ct": ""},
        {"ct": e2e.b64url(bytes(15))},
        {"sig": "not base64!"},
        {"sig": e2e.b64url(bytes(63))},
        {"sig": None},
        {"epoch": "epoch\n0001"},
        {"epoch": "epoch-0001\x00"},
        {"device": "short"},
        {"device": None},
        {"device": 12345678},
    ],
)
def test_a_malformed_e2e_object_is_a_damaged_message(phone, change):
    epoch_key = e2e.new_epoch_key()
    obj = {**_send(phone, epoch_key, {"t": "msg", "body": "hi"}), **change}
    # Step 1 comes first: not even an unknown device or a missing key is
    # reported for an object of the wrong shape.
    for key, sig_key in ((epoch_key, phone.sig_key), (None, None)):
        reason = _reason(
            lambda k=key, s=sig_key: e2e.decrypt(k, s, obj, conversation=CONV, sender=ALICE)
        )
        assert reason == "damaged message"
    assert _reason(lambda: e2e.parse(obj)) == "damaged message"


@pytest.mark.parametrize(
    "plaintext",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"msg"',
        b'{"t": "msg", "body": "hi", "n": NaN}',  # Python's json would take it
        b'{"t": "msg", "body": "hi", "n": -Infinity}',
        '\ufeff{"t": "msg", "body": "hi"}'.encode(),  # a BOM: not JSON text
        b"[" * 100_000 + b"]" * 100_000,  # deeper than Python's recursion limit
    ],
)
def test_a_signed_plaintext_that_is_no_json_object_is_damaged(phone, plaintext):
    """Signed and sealed properly by the sender, but no JSON object inside."""
    epoch_key = e2e.new_epoch_key()
    ad = e2e.message_ad(CONV, ALICE, phone.device, "epoch-0001")
    iv = secrets.token_bytes(12)
    obj = _hand_made(phone, epoch_key, iv, AESGCM(epoch_key).encrypt(iv, plaintext, ad))
    reason = _reason(
        lambda: e2e.decrypt(epoch_key, phone.sig_key, obj, conversation=CONV, sender=ALICE)
    )
    assert reason == "damaged message"


def test_decrypt_reports_the_first_failing_step(phone):
    epoch_key = e2e.new_epoch_key()
    obj = _send(phone, epoch_key, {"t": "edit", "id": "m1", "body": "hi"})
    bad_ct = _flip(obj, "ct")

    def reason(key, sig_key, o):
        return _reason(lambda: e2e.decrypt(key, sig_key, o, conversation=CONV, sender=ALICE))

    assert reason(epoch_key, None, {**obj, "v": 2}) == "damaged message"  # 1: shape
    assert reason(None, None, bad_ct) == "unknown device"  # 1: device, before the key
    assert reason(None, phone.sig_key, bad_ct) == "no key for this device"  # 2 before 3
    assert reason(bytes(16), phone.sig_key, bad_ct) == "bad key share"  # 2 before 3
    assert reason(epoch_key, phone.sig_key, bad_ct) == "bad signature"  # 3 before 4
    # 4 after 3: a ct the sender signed but that does not open.
    iv = secrets.token_bytes(12)
    signed_garbage = _hand_made(phone, epoch_key, iv, secrets.token_bytes(40))
    assert reason(epoch_key, phone.sig_key, signed_garbage) == "damaged message"
    other = KeyedDevice(ALICE).sig_key
    assert reason(epoch_key, other, signed_garbage) == "bad signature"
    # 5 comes after all of them: an edit read as a message.
    plaintext = e2e.decrypt(epoch_key, phone.sig_key, obj, conversation=CONV, sender=ALICE)
    assert _reason(lambda: e2e.check_kind(plaintext)) == "wrong kind"


def test_verify_needs_the_epoch_key(phone):
    epoch_key = e2e.new_epoch_key()
    obj = _send(phone, epoch_key, {"t": "msg", "body": "hi"})
    where = {"conversation": CONV, "sender": ALICE}
    v = e2e.verify(phone.sig_key, obj, epoch_key=epoch_key, **where)
    assert (v.device, v.epoch, v.epoch_key) == (phone.device, "epoch-0001", epoch_key)
    assert v.ad == e2e.message_ad(CONV, ALICE, phone.device, "epoch-0001")
    other = e2e.new_epoch_key()
    assert _reason(lambda: e2e.verify(phone.sig_key, obj, epoch_key=other, **where)) == (
        "bad signature"
    )
    assert _reason(lambda: e2e.verify(phone.sig_key, obj, epoch_key=b"x", **where)) == (
        "bad key share"
    )
    with pytest.raises(TypeError):
        e2e.verify(phone.sig_key, obj, **where)  # type: ignore[call-arg]


def test_encrypt_refuses_a_wrong_key_or_id(phone):
    with pytest.raises(ValueError):
        _send(phone, bytes(16), {"t": "msg", "body": "hi"})
    with pytest.raises(ValueError):
        _send(phone, e2e.new_epoch_key(), {"t": "msg", "body": "hi"}, epoch="a\nb-cdefgh")


# -- kinds -------------------------------------------------------------------


def test_kinds():
    assert e2e.check_kind({"t": "msg", "body": "hi"}) == "hi"
    assert e2e.check_kind({"t": "edit", "id": "m1", "body": "hi!"}, edit_of="m1") == "hi!"
    assert e2e.check_kind({"t": "msg", "body": "x" * 4000}) == "x" * 4000
    for plaintext, edit_of in (
        ({"t": "edit", "id": "m1", "body": "hi"}, None),  # an edit shown as a message
        ({"t": "msg", "body": "hi"}, "m1"),  # a message shown as an edit
        ({"t": "edit", "id": "m2", "body": "hi"}, "m1"),  # an edit moved to another message
        ({"t": "edit", "body": "hi"}, "m1"),
        ({"body": "hi"}, None),
        ({"t": "msg", "body": "   "}, None),
        ({"t": "msg", "body": "x" * 4001}, None),
        ({"t": "msg", "body": 5}, None),
        ({"t": "msg"}, None),
    ):
        assert _reason(lambda p=plaintext, e=edit_of: e2e.check_kind(p, edit_of=e)) == "wrong kind"


# -- replays -----------------------------------------------------------------


def test_the_replay_guard():
    guard = e2e.ReplayGuard()
    iv = e2e.b64url(secrets.token_bytes(12))
    guard.check("alice-phone", "epoch-0001", iv, "m1")
    guard.check("alice-phone", "epoch-0001", iv, "m1")  # the same message again: fine
    guard.check("alice-phone", "epoch-0002", iv, "m2")  # another epoch: another triple
    assert _reason(lambda: guard.check("alice-phone", "epoch-0001", iv, "m3")) == "replayed"
    # Padding or raw bytes name the same iv.
    assert _reason(lambda: guard.check("alice-phone", "epoch-0001", iv + "=", "m3")) == "replayed"
    raw = e2e.unb64url(iv)
    assert _reason(lambda: guard.check("alice-phone", "epoch-0001", raw, "m3")) == "replayed"


# -- the six steps together ---------------------------------------------------


@pytest.fixture
def laptop():
    return KeyedDevice(BOB, device="bob-laptop")


def _read(laptop, obj, *, devices, share, message_id="m1", guard=None, edit_of=None):
    return e2e.read_message(
        obj,
        conversation=CONV,
        sender=ALICE,
        sender_devices=devices,
        dh=laptop.dh,
        recipient_device=laptop.device,
        share=share,
        message_id=message_id,
        guard=guard or e2e.ReplayGuard(),
        edit_of=edit_of,
    )


def test_read_message_in_the_spec_order(phone, laptop):
    epoch_key = e2e.new_epoch_key()
    share = e2e.seal_share(laptop.dh_key, epoch_key=epoch_key, **WHERE)
    obj = _send(phone, epoch_key, {"t": "msg", "body": "hi bob"})
    devices = [phone.public()]
    guard = e2e.ReplayGuard()
    assert _read(laptop, obj, devices=devices, share=share, guard=guard) == "hi bob"
    # A removed device's old messages still verify.
    assert _read(laptop, obj, devices=[phone.public(removed_ts=5)], share=share) == "hi bob"

    def reason(**kw):
        return _reason(
            lambda: _read(laptop, **{"obj": obj, "devices": devices, "share": share, **kw})
        )

    stranger = [KeyedDevice(ALICE).public()]
    other = e2e.seal_share(laptop.dh_key, epoch_key=epoch_key, **{**WHERE, "epoch": "epoch-0002"})
    swapped = e2e.seal_share(laptop.dh_key, epoch_key=e2e.new_epoch_key(), **WHERE)
    bad_ct = _flip(obj, "ct")
    # Each step alone.
    assert reason(obj={**obj, "sig": "AAAA"}) == "damaged message"  # 1
    assert reason(devices=stranger) == "unknown device"  # 1
    assert reason(share=None) == "no key for this device"  # 2
    assert reason(share=other) == "bad key share"  # 2
    assert reason(share=swapped) == "bad signature"  # 3: signed for another key
    assert reason(obj=bad_ct) == "bad signature"  # 3
    assert reason(edit_of="m0") == "wrong kind"  # 5
    assert reason(message_id="m2", guard=guard) == "replayed"  # 6
    # Two at once: the earlier step is the one reported.
    assert reason(obj={**bad_ct, "v": 2}, devices=stranger) == "damaged message"
    assert reason(devices=stranger, share=None) == "unknown device"
    assert reason(obj=bad_ct, share=None) == "no key for this device"
    assert reason(obj=bad_ct, share=other) == "bad key share"
    assert reason(share=swapped, edit_of="m0") == "bad signature"
    assert reason(edit_of="m0", message_id="m2", guard=guard) == "wrong kind"
    # A ct the sender signed that does not open (4) comes after a bad
    # signature (3) and before the kind (5).
    iv = secrets.token_bytes(12)
    garbage = _hand_made(phone, epoch_key, iv, secrets.token_bytes(40))
    assert reason(obj=garbage) == "damaged message"
    assert reason(obj=garbage, devices=[{**phone.public(), "sig_key": stranger[0]["sig_key"]}]) == (
        "bad signature"
    )
    assert reason(obj=garbage, edit_of="m0") == "damaged message"


# -- safety numbers ------------------------------------------------------------


def _independent_digits(username: str, devices: list[tuple[str, str, str]]) -> str:
    """The spec's safety digits of one user, written out again from its text
    (not through e2e_crypto), so that a change to either shows."""
    lines = "".join(f"{d} {s} {x}\n" for d, s, x in sorted(devices))
    data = ("chatd-e2e/v1 safety\n" + username + "\n" + lines).encode("utf-8")
    h = hashlib.sha512(data).digest()
    for _ in range(5199):
        h = hashlib.sha512(h + data).digest()
    out = ""
    for i in range(6):
        out += str(int.from_bytes(h[5 * i : 5 * i + 5], "big") % 100000).zfill(5)
    return out


def _b64(n: int) -> str:
    # Fixed, readable stand-ins for 32-byte public keys.
    return base64.urlsafe_b64encode(bytes([n]) * 32).rstrip(b"=").decode()


FIXED_A = [("alice-phone", _b64(1), _b64(2)), ("alice-laptop", _b64(3), _b64(4))]
FIXED_B = [("bob-laptop-1", _b64(5), _b64(6))]
#: safety_number("alice", FIXED_A, "bob", FIXED_B), as _independent_digits
#: computes it (the test below checks the two agree before pinning it).
FIXED_SAFETY_NUMBER = "828268689010882514711275218036350862374055578551173451844775"


def _entries(devices, removed=()):
    return [
        {"device": d, "sig_key": s, "dh_key": x, "removed_ts": 7 if d in removed else None}
        for d, s, x in devices
    ]


def test_the_safety_number_of_fixed_keys():
    expected = _independent_digits("alice", FIXED_A) + _independent_digits("bob", FIXED_B)
    got = e2e.safety_number("alice", _entries(FIXED_A), "bob", _entries(FIXED_B))
    assert got == expected
    assert got == FIXED_SAFETY_NUMBER
    # The smaller username's digits come first, whichever side asks.
    assert e2e.safety_number("bob", _entries(FIXED_B), "alice", _entries(FIXED_A)) == expected


def test_safety_numbers(phone, laptop):
    tablet = KeyedDevice(ALICE, device="alice-tablet")
    alices, bobs = [phone.public(), tablet.public()], [laptop.public()]
    number = e2e.safety_number(ALICE, alices, BOB, bobs)
    assert re.fullmatch(r"[0-9]{60}", number)
    assert e2e.safety_number(BOB, bobs, ALICE, alices) == number
    assert e2e.safety_number(ALICE, alices[::-1], BOB, bobs) == number  # list order is no input
    grown = e2e.safety_number(ALICE, alices, BOB, [*bobs, KeyedDevice(BOB).public()])
    assert grown != number and grown[:30] == number[:30]
    removed = [*bobs, KeyedDevice(BOB).public(removed_ts=9)]
    assert e2e.safety_number(ALICE, alices, BOB, removed) == number
    formatted = e2e.format_safety_number(number)
    assert re.fullmatch(r"[0-9]{5}( [0-9]{5}){11}", formatted)
    assert formatted.replace(" ", "") == number
