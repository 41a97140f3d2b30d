// End-to-end encryption: the exact byte formats of docs/e2e-crypto.md (v1),
// on WebCrypto alone (crypto.subtle), so the same module runs in the browser
// and in Node's test runner. No DOM, no network.
//
// HPKE (RFC 9180) is not in WebCrypto; it is built here from X25519, HMAC
// and AES-GCM, for the one suite the spec allows: mode_base,
// DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, one Seal per setup.
//
// Binary values are Uint8Arrays; keys a device keeps are CryptoKeys whose
// private halves are not extractable.

const subtle = globalThis.crypto.subtle;
const utf8 = new TextEncoder();
// ignoreBOM keeps a leading U+FEFF in the text, where JSON.parse refuses it
// (as Python's json.loads does): a BOM is not part of a JSON object.
const fromUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

const PREFIX = 'chatd-e2e/v1 ';
const MAX_BODY_CHARS = 4000;
// Device and epoch ids. The signed and HPKE inputs join fields with LF, so
// an id must never hold one (nor anything outside this set).
const ID = /^[A-Za-z0-9_-]{8,64}$/;

// -- bytes ---------------------------------------------------------------------

/** base64url without padding. */
export function b64url(bytes) {
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** Decode base64url (padding optional). Throws TypeError on anything else. */
export function unb64url(s) {
  if (typeof s !== 'string' || !/^[A-Za-z0-9_-]*={0,2}$/.test(s)) {
    throw new TypeError('not base64url');
  }
  const bare = s.replace(/=+$/, '');
  if (bare.length % 4 === 1) throw new TypeError('not base64url');
  const bin = atob(bare.replace(/-/g, '+').replace(/_/g, '/'));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function randomBytes(n) {
  return globalThis.crypto.getRandomValues(new Uint8Array(n));
}

/** Two bytes, big-endian (RFC 9180's I2OSP(n, 2)). */
function u16(n) {
  return new Uint8Array([(n >> 8) & 0xff, n & 0xff]);
}

// -- errors --------------------------------------------------------------------

const REASONS = new Set([
  'unknown device',
  'bad signature',
  'no key for this device',
  'bad key share',
  'damaged message',
  'wrong kind',
  'replayed',
]);

/** Why a message cannot be shown; `.reason` is one of the spec's reasons. */
export class DecryptError extends Error {
  constructor(reason) {
    if (!REASONS.has(reason)) throw new TypeError(`unknown decrypt failure: ${reason}`);
    super(`couldn't decrypt: ${reason}`);
    this.name = 'DecryptError';
    this.reason = reason;
  }
}

// -- devices -------------------------------------------------------------------

/**
 * A new device: an Ed25519 signing pair and an X25519 key-agreement pair,
 * private halves not extractable. `deviceId` defaults to b64url of 12
 * random bytes.
 */
export async function generateDevice(username, deviceId, name = 'web') {
  const device = deviceId || b64url(randomBytes(12));
  const sign = await subtle.generateKey({ name: 'Ed25519' }, false, ['sign', 'verify']);
  const dh = await subtle.generateKey({ name: 'X25519' }, false, ['deriveBits']);
  return {
    device,
    name,
    sign,
    dh,
    sig_key: b64url(await rawPublic(sign.publicKey)),
    dh_key: b64url(await rawPublic(dh.publicKey)),
  };
}

async function rawPublic(key) {
  return new Uint8Array(await subtle.exportKey('raw', key));
}

/** The body of PUT /api/e2e/devices/{device}: public keys and the self-signature. */
export async function registration(dev, username) {
  const text = `${PREFIX}device\n${username}\n${dev.device}\n${dev.dh_key}`;
  const sig = await subtle.sign({ name: 'Ed25519' }, dev.sign.privateKey, utf8.encode(text));
  return { sig_key: dev.sig_key, dh_key: dev.dh_key, name: dev.name, self_sig: b64url(new Uint8Array(sig)) };
}

// -- HPKE (RFC 9180), the one suite -------------------------------------------

const KEM_SUITE = concat(utf8.encode('KEM'), u16(0x0020));
const HPKE_SUITE = concat(utf8.encode('HPKE'), u16(0x0020), u16(0x0001), u16(0x0001));
const HPKE_V1 = utf8.encode('HPKE-v1');
const NK = 16; // AES-128-GCM key
const NN = 12; // nonce
const NH = 32; // SHA-256 output

async function hmac(key, data) {
  const k = await subtle.importKey('raw', key, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  return new Uint8Array(await subtle.sign('HMAC', k, data));
}

// HKDF-Extract with an empty salt means a salt of Nh zero bytes (RFC 5869).
function labeledExtract(suite, salt, label, ikm) {
  const key = salt.length ? salt : new Uint8Array(NH);
  return hmac(key, concat(HPKE_V1, suite, utf8.encode(label), ikm));
}

// HKDF-Expand by hand: WebCrypto's HKDF always extracts first.
async function labeledExpand(suite, prk, label, info, length) {
  const labeled = concat(u16(length), HPKE_V1, suite, utf8.encode(label), info);
  const out = new Uint8Array(length);
  let block = new Uint8Array(0);
  for (let i = 1, at = 0; at < length; i++) {
    block = await hmac(prk, concat(block, labeled, new Uint8Array([i])));
    out.set(block.subarray(0, length - at), at);
    at += block.length;
  }
  return out;
}

async function x25519(privateKey, publicRaw) {
  const pub = await subtle.importKey('raw', publicRaw, { name: 'X25519' }, true, []);
  const dh = new Uint8Array(await subtle.deriveBits({ name: 'X25519', public: pub }, privateKey, 256));
  // RFC 9180 7.1.4: an all-zero result (a small-order public key) must abort.
  if (dh.every((b) => b === 0)) throw new Error('X25519 gave the all-zero value');
  return dh;
}

async function extractAndExpand(dh, kemContext) {
  const prk = await labeledExtract(KEM_SUITE, new Uint8Array(0), 'eae_prk', dh);
  return labeledExpand(KEM_SUITE, prk, 'shared_secret', kemContext, NH);
}

/**
 * DHKEM Encap to the raw public key `pkR`; `ephemeral` (a CryptoKeyPair)
 * fixes the ephemeral key for known-answer tests. -> {enc, sharedSecret}
 */
export async function hpkeEncap(pkR, { ephemeral } = {}) {
  const eph = ephemeral || (await subtle.generateKey({ name: 'X25519' }, false, ['deriveBits']));
  const enc = await rawPublic(eph.publicKey);
  const dh = await x25519(eph.privateKey, pkR);
  return { enc, sharedSecret: await extractAndExpand(dh, concat(enc, pkR)) };
}

/**
 * DHKEM Decap. `recipient` is a CryptoKeyPair (its publicKey a CryptoKey or
 * raw bytes): the KEM context needs pkR, and a non-extractable private key
 * cannot give it. Throws when `enc` is no usable X25519 key.
 */
export async function hpkeDecap(recipient, enc) {
  const pkR =
    recipient.publicKey instanceof Uint8Array ? recipient.publicKey : await rawPublic(recipient.publicKey);
  const dh = await x25519(recipient.privateKey, enc);
  return extractAndExpand(dh, concat(enc, pkR));
}

/** mode_base key schedule -> {key, baseNonce, exporterSecret} (bytes). */
export async function hpkeKeySchedule(sharedSecret, info) {
  const empty = new Uint8Array(0);
  const pskIdHash = await labeledExtract(HPKE_SUITE, empty, 'psk_id_hash', empty);
  const infoHash = await labeledExtract(HPKE_SUITE, empty, 'info_hash', info);
  const context = concat(new Uint8Array([0x00]), pskIdHash, infoHash);
  const secret = await labeledExtract(HPKE_SUITE, sharedSecret, 'secret', empty);
  return {
    key: await labeledExpand(HPKE_SUITE, secret, 'key', context, NK),
    baseNonce: await labeledExpand(HPKE_SUITE, secret, 'base_nonce', context, NN),
    exporterSecret: await labeledExpand(HPKE_SUITE, secret, 'exp', context, NH),
  };
}

async function aesKey(raw, usage) {
  return subtle.importKey('raw', raw, { name: 'AES-GCM' }, false, [usage]);
}

/**
 * SealBase to the raw public key `pkR`, sequence number 0 (so the nonce is
 * base_nonce itself). -> {enc, ct} (ct with the 16-byte tag appended).
 */
export async function hpkeSeal(pkR, info, aad, pt, { ephemeral } = {}) {
  const { enc, sharedSecret } = await hpkeEncap(pkR, { ephemeral });
  const { key, baseNonce } = await hpkeKeySchedule(sharedSecret, info);
  const params = { name: 'AES-GCM', iv: baseNonce, additionalData: aad };
  const ct = new Uint8Array(await subtle.encrypt(params, await aesKey(key, 'encrypt'), pt));
  return { enc, ct };
}

/** OpenBase, sequence number 0. Throws (an OperationError) when it does not open. */
export async function hpkeOpen(recipient, enc, info, aad, ct) {
  const sharedSecret = await hpkeDecap(recipient, enc);
  const { key, baseNonce } = await hpkeKeySchedule(sharedSecret, info);
  const params = { name: 'AES-GCM', iv: baseNonce, additionalData: aad };
  return new Uint8Array(await subtle.decrypt(params, await aesKey(key, 'decrypt'), ct));
}

// -- epochs and shares ---------------------------------------------------------

const EPOCH_KEY_BYTES = 32;
const ENC_BYTES = 32;
const SHARE_BYTES = ENC_BYTES + EPOCH_KEY_BYTES + 16;

/** A fresh epoch id: b64url of 16 random bytes (22 characters). */
export function newEpochId() {
  return b64url(randomBytes(16));
}

/** A fresh epoch key: 32 random bytes. */
export function newEpochKey() {
  return randomBytes(EPOCH_KEY_BYTES);
}

function checkId(value, what) {
  if (typeof value !== 'string' || !ID.test(value)) {
    throw new TypeError(`${what} must be 8-64 characters of A-Z a-z 0-9 _ -`);
  }
}

function shareInfo({ conversation, epoch, sender, senderDevice, recipientDevice }) {
  const fields = [conversation, epoch, sender, senderDevice, recipientDevice];
  if (!fields.every((f) => typeof f === 'string')) throw new TypeError('share context must be strings');
  return utf8.encode(`${PREFIX}share\n${fields.join('\n')}`);
}

/**
 * Seal `epochKey` to one recipient device's dh_key (base64url) -> the share
 * string, b64url(enc ‖ ct). Throws TypeError on a bad key, id or epoch key.
 */
export async function sealShare(recipientDhKey, ctx) {
  checkId(ctx.epoch, 'epoch');
  checkId(ctx.senderDevice, 'senderDevice');
  checkId(ctx.recipientDevice, 'recipientDevice');
  const pkR = unb64url(recipientDhKey);
  if (pkR.length !== 32) throw new TypeError('dh_key must hold 32 bytes');
  if (!(ctx.epochKey instanceof Uint8Array) || ctx.epochKey.length !== EPOCH_KEY_BYTES) {
    throw new TypeError('an epoch key is 32 bytes');
  }
  const { enc, ct } = await hpkeSeal(pkR, shareInfo(ctx), new Uint8Array(0), ctx.epochKey);
  return b64url(concat(enc, ct));
}

/**
 * Open this device's share -> the 32-byte epoch key. `dh` is the device's
 * X25519 CryptoKeyPair. Throws DecryptError("bad key share") for anything
 * that does not open to 32 bytes under exactly this context.
 */
export async function openShare(dh, share, ctx) {
  const info = shareInfo(ctx);
  let raw;
  try {
    raw = unb64url(share);
  } catch {
    throw new DecryptError('bad key share');
  }
  if (raw.length !== SHARE_BYTES) throw new DecryptError('bad key share');
  let key;
  try {
    key = await hpkeOpen(dh, raw.subarray(0, ENC_BYTES), info, new Uint8Array(0), raw.subarray(ENC_BYTES));
  } catch {
    throw new DecryptError('bad key share');
  }
  if (key.length !== EPOCH_KEY_BYTES) throw new DecryptError('bad key share');
  return key;
}

// -- messages ------------------------------------------------------------------

const IV_BYTES = 12;
const TAG_BYTES = 16;
const SIG_BYTES = 64;

function messageAd({ conversation, sender, device, epoch }) {
  return utf8.encode(`${PREFIX}msg\n${conversation}\n${sender}\n${device}\n${epoch}`);
}

/** kc = SHA-256(utf8("chatd-e2e/v1 key\n") ‖ epoch key), 32 bytes. */
export async function keyCommitment(epochKey) {
  return new Uint8Array(await subtle.digest('SHA-256', concat(utf8.encode(`${PREFIX}key\n`), epochKey)));
}

/**
 * What a message's sig signs: ad ‖ 0x00 ‖ kc ‖ iv ‖ ct. The NUL ends ad (no
 * id or username holds one) and kc and iv have fixed sizes, so no byte can
 * pass from one field into the next; kc ties the signature to one epoch key
 * (AES-GCM does not commit to its key).
 */
async function signedBytes(ad, epochKey, iv, ct) {
  return concat(ad, new Uint8Array([0x00]), await keyCommitment(epochKey), iv, ct);
}

function isEpochKey(key) {
  return key instanceof Uint8Array && key.length === EPOCH_KEY_BYTES;
}

/**
 * Encrypt and sign `plaintext` (an object, e.g. {t: "msg", body}) under an
 * epoch -> the e2e object of a send frame. Throws TypeError on a bad epoch
 * key or id.
 */
export async function encrypt(epochKey, signPrivateKey, { conversation, sender, device, epoch, plaintext }) {
  checkId(device, 'device');
  checkId(epoch, 'epoch');
  if (!isEpochKey(epochKey)) throw new TypeError('an epoch key is 32 bytes');
  const ad = messageAd({ conversation, sender, device, epoch });
  const iv = randomBytes(IV_BYTES);
  const params = { name: 'AES-GCM', iv, additionalData: ad };
  const body = utf8.encode(JSON.stringify(plaintext));
  const ct = new Uint8Array(await subtle.encrypt(params, await aesKey(epochKey, 'encrypt'), body));
  const signed = await signedBytes(ad, epochKey, iv, ct);
  const sig = new Uint8Array(await subtle.sign({ name: 'Ed25519' }, signPrivateKey, signed));
  return { v: 1, device, epoch, iv: b64url(iv), ct: b64url(ct), sig: b64url(sig) };
}

function damagedUnlessB64(value) {
  try {
    return unb64url(value);
  } catch {
    throw new DecryptError('damaged message');
  }
}

/**
 * Step 1, the shape: v 1, device and epoch ids, a 12-byte iv, a ct of at
 * least the 16-byte tag, a 64-byte sig. Throws DecryptError("damaged message").
 */
function fields(e2e) {
  if (!e2e || typeof e2e !== 'object' || e2e.v !== 1) throw new DecryptError('damaged message');
  const { device, epoch } = e2e;
  // typeof first: RegExp.test would read undefined as "undefined", an id.
  const isId = (s) => typeof s === 'string' && ID.test(s);
  if (!isId(device) || !isId(epoch)) throw new DecryptError('damaged message');
  const iv = damagedUnlessB64(e2e.iv);
  const ct = damagedUnlessB64(e2e.ct);
  const sig = damagedUnlessB64(e2e.sig);
  if (iv.length !== IV_BYTES || ct.length < TAG_BYTES || sig.length !== SIG_BYTES) {
    throw new DecryptError('damaged message');
  }
  return { device, epoch, iv, ct, sig };
}

async function verifySignature(sigKey, sig, signed) {
  let ok = false;
  try {
    const pub = await subtle.importKey('raw', unb64url(sigKey), { name: 'Ed25519' }, false, ['verify']);
    ok = await subtle.verify({ name: 'Ed25519' }, pub, sig, signed);
  } catch {
    ok = false;
  }
  if (!ok) throw new DecryptError('bad signature');
}

async function resolveEpochKey(epochKey) {
  const key = typeof epochKey === 'function' ? await epochKey() : epochKey;
  if (key == null) throw new DecryptError('no key for this device');
  if (!isEpochKey(key)) throw new DecryptError('bad key share');
  return key;
}

async function openMessage(key, iv, ct, ad) {
  try {
    const params = { name: 'AES-GCM', iv, additionalData: ad };
    const pt = await subtle.decrypt(params, await aesKey(key, 'decrypt'), ct);
    const obj = JSON.parse(fromUtf8.decode(pt));
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) throw new Error('not an object');
    return obj;
  } catch {
    throw new DecryptError('damaged message');
  }
}

/**
 * Steps 1-4 of the recipient's checks -> the plaintext object.
 *
 * `sigKey` is the sending device's sig_key (base64url), looked up by
 * e2e.device in the sender's device list (removed devices included); null
 * when it is not there. `epochKey` is the epoch key (bytes), null when this
 * device has no share, or a function returning (a promise of) either, e.g.
 * () => openShare(...). The function is called once the shape and the
 * device have passed and before the signature is checked: the signature
 * covers kc, so it can only be checked against the key the share gave.
 *
 * Throws DecryptError, the first that fails in this order: "damaged
 * message" (not an e2e object of v1), "unknown device", "no key for this
 * device", "bad key share" (from the function, or not 32 bytes), "bad
 * signature" (also: signed for another epoch key), "damaged message" (does
 * not decrypt, or no UTF-8 JSON object inside).
 */
export async function decrypt(epochKey, sigKey, e2e, { conversation, sender }) {
  const { device, epoch, iv, ct, sig } = fields(e2e);
  if (!sigKey) throw new DecryptError('unknown device');
  const key = await resolveEpochKey(epochKey);
  const ad = messageAd({ conversation, sender, device, epoch });
  await verifySignature(sigKey, sig, await signedBytes(ad, key, iv, ct));
  return openMessage(key, iv, ct, ad);
}

// Blank as the server's Python str.strip() sees it (JS's \s differs: it
// has U+FEFF, lacks U+001C-U+001F and U+0085).
const BLANK = /^[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;

/**
 * Step 5: the plaintext must be a message ({t: "msg"}) or, with `editOf`,
 * an edit of exactly that message ({t: "edit", id: editOf}), and its body
 * must follow the plain rules. -> the body. Throws DecryptError("wrong kind").
 */
export function checkKind(plaintext, { editOf } = {}) {
  const p = plaintext || {};
  const kindOk = editOf == null ? p.t === 'msg' : p.t === 'edit' && p.id === editOf;
  const body = p.body;
  // Characters as the server counts them: code points, not UTF-16 units.
  const bodyOk = typeof body === 'string' && !BLANK.test(body) && [...body].length <= MAX_BODY_CHARS;
  if (!kindOk || !bodyOk) throw new DecryptError('wrong kind');
  return body;
}

/**
 * Step 6: a (device, epoch, iv) seen once may come again only with the same
 * message id (history reloaded, a frame delivered twice); under another id
 * it is a replay. Remembers every triple it is shown.
 */
export class ReplayGuard {
  constructor() {
    this.seen = new Map();
  }

  /**
   * `iv` as bytes or base64url text. Throws DecryptError("replayed") when
   * the triple belongs to another message (TypeError: iv not base64url).
   */
  check(device, epoch, iv, messageId) {
    // Compared as bytes: padding, or other unused low bits in the last
    // character, must not make the same (signed) iv look new. Ids and
    // base64url never hold a space.
    const key = `${device} ${epoch} ${b64url(typeof iv === 'string' ? unb64url(iv) : iv)}`;
    const first = this.seen.get(key);
    if (first === undefined) this.seen.set(key, messageId);
    else if (first !== messageId) throw new DecryptError('replayed');
  }
}

// -- safety numbers ------------------------------------------------------------

const SAFETY_ROUNDS = 5200; // one hash, then 5,199 more

async function userDigits(username, devices) {
  const active = devices.filter((d) => d.removed_ts == null);
  active.sort((a, b) => (codePointLess(a.device, b.device) ? -1 : codePointLess(b.device, a.device) ? 1 : 0));
  const lines = active.map((d) => `${d.device} ${d.sig_key} ${d.dh_key}\n`).join('');
  const input = utf8.encode(`${PREFIX}safety\n${username}\n${lines}`);
  let h = new Uint8Array(await subtle.digest('SHA-512', input));
  for (let i = 1; i < SAFETY_ROUNDS; i++) {
    h = new Uint8Array(await subtle.digest('SHA-512', concat(h, input)));
  }
  let out = '';
  for (let i = 0; i < 6; i++) {
    // Five bytes fit a double exactly (2^40 < 2^53).
    const n = h.subarray(5 * i, 5 * i + 5).reduce((acc, b) => acc * 256 + b, 0);
    out += String(n % 100000).padStart(5, '0');
  }
  return out;
}

// Code-point order, as Python compares strings (usernames are ASCII today).
function codePointLess(a, b) {
  const x = [...a].map((c) => c.codePointAt(0));
  const y = [...b].map((c) => c.codePointAt(0));
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i] < y[i];
  }
  return x.length < y.length;
}

/**
 * The 60-digit safety number of two users over their active devices
 * ({device, sig_key, dh_key, removed_ts?}; removed ones skipped): the same
 * whichever side computes it.
 */
export async function safetyNumber(userA, devicesA, userB, devicesB) {
  const a = await userDigits(userA, devicesA);
  const b = await userDigits(userB, devicesB);
  return codePointLess(userB, userA) ? b + a : a + b;
}

/** "12 groups of 5", space-separated. */
export function formatSafetyNumber(s) {
  return s.match(/.{1,5}/g).join(' ');
}
