// Unit tests of web/js/e2e-crypto.js on Node's WebCrypto: `node --test web/test/`.
// tests/web/test_e2e_crypto_web.py runs them from pytest, and runs the same
// known answers inside Chromium, plus interop with the Python client.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import {
  DecryptError,
  ReplayGuard,
  b64url,
  checkKind,
  decrypt,
  encrypt,
  formatSafetyNumber,
  generateDevice,
  hpkeDecap,
  hpkeEncap,
  hpkeKeySchedule,
  hpkeOpen,
  hpkeSeal,
  keyCommitment,
  newEpochId,
  newEpochKey,
  openShare,
  registration,
  safetyNumber,
  sealShare,
  unb64url,
} from '../js/e2e-crypto.js';

const subtle = globalThis.crypto.subtle;

// One message built by hand from the spec; tests/core/test_e2e_crypto.py
// checks the Python module against the same file.
const VECTOR = JSON.parse(readFileSync(new URL('./e2e-message-vector.json', import.meta.url), 'utf8'));

// Node 20 has X25519 and Ed25519 in WebCrypto; an older or trimmed runtime
// may not, and then the tests that need them skip (Chromium covers them).
async function supports(name, usages) {
  try {
    await subtle.generateKey({ name }, false, usages);
    return true;
  } catch {
    return false;
  }
}
const HAS_X25519 = await supports('X25519', ['deriveBits']);
const HAS_ED25519 = await supports('Ed25519', ['sign', 'verify']);
const NEED_X = HAS_X25519 ? {} : { skip: "this runtime's WebCrypto has no X25519" };
const NEED_BOTH =
  HAS_X25519 && HAS_ED25519 ? {} : { skip: "this runtime's WebCrypto lacks X25519 or Ed25519" };

const hex = (s) => new Uint8Array((s.match(/../g) || []).map((b) => parseInt(b, 16)));
const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');

// RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
// AES-128-GCM, mode_base; encryption sequence number 0.
const A11 = {
  info: '4f6465206f6e2061204772656369616e2055726e',
  skEm: '52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736',
  pkEm: '37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431',
  skRm: '4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8',
  pkRm: '3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d',
  enc: '37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431',
  shared_secret: 'fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc',
  key: '4531685d41d65f03dc48f6b8302c05b0',
  base_nonce: '56d890e5accaaf011cff4b7d',
  exporter_secret: '45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8',
  aad: '436f756e742d30',
  pt: '4265617574792069732074727574682c20747275746820626561757479',
  ct: 'f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a',
};

// A raw X25519 private key goes into WebCrypto as PKCS#8 (RFC 8410).
const PKCS8_X25519 = hex('302e020100300506032b656e04220420');

async function x25519Pair(skHex, pkHex) {
  const pkcs8 = new Uint8Array([...PKCS8_X25519, ...hex(skHex)]);
  const privateKey = await subtle.importKey('pkcs8', pkcs8, { name: 'X25519' }, false, ['deriveBits']);
  const publicKey = await subtle.importKey('raw', hex(pkHex), { name: 'X25519' }, true, []);
  return { privateKey, publicKey };
}

async function rejectsWith(promise, reason) {
  await assert.rejects(promise, (err) => {
    assert.ok(err instanceof DecryptError, `expected DecryptError, got ${err}`);
    assert.equal(err.reason, reason);
    return true;
  });
}

function flip(s, at = 10) {
  const raw = unb64url(s);
  raw[at] ^= 0x01;
  return b64url(raw);
}

// -- bytes ---------------------------------------------------------------------

test('b64url: no padding out, padding accepted in, junk refused', () => {
  assert.equal(b64url(new Uint8Array([0xfb, 0xff])), '-_8');
  assert.deepEqual(unb64url('-_8'), new Uint8Array([0xfb, 0xff]));
  assert.deepEqual(unb64url('-_8='), new Uint8Array([0xfb, 0xff]));
  assert.deepEqual(unb64url(''), new Uint8Array(0));
  for (const bad of ['a+b/', 'abcde', 'ab$c', 'a=b', null]) assert.throws(() => unb64url(bad), TypeError);
  const all = Uint8Array.from({ length: 256 }, (_, i) => i);
  assert.deepEqual(unb64url(b64url(all)), all);
});

test('DecryptError: a reason from the list, shown as "couldn\'t decrypt: ..."', () => {
  const e = new DecryptError('bad signature');
  assert.equal(e.reason, 'bad signature');
  assert.equal(e.message, "couldn't decrypt: bad signature");
  assert.throws(() => new DecryptError('something else'), TypeError);
});

// -- HPKE known answers (RFC 9180 A.1.1) -------------------------------------

test('HPKE A.1.1: encap with the fixed ephemeral gives enc and shared_secret', NEED_X, async () => {
  const ephemeral = await x25519Pair(A11.skEm, A11.pkEm);
  const { enc, sharedSecret } = await hpkeEncap(hex(A11.pkRm), { ephemeral });
  assert.equal(toHex(enc), A11.enc);
  assert.equal(toHex(sharedSecret), A11.shared_secret);
  const recipient = await x25519Pair(A11.skRm, A11.pkRm);
  assert.equal(toHex(await hpkeDecap(recipient, hex(A11.enc))), A11.shared_secret);
});

test('HPKE A.1.1: key schedule gives key, base_nonce, exporter_secret', async () => {
  const ks = await hpkeKeySchedule(hex(A11.shared_secret), hex(A11.info));
  assert.equal(toHex(ks.key), A11.key);
  assert.equal(toHex(ks.baseNonce), A11.base_nonce);
  assert.equal(toHex(ks.exporterSecret), A11.exporter_secret);
});

test('HPKE A.1.1: seal (sequence 0) gives the vector enc and ct; open gives pt', NEED_X, async () => {
  const ephemeral = await x25519Pair(A11.skEm, A11.pkEm);
  const sealed = await hpkeSeal(hex(A11.pkRm), hex(A11.info), hex(A11.aad), hex(A11.pt), { ephemeral });
  assert.equal(toHex(sealed.enc), A11.enc);
  assert.equal(toHex(sealed.ct), A11.ct);
  const recipient = await x25519Pair(A11.skRm, A11.pkRm);
  const pt = await hpkeOpen(recipient, hex(A11.enc), hex(A11.info), hex(A11.aad), hex(A11.ct));
  assert.equal(toHex(pt), A11.pt);
});

test('HPKE: a changed info, aad or ct does not open', NEED_X, async () => {
  const recipient = await x25519Pair(A11.skRm, A11.pkRm);
  const open = (info, aad, ct) => hpkeOpen(recipient, hex(A11.enc), hex(info), hex(aad), hex(ct));
  await assert.rejects(open(`${A11.info}00`, A11.aad, A11.ct));
  await assert.rejects(open(A11.info, '', A11.ct));
  await assert.rejects(open(A11.info, A11.aad, `${A11.ct.slice(0, -2)}2b`));
});

// -- devices -------------------------------------------------------------------

test('generateDevice: 32-byte public keys, private halves not extractable', NEED_BOTH, async () => {
  const dev = await generateDevice('alice');
  assert.match(dev.device, /^[A-Za-z0-9_-]{16}$/);
  assert.equal(unb64url(dev.sig_key).length, 32);
  assert.equal(unb64url(dev.dh_key).length, 32);
  assert.equal(dev.sign.privateKey.extractable, false);
  assert.equal(dev.dh.privateKey.extractable, false);
  const named = await generateDevice('alice', 'my-device-1', 'laptop');
  assert.equal(named.device, 'my-device-1');
  assert.equal(named.name, 'laptop');
});

test('registration: self_sig verifies over the spec text', NEED_BOTH, async () => {
  const dev = await generateDevice('alice', 'dev_12345678', 'laptop');
  const body = await registration(dev, 'alice');
  assert.deepEqual(Object.keys(body).sort(), ['dh_key', 'name', 'self_sig', 'sig_key']);
  const text = new TextEncoder().encode(`chatd-e2e/v1 device\nalice\ndev_12345678\n${dev.dh_key}`);
  const pub = await subtle.importKey('raw', unb64url(body.sig_key), { name: 'Ed25519' }, false, ['verify']);
  assert.ok(await subtle.verify({ name: 'Ed25519' }, pub, unb64url(body.self_sig), text));
});

// -- shares --------------------------------------------------------------------

function shareContext(over = {}) {
  return {
    conversation: 'dm:alice:bob',
    epoch: newEpochId(),
    sender: 'alice',
    senderDevice: 'alice-dev-1',
    recipientDevice: 'bob-dev-01',
    ...over,
  };
}

test('epoch ids and keys: 22 characters, 32 bytes, fresh each time', () => {
  assert.match(newEpochId(), /^[A-Za-z0-9_-]{22}$/);
  assert.notEqual(newEpochId(), newEpochId());
  assert.equal(newEpochKey().length, 32);
  assert.notDeepEqual(newEpochKey(), newEpochKey());
});

test('shares: round trip; 107 characters', NEED_X, async () => {
  const bob = await generateDevice('bob', 'bob-dev-01');
  const ctx = shareContext();
  const epochKey = newEpochKey();
  const share = await sealShare(bob.dh_key, { ...ctx, epochKey });
  assert.equal(share.length, 107);
  assert.deepEqual(await openShare(bob.dh, share, ctx), epochKey);
});

test('shares: moved, altered or for another device -> bad key share', NEED_X, async () => {
  const bob = await generateDevice('bob', 'bob-dev-01');
  const carol = await generateDevice('carol', 'carol-dev-1');
  const ctx = shareContext();
  const share = await sealShare(bob.dh_key, { ...ctx, epochKey: newEpochKey() });
  for (const field of ['conversation', 'epoch', 'sender', 'senderDevice', 'recipientDevice']) {
    await rejectsWith(openShare(bob.dh, share, { ...ctx, [field]: `${ctx[field]}x` }), 'bad key share');
  }
  await rejectsWith(openShare(bob.dh, flip(share, 5), ctx), 'bad key share'); // in enc
  await rejectsWith(openShare(bob.dh, flip(share, 50), ctx), 'bad key share'); // in ct
  await rejectsWith(openShare(bob.dh, share.slice(0, -4), ctx), 'bad key share');
  await rejectsWith(openShare(bob.dh, 'not base64!', ctx), 'bad key share');
  await rejectsWith(openShare(carol.dh, share, ctx), 'bad key share');
  // An all-zero enc is a small-order point: X25519 gives zero, HPKE must refuse.
  const zero = b64url(new Uint8Array([...new Uint8Array(32), ...unb64url(share).subarray(32)]));
  await rejectsWith(openShare(bob.dh, zero, ctx), 'bad key share');
});

// -- messages ------------------------------------------------------------------

const WHERE = { conversation: 'dm:alice:bob', sender: 'alice' };
const enc = new TextEncoder();

async function sentMessage(plaintext = { t: 'msg', body: 'hello, bob' }) {
  const alice = await generateDevice('alice', 'alice-dev-1');
  const epochKey = newEpochKey();
  const e2e = await encrypt(epochKey, alice.sign.privateKey, {
    ...WHERE,
    device: alice.device,
    epoch: newEpochId(),
    plaintext,
  });
  return { alice, epochKey, where: WHERE, e2e };
}

const cat = (...parts) => new Uint8Array(Buffer.concat(parts.map((p) => Buffer.from(p))));

// The spec's bytes, written out again here (node:crypto, not the module).
function adByHand(conversation, sender, device, epoch) {
  return enc.encode(`chatd-e2e/v1 msg\n${conversation}\n${sender}\n${device}\n${epoch}`);
}
function kcByHand(epochKey) {
  return new Uint8Array(createHash('sha256').update('chatd-e2e/v1 key\n').update(epochKey).digest());
}
function signedByHand(ad, epochKey, iv, ct) {
  return cat(ad, [0x00], kcByHand(epochKey), iv, ct);
}

/** An e2e object signed by `dev` over the spec's bytes for `epochKey`, any ct. */
async function handMade(dev, epochKey, iv, ct, epoch = 'epoch-hand-0001') {
  const ad = adByHand(WHERE.conversation, WHERE.sender, dev.device, epoch);
  const signed = signedByHand(ad, epochKey, iv, ct);
  const sig = new Uint8Array(await subtle.sign({ name: 'Ed25519' }, dev.sign.privateKey, signed));
  return { v: 1, device: dev.device, epoch, iv: b64url(iv), ct: b64url(ct), sig: b64url(sig) };
}

async function aesGcm(epochKey, iv, ad, pt) {
  const key = await subtle.importKey('raw', epochKey, { name: 'AES-GCM' }, false, ['encrypt']);
  return new Uint8Array(await subtle.encrypt({ name: 'AES-GCM', iv, additionalData: ad }, key, pt));
}

test('messages: round trip; the e2e object has the spec fields', NEED_BOTH, async () => {
  const { alice, epochKey, where, e2e } = await sentMessage();
  assert.deepEqual(Object.keys(e2e).sort(), ['ct', 'device', 'epoch', 'iv', 'sig', 'v']);
  assert.equal(e2e.v, 1);
  assert.equal(unb64url(e2e.iv).length, 12);
  assert.equal(unb64url(e2e.sig).length, 64);
  const pt = await decrypt(epochKey, alice.sig_key, e2e, where);
  assert.deepEqual(pt, { t: 'msg', body: 'hello, bob' });
  assert.equal(checkKind(pt), 'hello, bob');
});

test('messages: the signed bytes are ad ‖ 0x00 ‖ kc ‖ iv ‖ ct, rebuilt by hand', NEED_BOTH, async () => {
  const { alice, epochKey, e2e } = await sentMessage({ t: 'msg', body: 'x' });
  const ad = adByHand('dm:alice:bob', 'alice', 'alice-dev-1', e2e.epoch);
  const [iv, ct, sig] = [e2e.iv, e2e.ct, e2e.sig].map(unb64url);
  const aes = await subtle.importKey('raw', epochKey, { name: 'AES-GCM' }, false, ['decrypt']);
  const pt = await subtle.decrypt({ name: 'AES-GCM', iv, additionalData: ad }, aes, ct);
  assert.deepEqual(JSON.parse(new TextDecoder().decode(pt)), { t: 'msg', body: 'x' });
  const kc = kcByHand(epochKey);
  assert.deepEqual(await keyCommitment(epochKey), kc);
  const pub = await subtle.importKey('raw', unb64url(alice.sig_key), { name: 'Ed25519' }, false, ['verify']);
  const signed = cat(ad, [0x00], kc, iv, ct);
  assert.ok(await subtle.verify({ name: 'Ed25519' }, pub, sig, signed));
  // ... and over nothing less: the old ad ‖ iv ‖ ct does not verify.
  assert.ok(!(await subtle.verify({ name: 'Ed25519' }, pub, sig, cat(ad, iv, ct))));
});

test('messages: the fixed vector (shared with the Python tests)', NEED_BOTH, async () => {
  const v = VECTOR;
  const epochKey = hex(v.epoch_key);
  const [iv, ct, sig] = [v.e2e.iv, v.e2e.ct, v.e2e.sig].map(unb64url);
  const where = { conversation: v.conversation, sender: v.sender };
  const ad = adByHand(v.conversation, v.sender, v.device, v.epoch);
  assert.equal(toHex(ad), v.ad);
  assert.equal(toHex(await keyCommitment(epochKey)), v.kc);
  assert.equal(toHex(kcByHand(epochKey)), v.kc);
  assert.equal(toHex(signedByHand(ad, epochKey, iv, ct)), v.signed);
  // Ed25519 is deterministic: the vector's seed signs the vector's bytes to its sig.
  const pkcs8 = cat(hex('302e020100300506032b657004220420'), hex(v.sign_seed));
  const priv = await subtle.importKey('pkcs8', pkcs8, { name: 'Ed25519' }, true, ['sign']);
  assert.equal((await subtle.exportKey('jwk', priv)).x, v.sig_key);
  const again = new Uint8Array(await subtle.sign({ name: 'Ed25519' }, priv, hex(v.signed)));
  assert.equal(b64url(again), v.e2e.sig);
  assert.deepEqual(await decrypt(epochKey, v.sig_key, v.e2e, where), JSON.parse(v.plaintext));
  // encrypt() with the vector's iv gives the vector's object.
  const cryptoObj = globalThis.crypto;
  const own = Object.getOwnPropertyDescriptor(cryptoObj, 'getRandomValues');
  cryptoObj.getRandomValues = (a) => {
    assert.equal(a.length, 12);
    a.set(iv);
    return a;
  };
  let got;
  try {
    const plaintext = JSON.parse(v.plaintext);
    got = await encrypt(epochKey, priv, { ...where, device: v.device, epoch: v.epoch, plaintext });
  } finally {
    if (own) Object.defineProperty(cryptoObj, 'getRandomValues', own);
    else delete cryptoObj.getRandomValues;
  }
  assert.notDeepEqual(newEpochKey(), newEpochKey()); // randomness is back
  assert.deepEqual(got, v.e2e);
  assert.deepEqual(sig, unb64url(got.sig));
});

test('messages: the key function runs after shape and device, before the signature', NEED_BOTH, async () => {
  const { alice, epochKey, where, e2e } = await sentMessage();
  let called = 0;
  const lazy = async () => {
    called += 1;
    return epochKey;
  };
  assert.equal(checkKind(await decrypt(lazy, alice.sig_key, e2e, where)), 'hello, bob');
  assert.equal(called, 1);
  // The signature covers kc, so it is checked against the key the function gave.
  await rejectsWith(decrypt(lazy, alice.sig_key, { ...e2e, sig: flip(e2e.sig) }, where), 'bad signature');
  assert.equal(called, 2);
  await rejectsWith(decrypt(lazy, alice.sig_key, { ...e2e, v: 2 }, where), 'damaged message');
  await rejectsWith(decrypt(lazy, null, e2e, where), 'unknown device');
  assert.equal(called, 2);
  const noShare = async () => null;
  const badSig = { ...e2e, sig: flip(e2e.sig) };
  await rejectsWith(decrypt(noShare, alice.sig_key, badSig, where), 'no key for this device');
  const badShare = async () => {
    throw new DecryptError('bad key share');
  };
  await rejectsWith(decrypt(badShare, alice.sig_key, badSig, where), 'bad key share');
});

test('messages: every refusal is a DecryptError with its reason, never text', NEED_BOTH, async () => {
  const { alice, epochKey, where, e2e } = await sentMessage();
  const mallory = await generateDevice('mallory');
  const cases = [
    [epochKey, null, e2e, where, 'unknown device'],
    [epochKey, mallory.sig_key, e2e, where, 'bad signature'],
    [epochKey, 'AAAA', e2e, where, 'bad signature'],
    [epochKey, alice.sig_key, { ...e2e, ct: flip(e2e.ct) }, where, 'bad signature'],
    [epochKey, alice.sig_key, { ...e2e, iv: flip(e2e.iv, 3) }, where, 'bad signature'],
    [epochKey, alice.sig_key, { ...e2e, sig: flip(e2e.sig) }, where, 'bad signature'],
    [epochKey, alice.sig_key, { ...e2e, epoch: newEpochId() }, where, 'bad signature'],
    [epochKey, alice.sig_key, e2e, { ...where, conversation: 'dm:alice:carol' }, 'bad signature'],
    [epochKey, alice.sig_key, e2e, { ...where, sender: 'bob' }, 'bad signature'],
    [newEpochKey(), alice.sig_key, e2e, where, 'bad signature'],
    [null, alice.sig_key, e2e, where, 'no key for this device'],
    [new Uint8Array(16), alice.sig_key, e2e, where, 'bad key share'],
    [epochKey, alice.sig_key, { ...e2e, v: 2 }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, v: true }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, v: '1' }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, ct: 'no base64!' }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, ct: b64url(new Uint8Array(15)) }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, iv: b64url(new Uint8Array(11)) }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, epoch: 'short' }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, epoch: `${e2e.epoch}\u0000` }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, device: `${e2e.device}\nx` }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, device: undefined }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, device: 12345678 }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, sig: 'no base64!' }, where, 'damaged message'],
    [epochKey, alice.sig_key, { ...e2e, sig: b64url(new Uint8Array(63)) }, where, 'damaged message'],
    [epochKey, alice.sig_key, null, where, 'damaged message'],
    [epochKey, alice.sig_key, [], where, 'damaged message'],
  ];
  for (const [key, sigKey, msg, ctx, reason] of cases) {
    await rejectsWith(decrypt(key, sigKey, msg, ctx), reason);
  }
});

test('messages: the first failing step is the one reported', NEED_BOTH, async () => {
  const { alice, epochKey, where, e2e } = await sentMessage({ t: 'edit', id: 'm1', body: 'hi' });
  const badCt = { ...e2e, ct: flip(e2e.ct) };
  const order = [
    [epochKey, null, { ...e2e, v: 2 }, 'damaged message'], // 1 shape before 1 device
    [null, null, badCt, 'unknown device'], // 1 before 2
    [null, alice.sig_key, badCt, 'no key for this device'], // 2 before 3
    [new Uint8Array(31), alice.sig_key, badCt, 'bad key share'], // 2 before 3
    [epochKey, alice.sig_key, badCt, 'bad signature'], // 3 before 4
  ];
  for (const [key, sigKey, msg, reason] of order) await rejectsWith(decrypt(key, sigKey, msg, where), reason);
  // 4 after 3: a ct the sender signed but that does not open.
  const garbage = await handMade(alice, epochKey, newEpochKey().subarray(0, 12), newEpochKey());
  await rejectsWith(decrypt(epochKey, alice.sig_key, garbage, where), 'damaged message');
  const mallory = await generateDevice('mallory');
  await rejectsWith(decrypt(epochKey, mallory.sig_key, garbage, where), 'bad signature');
  // 5 after 4: the kind is checked on what decrypted.
  const pt = await decrypt(epochKey, alice.sig_key, e2e, where);
  assert.throws(() => checkKind(pt), (e) => e.reason === 'wrong kind');
});

test('messages: different keys for different recipients -> bad signature', NEED_BOTH, async () => {
  // A sender could seal one key to bob and another to carol and send one
  // e2e object to both. kc ties the signature to one key: under the other
  // the signature fails, before AES-GCM is even tried.
  const { alice, epochKey, where, e2e } = await sentMessage();
  const bob = await generateDevice('bob', 'bob-dev-01');
  const carol = await generateDevice('carol', 'carol-dev-1');
  const ctx = (recipientDevice) => ({
    ...where,
    epoch: e2e.epoch,
    senderDevice: alice.device,
    recipientDevice,
  });
  const otherKey = newEpochKey();
  const toBob = await sealShare(bob.dh_key, { ...ctx(bob.device), epochKey });
  const toCarol = await sealShare(carol.dh_key, { ...ctx(carol.device), epochKey: otherKey });
  const bobReads = () => openShare(bob.dh, toBob, ctx(bob.device));
  const carolReads = () => openShare(carol.dh, toCarol, ctx(carol.device));
  assert.equal(checkKind(await decrypt(bobReads, alice.sig_key, e2e, where)), 'hello, bob');
  await rejectsWith(decrypt(carolReads, alice.sig_key, e2e, where), 'bad signature');
  await rejectsWith(decrypt(otherKey, alice.sig_key, e2e, where), 'bad signature');
});

test('messages: a byte moved between epoch and iv -> bad signature', NEED_BOTH, async () => {
  // Under the old signed bytes, ad ‖ iv ‖ ct, the first byte of iv could
  // pass for the last character of the epoch id (or the other way) and the
  // signature held. The 0x00 that now ends ad breaks it.
  const idChar = /^[A-Za-z0-9_-]$/;
  let sent;
  do sent = await sentMessage();
  while (!idChar.test(String.fromCharCode(unb64url(sent.e2e.iv)[0])));
  const { alice, epochKey, where, e2e } = sent;
  const iv = unb64url(e2e.iv);
  const ct = unb64url(e2e.ct);
  const ivIntoEpoch = {
    ...e2e,
    epoch: e2e.epoch + String.fromCharCode(iv[0]),
    iv: b64url(cat(iv.subarray(1), ct.subarray(0, 1))),
    ct: b64url(ct.subarray(1)),
  };
  const epochIntoIv = {
    ...e2e,
    epoch: e2e.epoch.slice(0, -1),
    iv: b64url(cat(enc.encode(e2e.epoch.slice(-1)), iv.subarray(0, 11))),
    ct: b64url(cat(iv.subarray(11), ct)),
  };
  const oldSigned = (o) =>
    toHex(cat(adByHand(where.conversation, where.sender, o.device, o.epoch), unb64url(o.iv), unb64url(o.ct)));
  for (const moved of [ivIntoEpoch, epochIntoIv]) {
    assert.equal(oldSigned(moved), oldSigned(e2e)); // what the old format let through
    await rejectsWith(decrypt(epochKey, alice.sig_key, moved, where), 'bad signature');
  }
});

test('messages: a signed plaintext that is no JSON object is damaged', NEED_BOTH, async () => {
  const alice = await generateDevice('alice', 'alice-dev-1');
  const epochKey = newEpochKey();
  const epoch = 'epoch-hand-0001';
  const ad = adByHand(WHERE.conversation, WHERE.sender, alice.device, epoch);
  const plaintexts = [
    enc.encode('not json'),
    new Uint8Array([0xff, 0xfe]),
    enc.encode('[1, 2]'),
    enc.encode('"msg"'),
    enc.encode('null'),
    enc.encode('{"t": "msg", "body": "hi", "n": NaN}'),
    enc.encode('\ufeff{"t": "msg", "body": "hi"}'), // a BOM is no JSON (TextDecoder would drop it)
  ];
  for (const pt of plaintexts) {
    const iv = newEpochKey().subarray(0, 12);
    const e2e = await handMade(alice, epochKey, iv, await aesGcm(epochKey, iv, ad, pt), epoch);
    await rejectsWith(decrypt(epochKey, alice.sig_key, e2e, WHERE), 'damaged message');
  }
  // The same route with a JSON object inside reads fine.
  const iv = newEpochKey().subarray(0, 12);
  const ok = enc.encode('{"body": "hi", "t": "msg"}');
  const e2e = await handMade(alice, epochKey, iv, await aesGcm(epochKey, iv, ad, ok), epoch);
  assert.deepEqual(await decrypt(epochKey, alice.sig_key, e2e, WHERE), { t: 'msg', body: 'hi' });
});

test('checkKind: message vs edit, the edited id, the body rules', () => {
  assert.equal(checkKind({ t: 'msg', body: 'hi' }), 'hi');
  assert.equal(checkKind({ t: 'edit', id: 'm1', body: 'hi!' }, { editOf: 'm1' }), 'hi!');
  const wrong = [
    [{ t: 'edit', id: 'm1', body: 'hi' }, {}],
    [{ t: 'msg', body: 'hi' }, { editOf: 'm1' }],
    [{ t: 'edit', id: 'm2', body: 'hi' }, { editOf: 'm1' }],
    [{ t: 'msg', body: '   ' }, {}],
    [{ t: 'msg', body: '\u001c\u0085 ' }, {}], // blank to Python's str.strip, as the server sees it
    [{ t: 'msg', body: 5 }, {}],
    [{ t: 'msg' }, {}],
    [{ t: 'msg', body: 'x'.repeat(4001) }, {}],
    [null, {}],
  ];
  for (const [pt, opts] of wrong) {
    assert.throws(
      () => checkKind(pt, opts),
      (e) => e instanceof DecryptError && e.reason === 'wrong kind',
    );
  }
  assert.equal(checkKind({ t: 'msg', body: '\ufeff' }), '\ufeff'); // not blank to Python
  // 4,000 characters counted as code points (an emoji is two UTF-16 units).
  assert.equal(checkKind({ t: 'msg', body: '😀'.repeat(4000) }).length, 8000);
});

test('ReplayGuard: the same triple under another message id is a replay', () => {
  const guard = new ReplayGuard();
  const [iv1, iv2] = ['AAAAAAAAAAAAAAAA', 'AAAAAAAAAAAAAAAB'];
  guard.check('dev1', 'ep1', iv1, 'm1');
  guard.check('dev1', 'ep1', iv1, 'm1'); // delivered twice: fine
  guard.check('dev1', 'ep1', iv2, 'm2');
  guard.check('dev2', 'ep1', iv1, 'm3');
  guard.check('dev1', 'ep2', iv1, 'm4');
  const replayed = (e) => e instanceof DecryptError && e.reason === 'replayed';
  assert.throws(() => guard.check('dev1', 'ep1', iv1, 'm5'), replayed);
  // Other spellings of the same 12 bytes are the same iv: raw bytes, and
  // base64url whose unused low bits differ (decoders ignore them, and so
  // does the signature, which covers the bytes).
  assert.throws(() => guard.check('dev1', 'ep1', new Uint8Array(12), 'm5'), replayed);
  guard.check('dev1', 'ep1', 'AAAAAAAAAAAAAAA', 'm6'); // 11 bytes: another iv
  assert.throws(() => guard.check('dev1', 'ep1', 'AAAAAAAAAAAAAAB', 'm7'), replayed);
  assert.throws(() => guard.check('dev1', 'ep1', 'AAAAAAAAAAAAAAA=', 'm7'), replayed);
});

// -- safety numbers ------------------------------------------------------------

const DEVS_A = [
  { device: 'zz-device', sig_key: 'S2', dh_key: 'D2' },
  { device: 'aa-device', sig_key: 'S1', dh_key: 'D1' },
  { device: 'gone-device', sig_key: 'S3', dh_key: 'D3', removed_ts: 1700000000000 },
];
const DEVS_B = [{ device: 'bob-device', sig_key: 'S4', dh_key: 'D4', removed_ts: null }];

test('safety numbers: 60 digits, symmetric, removed devices ignored, order ignored', async () => {
  const ab = await safetyNumber('alice', DEVS_A, 'bob', DEVS_B);
  assert.match(ab, /^\d{60}$/);
  assert.equal(await safetyNumber('bob', DEVS_B, 'alice', DEVS_A), ab);
  const active = [DEVS_A[0], DEVS_A[1]];
  assert.equal(await safetyNumber('alice', active.reverse(), 'bob', DEVS_B), ab);
  // The smaller username's 30 digits come first.
  const alone = await safetyNumber('alice', DEVS_A, 'zed', []);
  assert.equal(alone.slice(0, 30), ab.slice(0, 30));
  // Any change of either side's active devices changes the number.
  const more = [...DEVS_B, { device: 'bob-phone', sig_key: 'S5', dh_key: 'D5' }];
  assert.notEqual(await safetyNumber('alice', DEVS_A, 'bob', more), ab);
  const changed = [{ ...DEVS_B[0], dh_key: 'D9' }];
  assert.equal((await safetyNumber('alice', DEVS_A, 'bob', changed)).slice(0, 30), ab.slice(0, 30));
  assert.notEqual(await safetyNumber('alice', DEVS_A, 'bob', changed), ab);
});

test('safety numbers: the digits follow the spec (independent computation)', async () => {
  const { createHash } = await import('node:crypto');
  const input = Buffer.from('chatd-e2e/v1 safety\nbob\nbob-device S4 D4\n', 'utf8');
  let h = createHash('sha512').update(input).digest();
  for (let i = 0; i < 5199; i++) h = createHash('sha512').update(h).update(input).digest();
  let digits = '';
  for (let i = 0; i < 6; i++) digits += String(Number(h.readUIntBE(5 * i, 5) % 100000)).padStart(5, '0');
  const ab = await safetyNumber('alice', DEVS_A, 'bob', DEVS_B);
  assert.equal(ab.slice(30), digits);
});

test('formatSafetyNumber: 12 groups of 5', () => {
  const s = '0123456789'.repeat(6);
  assert.equal(formatSafetyNumber(s), '01234 56789 '.repeat(6).trim());
  assert.equal(formatSafetyNumber(s).split(' ').length, 12);
});
