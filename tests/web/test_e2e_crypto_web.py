"""web/js/e2e-crypto.js in real Chromium: RFC 9180's known answers, and the
formats of docs/e2e-crypto.md read and written both ways with the Python
client's ``harness.e2e_crypto``; plus the module's Node unit tests
(``node --test web/test/``), so CI runs them.

The page is a blank one served with web/ from a tiny HTTP server on a
loopback port: http://127.0.0.1 is a secure context, which WebCrypto's
X25519 and Ed25519 need. No chatd server takes part.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.core.devices import check_registration
from harness import e2e_crypto as py
from harness.e2e_keys import KeyedDevice

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
BLANK = "/e2e-crypto-test.html"

# RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
# AES-128-GCM, mode_base; the encryption of sequence number 0.
A11 = {
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "skEm": "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
    "pkEm": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "skRm": "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    "enc": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "shared_secret": "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc",
    "key": "4531685d41d65f03dc48f6b8302c05b0",
    "base_nonce": "56d890e5accaaf011cff4b7d",
    "exporter_secret": "45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8",
    "aad": "436f756e742d30",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "ct": (
        "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"
    ),
}

# In the page: the module as `window.E2E`, hex helpers, and `window.run`,
# which turns a DecryptError into {reason} so a refusal can never come back
# as text.
SETUP = """async () => {
  window.E2E = await import('/js/e2e-crypto.js');
  window.hex = (s) => new Uint8Array((s.match(/../g) || []).map((b) => parseInt(b, 16)));
  window.toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  window.devices = {};
  window.run = async (fn) => {
    try {
      return { ok: true, value: await fn() };
    } catch (e) {
      if (e instanceof E2E.DecryptError) return { ok: false, reason: e.reason };
      throw e;
    }
  };
}"""

KAT = """async (v) => {
  const subtle = crypto.subtle;
  // A raw X25519 private key goes into WebCrypto as PKCS#8 (RFC 8410).
  const pkcs8 = (sk) => hex('302e020100300506032b656e04220420' + sk);
  const pair = async (sk, pk) => ({
    privateKey: await subtle.importKey('pkcs8', pkcs8(sk), 'X25519', false, ['deriveBits']),
    publicKey: await subtle.importKey('raw', hex(pk), 'X25519', true, []),
  });
  const ephemeral = await pair(v.skEm, v.pkEm);
  const recipient = await pair(v.skRm, v.pkRm);
  const encap = await E2E.hpkeEncap(hex(v.pkRm), { ephemeral });
  const ks = await E2E.hpkeKeySchedule(encap.sharedSecret, hex(v.info));
  const sealed = await E2E.hpkeSeal(hex(v.pkRm), hex(v.info), hex(v.aad), hex(v.pt), { ephemeral });
  const opened = await E2E.hpkeOpen(recipient, hex(v.enc), hex(v.info), hex(v.aad), hex(v.ct));
  return {
    enc: toHex(encap.enc),
    shared_secret: toHex(encap.sharedSecret),
    decap: toHex(await E2E.hpkeDecap(recipient, hex(v.enc))),
    key: toHex(ks.key),
    base_nonce: toHex(ks.baseNonce),
    exporter_secret: toHex(ks.exporterSecret),
    sealed_enc: toHex(sealed.enc),
    sealed_ct: toHex(sealed.ct),
    opened: toHex(opened),
  };
}"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == BLANK:
            body = b"<!doctype html><meta charset=utf-8><title>e2e crypto</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web_root() -> Iterator[str]:
    """web/ served on a free loopback port."""
    handler = functools.partial(_Quiet, directory=str(WEB))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def page(browser, web_root) -> Iterator[Any]:
    """A blank page with the module loaded; fails the test on any page error."""
    context = browser.new_context()
    errors: list[str] = []
    p = context.new_page()
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.goto(web_root + BLANK)
    assert p.evaluate("isSecureContext")
    p.evaluate(SETUP)
    yield p
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def web_device(page, username: str) -> dict[str, str]:
    """A device generated in the page (kept there as devices[device])."""
    return page.evaluate(
        """async (username) => {
          const dev = await E2E.generateDevice(username);
          devices[dev.device] = dev;
          return {
            device: dev.device, sig_key: dev.sig_key, dh_key: dev.dh_key,
            extractable: dev.sign.privateKey.extractable || dev.dh.privateKey.extractable,
          };
        }""",
        username,
    )


def flip(s: str, at: int = 10) -> str:
    raw = bytearray(py.unb64url(s))
    raw[at] ^= 0x01
    return py.b64url(bytes(raw))


def web_open_and_read(page, share: str | None, e2e: dict, where: dict, edit_of: str | None = None):
    """The page opens its share (None: it has none), checks and decrypts
    `e2e`: {ok, value} or {ok: false, reason}."""
    return page.evaluate(
        """async ([share, e2e, w, editOf]) => run(async () => {
          const ctx = { conversation: w.conversation, epoch: e2e.epoch, sender: w.sender,
                        senderDevice: e2e.device, recipientDevice: w.recipient };
          const dh = devices[w.recipient].dh;
          const key = () => (share == null ? null : E2E.openShare(dh, share, ctx));
          const where = { conversation: w.conversation, sender: w.sender };
          const pt = await E2E.decrypt(key, w.sig_key, e2e, where);
          return E2E.checkKind(pt, editOf == null ? {} : { editOf });
        })""",
        [share, e2e, where, edit_of],
    )


# -- known answers -----------------------------------------------------------


def test_rfc9180_known_answers_in_chromium(page) -> None:
    got = page.evaluate(KAT, A11)
    assert got == {
        "enc": A11["enc"],
        "shared_secret": A11["shared_secret"],
        "decap": A11["shared_secret"],
        "key": A11["key"],
        "base_nonce": A11["base_nonce"],
        "exporter_secret": A11["exporter_secret"],
        "sealed_enc": A11["enc"],
        "sealed_ct": A11["ct"],
        "opened": A11["pt"],
    }


def test_the_python_module_agrees_with_the_same_known_answers() -> None:
    # The interop below means something only if both sides are RFC 9180.
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    h = bytes.fromhex
    ephemeral = X25519PrivateKey.from_private_bytes(h(A11["skEm"]))
    enc, ctx = py.hpke_setup_base_s(h(A11["pkRm"]), h(A11["info"]), ephemeral=ephemeral)
    assert enc.hex() == A11["enc"]
    assert (ctx.key.hex(), ctx.base_nonce.hex()) == (A11["key"], A11["base_nonce"])
    assert ctx.seal(h(A11["aad"]), h(A11["pt"])).hex() == A11["ct"]


# -- devices -----------------------------------------------------------------


def test_a_chromium_device_registers_with_the_servers_rules(page) -> None:
    dev = web_device(page, "alice")
    assert dev["extractable"] is False
    body = page.evaluate(
        "async ([d, u]) => E2E.registration(devices[d], u)", [dev["device"], "alice"]
    )
    reg = check_registration("alice", dev["device"], body)
    assert (reg.sig_key, reg.dh_key) == (dev["sig_key"], dev["dh_key"])


# -- Python -> Chromium ------------------------------------------------------


def python_sends(recipient: dict[str, str], plaintext: dict) -> tuple[str, dict, dict]:
    """alice (Python) seals a share for the page's device and encrypts."""
    alice = KeyedDevice("alice")
    conversation, epoch, key = "dm:alice:bob", py.new_epoch_id(), py.new_epoch_key()
    share = py.seal_share(
        recipient["dh_key"],
        conversation=conversation,
        epoch=epoch,
        sender="alice",
        sender_device=alice.device,
        recipient_device=recipient["device"],
        epoch_key=key,
    )
    e2e = py.encrypt(
        key,
        alice.sign,
        conversation=conversation,
        sender="alice",
        device=alice.device,
        epoch=epoch,
        plaintext=plaintext,
    )
    where = {
        "conversation": conversation,
        "sender": "alice",
        "recipient": recipient["device"],
        "sig_key": alice.sig_key,
    }
    return share, e2e, where


def test_python_seals_and_encrypts_chromium_reads(page) -> None:
    bob = web_device(page, "bob")
    body = "héllo bob 👋\nsecond line"
    share, e2e, where = python_sends(bob, {"t": "msg", "body": body})
    assert web_open_and_read(page, share, e2e, where) == {"ok": True, "value": body}
    edit = {"t": "edit", "id": "m-42", "body": "edited ✓"}
    share, e2e, where = python_sends(bob, edit)
    assert web_open_and_read(page, share, e2e, where, edit_of="m-42") == {
        "ok": True,
        "value": "edited ✓",
    }
    assert web_open_and_read(page, share, e2e, where, edit_of="m-43") == {
        "ok": False,
        "reason": "wrong kind",
    }


@pytest.mark.parametrize(
    ("damages", "reason"),
    [
        (["ct"], "bad signature"),
        (["iv"], "bad signature"),
        (["sig"], "bad signature"),
        (["share"], "bad key share"),
        (["sig_key"], "bad signature"),
        # Two at once: the earlier step of the spec is the one reported.
        (["no share", "ct"], "no key for this device"),
        (["share", "sig"], "bad key share"),
        (["unknown device", "no share"], "unknown device"),
        (["v", "unknown device"], "damaged message"),
    ],
)
def test_chromium_refuses_damaged_python_messages(page, damages: list, reason: str) -> None:
    bob = web_device(page, "bob")
    share, e2e, where = python_sends(bob, {"t": "msg", "body": "secret text"})
    for damage in damages:
        if damage == "share":
            share = flip(share, 50)
        elif damage == "no share":
            share = None
        elif damage == "sig_key":
            where["sig_key"] = KeyedDevice("alice").sig_key
        elif damage == "unknown device":
            where["sig_key"] = None
        elif damage == "v":
            e2e = {**e2e, "v": 2}
        else:
            e2e = {**e2e, damage: flip(e2e[damage], 3)}
    got = web_open_and_read(page, share, e2e, where)
    assert got == {"ok": False, "reason": reason}
    assert "secret text" not in repr(got)


def test_chromium_refuses_a_share_for_another_device(page) -> None:
    bob, carol = web_device(page, "bob"), web_device(page, "carol")
    share, e2e, where = python_sends(bob, {"t": "msg", "body": "for bob only"})
    got = web_open_and_read(page, share, e2e, {**where, "recipient": carol["device"]})
    assert got == {"ok": False, "reason": "bad key share"}


# -- Chromium -> Python ------------------------------------------------------


def chromium_sends(page, recipient: KeyedDevice, plaintext: dict) -> dict[str, Any]:
    """alice (the page) seals a share for `recipient` and encrypts."""
    alice = web_device(page, "alice")
    sent = page.evaluate(
        """async ([alice, dhKey, recipientDevice, plaintext]) => {
          const dev = devices[alice];
          const conversation = 'dm:alice:bob';
          const epoch = E2E.newEpochId();
          const epochKey = E2E.newEpochKey();
          const share = await E2E.sealShare(dhKey, {
            conversation, epoch, sender: 'alice', senderDevice: dev.device,
            recipientDevice, epochKey,
          });
          const e2e = await E2E.encrypt(epochKey, dev.sign.privateKey, {
            conversation, sender: 'alice', device: dev.device, epoch, plaintext,
          });
          return { conversation, share, e2e };
        }""",
        [alice["device"], recipient.dh_key, recipient.device, plaintext],
    )
    return {**sent, "sig_key": alice["sig_key"]}


def python_read_message(bob: KeyedDevice, sent: dict[str, Any], **over: Any) -> str:
    """The six steps through read_message, as the Python client runs them."""
    args: dict[str, Any] = {
        "conversation": sent["conversation"],
        "sender": "alice",
        "sender_devices": [{"device": sent["e2e"]["device"], "sig_key": sent["sig_key"]}],
        "dh": bob.dh,
        "recipient_device": bob.device,
        "share": sent["share"],
        "message_id": "m1",
        "guard": py.ReplayGuard(),
    }
    return py.read_message(sent["e2e"], **{**args, **over})


def python_reads(bob: KeyedDevice, sent: dict[str, Any], *, edit_of: str | None = None) -> str:
    e2e = sent["e2e"]
    key = py.open_share(
        bob.dh,
        sent["share"],
        conversation=sent["conversation"],
        epoch=e2e["epoch"],
        sender="alice",
        sender_device=e2e["device"],
        recipient_device=bob.device,
    )
    pt = py.decrypt(key, sent["sig_key"], e2e, conversation=sent["conversation"], sender="alice")
    return py.check_kind(pt, edit_of=edit_of)


def test_chromium_seals_and_encrypts_python_reads(page) -> None:
    bob = KeyedDevice("bob")
    body = "héllo from chromium 🎉"
    sent = chromium_sends(page, bob, {"t": "msg", "body": body})
    assert len(sent["share"]) == 107
    assert set(sent["e2e"]) == {"v", "device", "epoch", "iv", "ct", "sig"}
    assert python_reads(bob, sent) == body
    assert python_read_message(bob, sent) == body
    sent = chromium_sends(page, bob, {"t": "edit", "id": "m-7", "body": "fixed"})
    assert python_reads(bob, sent, edit_of="m-7") == "fixed"
    with pytest.raises(py.DecryptError) as err:
        python_reads(bob, sent)
    assert err.value.reason == "wrong kind"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("ct", "bad signature"),
        ("iv", "bad signature"),
        ("sig", "bad signature"),
        ("share", "bad key share"),
    ],
)
def test_python_refuses_damaged_chromium_messages(page, damage: str, reason: str) -> None:
    bob = KeyedDevice("bob")
    sent = chromium_sends(page, bob, {"t": "msg", "body": "secret text"})
    if damage == "share":
        sent["share"] = flip(sent["share"], 50)
    else:
        sent["e2e"] = {**sent["e2e"], damage: flip(sent["e2e"][damage], 3)}
    with pytest.raises(py.DecryptError) as err:
        python_reads(bob, sent)
    assert err.value.reason == reason


def test_python_reports_chromium_messages_in_the_spec_order(page) -> None:
    bob = KeyedDevice("bob")
    sent = chromium_sends(page, bob, {"t": "msg", "body": "secret text"})
    bad_ct = {**sent["e2e"], "ct": flip(sent["e2e"]["ct"], 3)}
    stranger = [{"device": sent["e2e"]["device"], "sig_key": KeyedDevice("alice").sig_key}]
    cases = [
        ({"share": None}, "no key for this device"),
        ({"share": None, "e2e": bad_ct}, "no key for this device"),
        ({"share": flip(sent["share"], 50), "e2e": bad_ct}, "bad key share"),
        ({"e2e": bad_ct}, "bad signature"),
        ({"sender_devices": stranger}, "bad signature"),
        ({"sender_devices": [], "share": None}, "unknown device"),
        ({"edit_of": "m-1"}, "wrong kind"),
    ]
    for over, reason in cases:
        e2e = over.pop("e2e", sent["e2e"])
        with pytest.raises(py.DecryptError) as err:
            python_read_message(bob, {**sent, "e2e": e2e}, **over)
        assert err.value.reason == reason, over


def test_different_keys_for_different_recipients_is_a_bad_signature_on_both_sides(page) -> None:
    """One signed e2e object, checked under a second key (as a recipient
    sent a share of another key would): "bad signature", not "damaged
    message", on both sides, whichever side signed."""
    bob_py = KeyedDevice("bob")
    sent = chromium_sends(page, bob_py, {"t": "msg", "body": "secret text"})
    with pytest.raises(py.DecryptError) as err:
        py.decrypt(
            py.new_epoch_key(),
            sent["sig_key"],
            sent["e2e"],
            conversation=sent["conversation"],
            sender="alice",
        )
    assert err.value.reason == "bad signature"

    share, e2e, where = python_sends(web_device(page, "bob"), {"t": "msg", "body": "x"})
    got = page.evaluate(
        """async ([e2e, w]) => run(() => E2E.decrypt(E2E.newEpochKey(), w.sig_key, e2e,
                                     { conversation: w.conversation, sender: w.sender }))""",
        [e2e, where],
    )
    assert got == {"ok": False, "reason": "bad signature"}


def test_the_fixed_message_vector_in_chromium(page) -> None:
    """web/test/e2e-message-vector.json (built by hand from the spec, checked
    by both unit suites) also reads in Chromium, and its signed bytes are
    the ones Chromium rebuilds."""
    vector = json.loads((WEB / "test" / "e2e-message-vector.json").read_text("utf-8"))
    got = page.evaluate(
        """async (v) => {
          const key = hex(v.epoch_key);
          const where = { conversation: v.conversation, sender: v.sender };
          return {
            kc: toHex(await E2E.keyCommitment(key)),
            read: await run(() => E2E.decrypt(key, v.sig_key, v.e2e, where)),
            other: await run(() => E2E.decrypt(E2E.newEpochKey(), v.sig_key, v.e2e, where)),
          };
        }""",
        vector,
    )
    assert got == {
        "kc": vector["kc"],
        "read": {"ok": True, "value": json.loads(vector["plaintext"])},
        "other": {"ok": False, "reason": "bad signature"},
    }


def test_blank_bodies_are_the_same_on_both_sides(page) -> None:
    """The body rule's whitespace is Python's str.strip: every code point
    the web client's checkKind calls blank, and only those, is one."""
    python_blank = [c for c in range(0x110000) if chr(c).isspace()]
    web_blank = page.evaluate(
        """() => {
          const out = [];
          for (let c = 0; c < 0x110000; c++) {
            if (c >= 0xd800 && c <= 0xdfff) continue;
            try {
              E2E.checkKind({ t: 'msg', body: String.fromCodePoint(c) });
            } catch (e) {
              out.push(c);
            }
          }
          return out;
        }"""
    )
    assert web_blank == python_blank


# -- safety numbers ----------------------------------------------------------


def test_safety_numbers_are_equal_across_both(page) -> None:
    alice_web = web_device(page, "alice")
    alice_py, bob_py, bob_py2 = KeyedDevice("alice"), KeyedDevice("bob"), KeyedDevice("bob")

    def entry(d: Any, removed: int | None = None) -> dict[str, Any]:
        if isinstance(d, dict):
            return {"device": d["device"], "sig_key": d["sig_key"], "dh_key": d["dh_key"]}
        return {"device": d.device, "sig_key": d.sig_key, "dh_key": d.dh_key, "removed_ts": removed}

    alice = [entry(alice_web), entry(alice_py)]
    bob = [entry(bob_py), entry(bob_py2, removed=1_700_000_000_000)]
    expected = py.safety_number("alice", alice, "bob", bob)
    assert expected == py.safety_number("bob", bob, "alice", alice)
    got = page.evaluate(
        """async ([alice, bob]) => ({
          ab: await E2E.safetyNumber('alice', alice, 'bob', bob),
          ba: await E2E.safetyNumber('bob', bob, 'alice', alice),
        })""",
        [alice, bob],
    )
    assert got == {"ab": expected, "ba": expected}
    shown = page.evaluate("(s) => E2E.formatSafetyNumber(s)", expected)
    assert shown == py.format_safety_number(expected)
    assert len(shown.split(" ")) == 12


# -- the Node unit tests -----------------------------------------------------


def test_node_unit_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    done = subprocess.run(
        [node, "--test", "web/test/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
