// End-to-end encrypted conversations, the client's side (docs/e2e.md,
// docs/protocol.md "End-to-end devices" and "End-to-end conversations").
// The byte formats are e2e-crypto.js's; this module keeps the state around
// them:
//
//  - this browser profile's device: non-extractable Ed25519 + X25519 keys
//    in IndexedDB, one per username, shared by the profile's tabs (a tab is
//    not a device), registered on the server after login;
//  - the epochs this device sends under (one current per conversation,
//    rotated when the members, anyone's devices, the count or the age say
//    so, or when the server answers `e2e_stale`), their shares uploaded in
//    chunks, their keys kept so this device's own messages read back;
//  - the keys of other devices' epochs (opened shares), fetched in batches;
//  - decrypting a message: its sender's device list, the epoch key, the six
//    checks of docs/e2e-crypto.md, a cache by message, a replay guard;
//  - trust on first use: each contact's active devices remembered, a change
//    flagged (and, for a contact the person had verified, sending paused);
//  - safety numbers and device fingerprints for the devices panel.
//
// The devices panel (DevicesPanel, at the end) draws the members' devices,
// fingerprints and safety numbers; the rest has no DOM. IndexedDB stores
// (database `chatd-e2e`):
//   devices  {user, device, name, sign, dh, sig_key, dh_key, created}  by user
//   epochs   own epochs {epoch, user, device, conversation, key, count,
//            created, members, recipients}                            by epoch
//   current  {slot: "<device> <conversation>", epoch}                  by slot
//   keys     other devices' epoch keys {id, key}     by "<my device> <conv> <sender> <device> <epoch>"
//   trust    {id: "<me> <contact>", contact, devices, verified, changed, blocked}

import { api } from './api.js';
import { ConvDialog } from './dialog.js';
import { avatar, h } from './dom.js';
import { errorText } from './errors.js';
import { icons } from './icons.js';
import {
  DecryptError,
  b64url,
  checkKind,
  decrypt,
  encrypt,
  formatSafetyNumber,
  generateDevice,
  newEpochId,
  newEpochKey,
  openShare,
  registration,
  safetyNumber,
  sealShare,
  unb64url,
} from './e2e-crypto.js';

const DB_NAME = 'chatd-e2e';
const DB_VERSION = 1;
export const ROTATE_AFTER_MESSAGES = 100;
export const ROTATE_AFTER_MS = 7 * 24 * 3600 * 1000;
const SHARES_PER_PUT = 256; // the server's limit per request
const EPOCHS_PER_GET = 100; // the server's limit per request
const NO_SHARE_TTL_MS = 30_000; // "no share for us" is believed this long before asking again
const ID = /^[A-Za-z0-9_-]{8,64}$/;
const WANT_PREFIX = 'chatd.e2e.on.';

/** A failure that is not about one message (no device, nobody to encrypt for, network). */
export class E2EError extends Error {
  constructor(message) {
    super(message);
    this.name = 'E2EError';
  }
}

// -- IndexedDB -------------------------------------------------------------------

function done(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** Open (and on first use create) the database. Throws when IndexedDB is unavailable. */
function openDb() {
  if (typeof indexedDB === 'undefined') return Promise.reject(new E2EError('no IndexedDB in this browser'));
  const req = indexedDB.open(DB_NAME, DB_VERSION);
  req.onupgradeneeded = () => {
    const db = req.result;
    db.createObjectStore('devices', { keyPath: 'user' });
    db.createObjectStore('epochs', { keyPath: 'epoch' });
    db.createObjectStore('current', { keyPath: 'slot' });
    db.createObjectStore('keys', { keyPath: 'id' });
    db.createObjectStore('trust', { keyPath: 'id' });
  };
  return done(req);
}

/** Small promise wrappers around one-request transactions. */
class Db {
  constructor(db) {
    this.db = db;
  }

  get(store, key) {
    return done(this.db.transaction(store).objectStore(store).get(key));
  }

  all(store) {
    return done(this.db.transaction(store).objectStore(store).getAll());
  }

  put(store, value) {
    return done(this.db.transaction(store, 'readwrite').objectStore(store).put(value));
  }

  del(store, key) {
    return done(this.db.transaction(store, 'readwrite').objectStore(store).delete(key));
  }
}

/**
 * Run `fn` holding a lock shared by the profile's tabs (Web Locks), so two
 * tabs do not both create a device or both rotate the same epoch.
 */
function withLock(name, fn) {
  if (globalThis.navigator && navigator.locks) return navigator.locks.request(name, fn);
  return fn();
}

// -- small helpers -------------------------------------------------------------

const active = (devices) => devices.filter((d) => d.removed_ts == null);
const sameList = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
const sorted = (list) => [...list].sort();

/** A device as remembered for trust on first use: one line of its id and keys. */
function deviceLines(devices) {
  return sorted(active(devices).map((d) => `${d.device} ${d.sig_key} ${d.dh_key}`));
}

function deviceName() {
  const platform = (navigator.userAgentData && navigator.userAgentData.platform) || navigator.platform || '';
  return `web browser${platform ? ` (${platform})` : ''}`.slice(0, 64);
}

/** The placeholder of a message that cannot be shown: never any of its text. */
export function placeholderText(result) {
  if (result.unavailable) return `couldn't decrypt: ${result.unavailable}`;
  if (result.before) return 'sent before this device was added';
  return `couldn't decrypt: ${result.reason}`;
}

const REPLAYED = Object.freeze({ reason: 'replayed', before: false });

/**
 * Step 6 of the checks (docs/e2e-crypto.md) for a client that reads a
 * conversation out of order: the list's last message first, history pages
 * newest first. e2e-crypto.js's ReplayGuard keeps the first message *seen*
 * with a (device, epoch, iv); here the first one *sent* (lowest seq) is the
 * original and every other a replay, whatever the order they are read in.
 * A triple is tied to one conversation (its signature covers it).
 */
export class OrderedReplayGuard {
  constructor() {
    this.first = new Map(); // "device epoch iv" -> {id, seq}
  }

  /**
   * Throws DecryptError("replayed") when an earlier message (lower seq)
   * carries the triple. -> the id of a message accepted before that is now
   * known to be the replay (its verdict must be taken back), or null.
   */
  check(device, epoch, iv, id, seq) {
    // iv compared as bytes: other padding or unused low bits make no new iv.
    const key = `${device} ${epoch} ${b64url(unb64url(iv))}`;
    const order = typeof seq === 'number' ? seq : Infinity;
    const held = this.first.get(key);
    if (!held || held.id === id) {
      this.first.set(key, { id, seq: Math.min(order, held ? held.seq : Infinity) });
      return null;
    }
    if (order >= held.seq) throw new DecryptError('replayed');
    this.first.set(key, { id, seq: order });
    return held.id;
  }
}

/**
 * One user's end-to-end state in this tab. `getToken` gives the current
 * access token; `onChange(event)` is called when something the page shows
 * changed: {type: "trust", user} (a contact's devices changed, verified,
 * dismissed) or {type: "replayed", id, verdict} (a message read before
 * turned out to be a replay).
 */
export class E2E {
  constructor({ getToken, onChange = () => {} }) {
    this.getToken = getToken;
    this.onChange = onChange;
    this.user = null;
    this.db = null;
    this.device = null; // the device record (keys included) once loaded
    this.registered = false;
    this.retired = false; // this device was removed here: nothing registers again in this session
    this.failure = null; // why this tab cannot do end-to-end (shown in the panel), or null
    this.loading = null; // Promise<boolean>: the device is loaded
    this.registering = null; // Promise: the last registration attempt
    this.deviceCreated = null; // the server's created_ts of this device
    this.lists = new Map(); // user -> {devices, seq, applied, pending, freshAt, fresh, next}
    this.trust = new Map(); // contact -> trust record
    this.own = new Map(); // epoch id -> own epoch record
    this.keyCache = new Map(); // key id -> Promise<Uint8Array | null>
    this.noShare = new Map(); // key id -> when the server had no share for us
    this.waiting = new Map(); // conversation -> Map(epoch -> [{resolve, reject}])
    this.results = new Map(); // message cache key -> Promise<result>
    this.settled = new Map(); // message cache key -> result
    this.staleAt = new Map(); // conversation -> epochs made before this are stale
    this.chains = new Map(); // conversation -> the tail of its encryptions, in order
    this.safetyMemo = new Map();
    this.replays = new OrderedReplayGuard();
    this.takenBack = new Set(); // ids of messages found to be replays after they were read
  }

  get deviceId() {
    return this.device ? this.device.device : null;
  }

  /** Can this tab encrypt and decrypt (device loaded and registered)? */
  get ready() {
    return Boolean(this.device && this.registered);
  }

  // -- the device ------------------------------------------------------------------

  /**
   * Load (or create) this profile's device for `user`. No network. Throws
   * E2EError / DOMException when the browser cannot keep keys (no
   * IndexedDB, no WebCrypto Ed25519/X25519, an insecure page).
   */
  load(user) {
    this.user = user;
    const run = this.loadNow();
    this.loading = run.then(
      () => true,
      (err) => {
        this.failure = `end-to-end encryption is not available here: ${err.message || err}`;
        return false;
      },
    );
    return run;
  }

  async loadNow() {
    if (!globalThis.crypto || !crypto.subtle) throw new E2EError('it needs a secure (https) page');
    this.db = new Db(await openDb());
    this.device = await withLock(`chatd-e2e-device ${this.user}`, () => this.loadOrCreate());
    for (const rec of await this.db.all('trust')) {
      if (rec.id.startsWith(`${this.user} `)) this.trust.set(rec.contact, rec);
    }
    return this.device.device;
  }

  async loadOrCreate() {
    const found = await this.db.get('devices', this.user);
    if (found) return found;
    // The private halves are not extractable: IndexedDB keeps the CryptoKey
    // objects themselves (structured clone), never the key bytes.
    const dev = await generateDevice(this.user, undefined, deviceName());
    const rec = { user: this.user, ...dev, created: Date.now() };
    await this.db.put('devices', rec);
    return rec;
  }

  /**
   * Register this device (PUT /api/e2e/devices/{id}; 200 and 201 both
   * mean done). A 409 means the id was removed (or taken): make a new
   * device and register that. Throws ApiError on other failures.
   */
  register() {
    this.registering = this.registerNow();
    return this.registering;
  }

  async registerNow() {
    if (this.retired) throw new E2EError('this device was removed');
    if (!this.device) throw new E2EError('no device loaded');
    try {
      await this.put();
    } catch (err) {
      if (err.status !== 409) throw err;
      const stale = this.device.device;
      this.device = await withLock(`chatd-e2e-device ${this.user}`, async () => {
        const cur = await this.db.get('devices', this.user);
        // Another tab may have replaced it already.
        if (cur && cur.device === stale) await this.forgetDevice(stale);
        return this.loadOrCreate();
      });
      await this.put();
    }
    this.registered = true;
    this.failure = null;
    try {
      const mine = await this.devicesOf(this.user, { fresh: true });
      const me = mine.find((d) => d.device === this.device.device);
      if (me) this.deviceCreated = me.created_ts;
    } catch {
      /* only used to say "sent before this device was added" */
    }
    return this.device.device;
  }

  async put() {
    const body = await registration(this.device, this.user);
    await api(`/api/e2e/devices/${encodeURIComponent(this.device.device)}`, {
      method: 'PUT',
      token: this.getToken(),
      body,
    });
  }

  /**
   * "Remove this device": tombstone it on the server, then delete its keys
   * here. Throws ApiError when the server refuses (a 404, already removed,
   * is fine).
   */
  async removeThisDevice() {
    const id = this.deviceId;
    if (!id) return;
    // From now on nothing in this session makes or registers a device (the
    // `devices` frame of this very removal must not bring a new one).
    this.retired = true;
    try {
      await api(`/api/e2e/devices/${encodeURIComponent(id)}`, { method: 'DELETE', token: this.getToken() });
    } catch (err) {
      if (err.status !== 404) {
        this.retired = false;
        throw err;
      }
    }
    await withLock(`chatd-e2e-device ${this.user}`, () => this.forgetDevice(id));
    this.device = null;
    this.registered = false;
  }

  /** Delete a device's keys, epochs and opened shares from IndexedDB. */
  async forgetDevice(id) {
    const cur = await this.db.get('devices', this.user);
    if (cur && cur.device === id) await this.db.del('devices', this.user);
    for (const ep of await this.db.all('epochs')) if (ep.device === id) await this.db.del('epochs', ep.epoch);
    for (const c of await this.db.all('current')) if (c.slot.startsWith(`${id} `)) await this.db.del('current', c.slot);
    for (const k of await this.db.all('keys')) if (k.id.startsWith(`${id} `)) await this.db.del('keys', k.id);
    this.own.clear();
    this.keyCache.clear();
  }

  // -- device lists ------------------------------------------------------------------

  /**
   * A user's devices (removed ones included), cached; `fresh` asks the
   * server again. Throws ApiError (a 404: no conversation shared).
   */
  async devicesOf(user, { fresh = false } = {}) {
    const entry = this.listEntry(user);
    if (!fresh && entry.devices) return entry.devices;
    if (!fresh && entry.pending) return entry.pending;
    const started = Date.now();
    const seq = ++entry.seq;
    const request = api(`/api/users/${encodeURIComponent(user)}/devices`, { token: this.getToken() }).then(
      async (r) => {
        // Answers may come out of order: an older one never overwrites a newer.
        if (seq < entry.applied) return entry.devices;
        entry.applied = seq;
        entry.devices = r.devices;
        if (user !== this.user) await this.noteDevices(user, r.devices);
        return r.devices;
      },
    );
    entry.pending = request;
    Object.assign(entry, { freshAt: started, fresh: request });
    request.then(
      () => entry.pending === request && (entry.pending = null),
      () => entry.pending === request && (entry.pending = null),
    );
    return request;
  }

  listEntry(user) {
    let entry = this.lists.get(user);
    if (!entry) {
      // seq/applied: requests made and answered; freshAt/fresh: the latest request.
      entry = { devices: null, seq: 0, applied: 0, pending: null, freshAt: 0, fresh: null, next: null };
      this.lists.set(user, entry);
    }
    return entry;
  }

  /**
   * A list of `user`'s devices fetched after `since`. Callers share one
   * request: at most one runs and one waits behind it, however many
   * messages from unknown devices arrive. Throws ApiError.
   */
  listSince(user, since) {
    const entry = this.listEntry(user);
    if (entry.fresh && entry.freshAt >= since) return entry.fresh;
    if (!entry.next) {
      const before = entry.fresh ? entry.fresh.catch(() => null) : Promise.resolve();
      entry.next = before.then(() => {
        entry.next = null;
        return this.devicesOf(user, { fresh: true });
      });
    }
    return entry.next;
  }

  /** The cached list, or null (never asks the server). */
  cachedDevices(user) {
    const entry = this.lists.get(user);
    return entry ? entry.devices : null;
  }

  /**
   * A `devices` frame: `user`'s devices changed. Fetch the list again (trust
   * is checked there). -> {removedMe}: whether this device is no longer
   * active (removed from another tab or profile).
   */
  async onDevicesFrame(user) {
    const devices = await this.devicesOf(user, { fresh: true });
    if (user !== this.user || !this.device || this.retired) return { removedMe: false };
    const me = devices.find((d) => d.device === this.device.device);
    return { removedMe: Boolean(me && me.removed_ts != null) };
  }

  /**
   * The sig_key of `user`'s `device`, or null. A device not in the cached
   * list may be newer than it: the list is asked for again, once fetched
   * after `since` (when the message was taken in), which surely has it.
   */
  async sigKeyOf(user, device, since = Date.now()) {
    const find = (list) => (list || []).find((d) => d.device === device);
    let found = find(await this.devicesOf(user).catch(() => null));
    if (!found) found = find(await this.listSince(user, since).catch(() => null));
    return found ? found.sig_key : null;
  }

  // -- trust on first use ------------------------------------------------------------

  /** Compare a contact's active devices with the ones remembered; remember, and flag a change. */
  async noteDevices(contact, devices) {
    const lines = deviceLines(devices);
    const id = `${this.user} ${contact}`;
    // IndexedDB first: another tab of this profile may have verified meanwhile.
    const rec = (await this.db.get('trust', id)) || null;
    if (!rec) {
      const first = { id, contact, devices: lines, verified: false, changed: false, blocked: false };
      this.trust.set(contact, first);
      await this.db.put('trust', first);
      return;
    }
    this.trust.set(contact, rec);
    if (sameList(rec.devices, lines)) return;
    rec.devices = lines;
    rec.changed = true;
    rec.changedAt = Date.now();
    // Only a contact the person had checked pauses sending: the new device
    // may be someone else's, and they had said they care.
    if (rec.verified) {
      rec.verified = false;
      rec.blocked = true;
    }
    await this.db.put('trust', rec);
    this.onChange({ type: 'trust', user: contact });
  }

  /** The trust record of a contact: {verified, changed, blocked} (all false when unknown). */
  trustOf(contact) {
    return this.trust.get(contact) || { verified: false, changed: false, blocked: false };
  }

  /**
   * Mark a contact verified, for `devices`: the ones whose safety number
   * was shown (by default, the ones they have now). A later change of them
   * pauses sending again.
   */
  async verify(contact, devices = null) {
    if (!devices) devices = await this.devicesOf(contact, { fresh: true });
    const rec = this.trust.get(contact) || { id: `${this.user} ${contact}`, contact };
    Object.assign(rec, { devices: deviceLines(devices), verified: true, changed: false, blocked: false });
    rec.verifiedAt = Date.now();
    this.trust.set(contact, rec);
    await this.db.put('trust', rec);
    this.onChange({ type: 'trust', user: contact });
  }

  /** Take the change notice away (and unpause sending) without verifying. */
  async dismiss(contact) {
    const rec = this.trust.get(contact);
    if (!rec) return;
    rec.changed = false;
    rec.blocked = false;
    await this.db.put('trust', rec);
    this.onChange({ type: 'trust', user: contact });
  }

  // -- safety numbers and fingerprints ---------------------------------------------

  /**
   * The formatted safety number with `contact`, over both sides' active
   * devices (asked for again unless `fresh` is false). Throws ApiError.
   */
  async safety(contact, { fresh = true } = {}) {
    const [mine, theirs] = await Promise.all([
      this.devicesOf(this.user, { fresh }),
      this.devicesOf(contact, { fresh }),
    ]);
    const key = JSON.stringify([this.user, deviceLines(mine), contact, deviceLines(theirs)]);
    if (!this.safetyMemo.has(key)) {
      this.safetyMemo.set(key, safetyNumber(this.user, mine, contact, theirs).then(formatSafetyNumber));
    }
    return this.safetyMemo.get(key);
  }

  /** A device's short fingerprint: SHA-256 over sig_key ‖ dh_key (raw), 16 bytes as 8 groups of hex. */
  async fingerprint(device) {
    const sig = unb64url(device.sig_key);
    const dh = unb64url(device.dh_key);
    const both = new Uint8Array(sig.length + dh.length);
    both.set(sig);
    both.set(dh, sig.length);
    const hash = new Uint8Array(await crypto.subtle.digest('SHA-256', both));
    const hex = Array.from(hash.subarray(0, 16), (b) => b.toString(16).padStart(2, '0')).join('');
    return hex.match(/.{4}/g).join(' ');
  }

  // -- switching a one-to-one conversation ----------------------------------------

  /** The person turned end-to-end on here; it takes effect with the first encrypted send. */
  want(conversation) {
    const list = this.wanted();
    if (!list.includes(conversation)) list.push(conversation);
    try {
      localStorage.setItem(WANT_PREFIX + this.user, JSON.stringify(list));
    } catch {
      /* private mode: for this tab only */
    }
    this.wantedHere = list;
  }

  wanted() {
    if (!this.user) return [];
    if (!this.wantedHere) {
      try {
        this.wantedHere = JSON.parse(localStorage.getItem(WANT_PREFIX + this.user) || '[]');
      } catch {
        this.wantedHere = [];
      }
    }
    return [...this.wantedHere];
  }

  isWanted(conversation) {
    return this.wanted().includes(conversation);
  }

  // -- epochs and sending ------------------------------------------------------------

  /** The server said `e2e_stale`: the next send in this conversation makes a new epoch. */
  markStale(conversation) {
    this.staleAt.set(conversation, Date.now());
  }

  /**
   * Encrypt `plaintext` ({t: "msg", body} or {t: "edit", id, body}) for
   * `conv` ({id, members}) -> the `e2e` object of a send or edit. Calls for
   * one conversation run in order. Throws E2EError (no device, nobody to
   * encrypt for) or ApiError (the device lists or the shares upload).
   */
  seal(conv, plaintext) {
    const run = async () => {
      if (!this.ready) throw new E2EError('this device is not registered for end-to-end encryption yet');
      const epoch = await this.currentEpoch(conv);
      const e2e = await encrypt(epoch.key, this.device.sign.privateKey, {
        conversation: conv.id,
        sender: this.user,
        device: this.device.device,
        epoch: epoch.epoch,
        plaintext,
      });
      epoch.count += 1;
      await this.db.put('epochs', epoch);
      return e2e;
    };
    const prev = this.chains.get(conv.id) || Promise.resolve();
    const next = prev.then(run, run);
    this.chains.set(conv.id, next.catch(() => {}));
    return next;
  }

  /** Devices that must get a share: every active device of every member, but this one. */
  async recipientsOf(members, { fresh = false } = {}) {
    const lists = await Promise.all(members.map((u) => this.devicesOf(u, { fresh })));
    const out = [];
    for (const list of lists) for (const d of active(list)) if (d.device !== this.device.device) out.push(d);
    return out.sort((a, b) => (a.device < b.device ? -1 : a.device > b.device ? 1 : 0));
  }

  /** Is this epoch still the one to send under? */
  isCurrent(epoch, conv, recipientIds) {
    return (
      epoch.count < ROTATE_AFTER_MESSAGES &&
      Date.now() - epoch.created < ROTATE_AFTER_MS &&
      epoch.created >= (this.staleAt.get(conv.id) || 0) &&
      sameList(epoch.members, sorted(conv.members)) &&
      sameList(epoch.recipients, recipientIds)
    );
  }

  async loadCurrent(conversation) {
    const slot = `${this.device.device} ${conversation}`;
    const cur = await this.db.get('current', slot);
    return cur ? this.ownEpoch(cur.epoch) : null;
  }

  async currentEpoch(conv) {
    const ids = (await this.recipientsOf(conv.members)).map((d) => d.device);
    const ep = await this.loadCurrent(conv.id);
    if (ep && this.isCurrent(ep, conv, ids)) return ep;
    return withLock(`chatd-e2e-epoch ${this.device.device} ${conv.id}`, async () => {
      // Another tab of this device may have rotated meanwhile.
      const again = await this.loadCurrent(conv.id);
      const targets = await this.recipientsOf(conv.members, { fresh: true });
      if (again && this.isCurrent(again, conv, targets.map((d) => d.device))) return again;
      try {
        return await this.rotate(conv, targets);
      } catch (err) {
        // A device went away between the lists and the upload: once more.
        if (!(err.status === 400 && err.details && err.details.unknown)) throw err;
        return this.rotate(conv, await this.recipientsOf(conv.members, { fresh: true }));
      }
    });
  }

  /**
   * A new epoch: a fresh key sealed to every recipient device (`targets`,
   * from lists fetched just now), uploaded in chunks, then made current.
   * The key is stored before the upload, so this device's own messages
   * under it always read back (in every tab). Throws E2EError (no target),
   * ApiError (the upload).
   */
  async rotate(conv, targets) {
    // The server takes no epoch without a share: with no other device
    // anywhere (not even one of our own) there is nobody to encrypt for.
    if (!targets.length) throw new E2EError('no other device can read end-to-end messages here yet');
    const epoch = newEpochId();
    const key = newEpochKey();
    const mine = this.device.device;
    const shares = {};
    for (const t of targets) {
      const ctx = { conversation: conv.id, epoch, sender: this.user, senderDevice: mine, recipientDevice: t.device };
      shares[t.device] = await sealShare(t.dh_key, { ...ctx, epochKey: key });
    }
    const rec = {
      epoch,
      user: this.user,
      device: mine,
      conversation: conv.id,
      key,
      count: 0,
      created: Date.now(),
      members: sorted(conv.members),
      recipients: targets.map((t) => t.device),
    };
    await this.db.put('epochs', rec);
    this.own.set(epoch, rec);
    const path = `/api/conversations/${encodeURIComponent(conv.id)}/e2e/epochs/${epoch}`;
    const entries = Object.entries(shares);
    for (let i = 0; i < entries.length; i += SHARES_PER_PUT) {
      const chunk = Object.fromEntries(entries.slice(i, i + SHARES_PER_PUT));
      await api(path, { method: 'PUT', token: this.getToken(), body: { device: mine, shares: chunk } });
    }
    await this.db.put('current', { slot: `${mine} ${conv.id}`, epoch });
    return rec;
  }

  /** One of this device's own epochs (memory, then IndexedDB), or null. */
  async ownEpoch(epoch) {
    if (this.own.has(epoch)) return this.own.get(epoch);
    const rec = await this.db.get('epochs', epoch);
    if (!rec || !this.device || rec.device !== this.device.device) return null;
    this.own.set(epoch, rec);
    return rec;
  }

  // -- receiving -----------------------------------------------------------------------

  /**
   * The epoch key of a message (`from`, `conversation`, `e2e.device`,
   * `e2e.epoch`), or null when this device has no share. Throws
   * DecryptError("bad key share") for a share that does not open, ApiError
   * when the shares cannot be fetched.
   */
  async epochKeyOf(m) {
    const { device, epoch } = m.e2e;
    if (device === this.device.device) {
      // This device's own epoch: never shared with itself, kept here.
      const own = await this.ownEpoch(epoch);
      return own && own.conversation === m.conversation && own.user === m.from ? own.key : null;
    }
    const id = `${this.device.device} ${m.conversation} ${m.from} ${device} ${epoch}`;
    const missed = this.noShare.get(id);
    if (missed && Date.now() - missed < NO_SHARE_TTL_MS) return null;
    if (!this.keyCache.has(id)) {
      const p = this.loadKey(id, m);
      this.keyCache.set(id, p);
      // A network failure is worth another try; a missing share for a while.
      p.then(
        (key) => {
          if (key) return;
          this.keyCache.delete(id);
          this.noShare.set(id, Date.now());
        },
        (err) => !(err instanceof DecryptError) && this.keyCache.delete(id),
      );
    }
    return this.keyCache.get(id);
  }

  async loadKey(id, m) {
    const stored = await this.db.get('keys', id);
    if (stored) return stored.key;
    const share = await this.fetchShare(m.conversation, m.e2e.epoch);
    if (!share) return null;
    // The share is opened for the sender and device the message claims: a
    // share made by anyone else does not open ("bad key share").
    const key = await openShare(this.device.dh, share.share, {
      conversation: m.conversation,
      epoch: m.e2e.epoch,
      sender: m.from,
      senderDevice: m.e2e.device,
      recipientDevice: this.device.device,
    });
    await this.db.put('keys', { id, key });
    return key;
  }

  /** This device's share of `epoch` (batched: one GET for the epochs asked within a tick), or null. */
  fetchShare(conversation, epoch) {
    return new Promise((resolve, reject) => {
      let pending = this.waiting.get(conversation);
      if (!pending) {
        pending = new Map();
        this.waiting.set(conversation, pending);
        setTimeout(() => this.flushShares(conversation), 0);
      }
      if (!pending.has(epoch)) pending.set(epoch, []);
      pending.get(epoch).push({ resolve, reject });
    });
  }

  async flushShares(conversation) {
    const pending = this.waiting.get(conversation);
    this.waiting.delete(conversation);
    const epochs = [...pending.keys()];
    for (let i = 0; i < epochs.length; i += EPOCHS_PER_GET) {
      const some = epochs.slice(i, i + EPOCHS_PER_GET);
      const path = `/api/conversations/${encodeURIComponent(conversation)}/e2e/shares?epochs=${some.join(',')}`;
      try {
        const { shares } = await api(path, { token: this.getToken() });
        const mine = new Map(shares.filter((s) => s.to === this.device.device).map((s) => [s.epoch, s]));
        for (const e of some) for (const w of pending.get(e)) w.resolve(mine.get(e) || null);
      } catch (err) {
        for (const e of some) for (const w of pending.get(e)) w.reject(err);
      }
    }
  }

  /**
   * Decrypt and check a message (or, with `editOf`, an edit of that
   * message): {id, conversation, from, seq, ts, e2e}. Never throws. Resolves
   * {body} when all six checks pass; {reason, before} when it must not be
   * shown (`before`: no key, and older than this device); {reason,
   * unavailable} when this browser cannot decrypt at all; {retry: true}
   * when it could not be tried now (the device just removed, the network).
   */
  open(m, { editOf = null } = {}) {
    const key = this.cacheKey(m);
    if (!this.results.has(key)) {
      const p = this.openNow(m, editOf).then((r) => {
        if (r.retry) {
          this.results.delete(key);
          return r;
        }
        const verdict = this.takenBack.has(m.id) ? REPLAYED : r;
        this.settled.set(key, verdict);
        return verdict;
      });
      this.results.set(key, p);
    }
    return this.results.get(key);
  }

  /**
   * The result of `open` if it is already known: for drawing without a
   * flash, and as the last word (a replay found out after it was read).
   */
  peek(m) {
    return this.settled.get(this.cacheKey(m)) || null;
  }

  cacheKey(m) {
    const e = m.e2e || {};
    return `${m.id} ${m.conversation} ${m.from} ${e.device} ${e.epoch} ${e.iv} ${e.sig}`;
  }

  /** A message shown before turned out to be a replay of an earlier one: say so now. */
  takeBack(id) {
    this.takenBack.add(id);
    for (const key of [...this.settled.keys()]) {
      if (!key.startsWith(`${id} `)) continue;
      this.settled.set(key, REPLAYED);
      this.results.set(key, Promise.resolve(REPLAYED));
    }
    this.onChange({ type: 'replayed', id, verdict: REPLAYED });
  }

  async openNow(m, editOf) {
    const since = Date.now();
    if (!(await this.loading)) return { reason: 'no key for this device', unavailable: this.failure };
    if (!this.device) return { retry: true }; // removed just now: a new one comes
    try {
      const e = m.e2e;
      // Step 1's shape first: a damaged object never reaches the device lookup.
      if (!e || typeof e !== 'object' || e.v !== 1 || !ID.test(e.device) || !ID.test(e.epoch)) {
        throw new DecryptError('damaged message');
      }
      const sigKey = await this.sigKeyOf(m.from, e.device, since);
      const plaintext = await decrypt(() => this.epochKeyOf(m), sigKey, e, {
        conversation: m.conversation,
        sender: m.from,
      });
      const body = checkKind(plaintext, { editOf });
      // An edit is checked under its message's id (and seq): history then
      // carries the same (latest) e2e object for that id.
      const replay = this.replays.check(e.device, e.epoch, e.iv, m.id, m.seq);
      if (replay) this.takeBack(replay);
      return { body };
    } catch (err) {
      if (err instanceof DecryptError) {
        // "Older than this device" needs the server's time of registration.
        if (err.reason === 'no key for this device' && this.registering) await this.registering.catch(() => {});
        const created = this.deviceCreated ?? this.device.created;
        const before = err.reason === 'no key for this device' && m.ts != null && m.ts < created;
        return { reason: err.reason, before };
      }
      return { retry: true, error: err };
    }
  }
}


// -- the devices panel -------------------------------------------------------------

const dateFmt = new Intl.DateTimeFormat(undefined, { day: 'numeric', month: 'short', year: 'numeric' });

/**
 * The encryption panel of a conversation (a modal <dialog> opened from the
 * chat header, see dialog.js): whether it is end-to-end (and, in a
 * one-to-one chat that is not, the switch), every member's active devices
 * with their fingerprints, the safety number with each contact and "mark
 * as verified", and "remove this device". Everything shown comes from the
 * server's device lists, fetched again on open and on a `devices` frame
 * (`refresh`).
 */
export class DevicesPanel extends ConvDialog {
  constructor(app, root = document) {
    super(app, root, {
      dialog: 'e2e-dialog',
      close: 'e2e-close',
      status: 'e2e-status',
      enable: 'e2e-enable',
      members: 'e2e-members',
      error: 'e2e-error',
      remove: 'e2e-remove-device',
    });
    this.data = null; // [{user, devices, prints, safety, error}] once loaded
    this.version = 0;
    this.el.enable.addEventListener('click', () => this.turnOn());
    this.el.remove.addEventListener('click', () => this.removeDevice());
  }

  open(convId) {
    this.data = null;
    super.open(convId);
    this.refresh();
  }

  /** The people shown: me first, then the others by name. */
  people(conv) {
    const others = this.app.others(conv).filter((u) => u !== this.app.me).sort();
    return [this.app.me, ...others];
  }

  /** Fetch the device lists, fingerprints and safety numbers again, then draw. */
  async refresh() {
    const conv = this.conv;
    const e2e = this.app.e2e;
    if (!conv || !e2e.device) {
      this.render();
      return;
    }
    const version = ++this.version;
    // Every list asked for again once, then the numbers over those lists.
    await e2e.devicesOf(this.app.me, { fresh: true }).catch(() => null);
    const load = async (user) => {
      const entry = { user, devices: [], prints: new Map(), safety: null, error: null };
      try {
        const fresh = user !== this.app.me;
        entry.devices = (await e2e.devicesOf(user, { fresh })).filter((d) => d.removed_ts == null);
        for (const d of entry.devices) entry.prints.set(d.device, await e2e.fingerprint(d));
        if (user !== this.app.me) entry.safety = await e2e.safety(user, { fresh: false });
      } catch (err) {
        entry.error = err.status === 404 ? 'not visible to you' : errorText(err.code, err.message);
      }
      return entry;
    };
    const data = await Promise.all(this.people(conv).map(load));
    if (version !== this.version || this.conv?.id !== conv.id) return; // a newer refresh, or closed
    this.data = data;
    this.sig = null;
    this.render();
  }

  /** Draw the panel of `conv` (while open, on every render of the app; cheap when nothing changed). */
  draw(conv) {
    const app = this.app;
    const e2e = app.e2e;
    const on = app.isE2E(conv);
    const dm = conv.kind === 'dm';
    const el = this.el;
    el.status.dataset.state = on ? 'on' : 'off';
    el.status.textContent = on
      ? 'Messages here are end-to-end encrypted: only the devices listed below can read them. The server sees who writes when, never what.'
      : conv.provisional
        ? 'Not end-to-end encrypted yet. Send a first message to start the conversation; then it can be switched on.'
        : 'Not end-to-end encrypted: the server can read these messages (they are encrypted at rest only).';
    el.enable.hidden = on || !dm || Boolean(conv.left);
    el.enable.disabled = Boolean(conv.provisional) || !e2e.device;
    el.remove.hidden = !e2e.device;
    const trust = this.data ? this.data.map((d) => e2e.trustOf(d.user)) : null;
    const sig = JSON.stringify([this.data && this.data.map((d) => [d.user, d.devices, d.safety, d.error]), trust, e2e.deviceId]);
    if (sig === this.sig) return;
    this.sig = sig;
    const entries = this.data
      ? this.data.map((d) => this.memberEl(d))
      : [h('p', { class: 'muted', testid: 'e2e-loading' }, 'Loading devices…')];
    this.replaceList(el.members, entries);
  }

  memberEl(entry) {
    const app = this.app;
    const e2e = app.e2e;
    const me = entry.user === app.me;
    const trust = e2e.trustOf(entry.user);
    const parts = [
      h(
        'div',
        { class: 'e2e-member-head' },
        avatar(entry.user, 'small'),
        h('strong', { class: 'member-name' }, entry.user, me ? h('span', { class: 'muted' }, ' (you)') : null),
        !me && trust.verified
          ? h('span', { class: 'verified-badge', testid: 'e2e-verified', title: 'You compared the safety number' }, 'verified')
          : null,
      ),
    ];
    if (entry.error) parts.push(h('p', { class: 'form-error' }, `Devices: ${entry.error}`));
    if (!me && entry.safety) parts.push(this.safetyEl(entry, trust));
    parts.push(
      entry.devices.length
        ? h('ul', { class: 'e2e-devices' }, entry.devices.map((d) => this.deviceEl(entry, d)))
        : h('p', { class: 'muted', testid: 'e2e-no-devices' }, me ? 'No devices.' : `${entry.user} has no device for end-to-end messages yet.`),
    );
    return h('section', { class: 'e2e-member', testid: 'e2e-member', dataset: { name: entry.user } }, parts);
  }

  safetyEl(entry, trust) {
    const e2e = this.app.e2e;
    const user = entry.user;
    const changed = trust.changed
      ? h(
          'p',
          { class: 'e2e-changed', testid: 'e2e-changed' },
          trust.blocked
            ? `${user}'s devices changed since you verified them. Compare the new number, then verify again.`
            : `${user}'s devices changed.`,
        )
      : null;
    const verify = h(
      'button',
      {
        type: 'button',
        class: 'small',
        testid: 'e2e-verify',
        'aria-label': `Mark ${user} as verified`,
        // Verified: the devices whose number is on screen.
        onclick: () => this.act(() => e2e.verify(user, entry.devices)),
      },
      trust.verified ? 'Verify again' : 'Mark as verified',
    );
    const dismiss = trust.changed
      ? h(
          'button',
          { type: 'button', class: 'small secondary', testid: 'e2e-dismiss', onclick: () => this.act(() => e2e.dismiss(user)) },
          'Dismiss',
        )
      : null;
    return h(
      'div',
      { class: 'safety' },
      h('span', { class: 'safety-label' }, `Safety number with ${user}`),
      h('code', { class: 'safety-number', testid: 'safety-number', dataset: { user } }, entry.safety),
      h(
        'p',
        { class: 'muted safety-help' },
        `Compare it with the one ${user} sees (in person, or on a call). The same number means nobody is in between.`,
      ),
      changed,
      h('div', { class: 'row' }, trust.verified && !trust.changed ? null : verify, dismiss),
    );
  }

  deviceEl(entry, d) {
    const here = entry.user === this.app.me && d.device === this.app.e2e.deviceId;
    const added = d.created_ts ? `added ${dateFmt.format(new Date(d.created_ts))}` : '';
    return h(
      'li',
      { class: `e2e-device${here ? ' here' : ''}`, testid: 'e2e-device', dataset: { device: d.device } },
      icons.device(),
      h(
        'span',
        { class: 'e2e-device-text' },
        h('span', { class: 'e2e-device-name' }, d.name || 'device', here ? h('strong', null, ' · this device') : null),
        h('code', { class: 'fingerprint', testid: 'device-fingerprint', title: 'SHA-256 of its public keys' }, entry.prints.get(d.device) || ''),
        h('span', { class: 'muted' }, added),
      ),
    );
  }

  async act(fn) {
    this.el.error.textContent = '';
    try {
      await fn();
    } catch (err) {
      this.showError(err);
    }
    this.sig = null;
    this.app.scheduleRender();
  }

  /** Switch a one-to-one conversation to end-to-end (asked first: it is one way). */
  async turnOn() {
    const conv = this.conv;
    if (!conv) return;
    const peer = this.app.others(conv)[0];
    const ok = await this.app.confirm({
      title: 'Turn on end-to-end encryption?',
      text:
        `From your next message on, what you and ${peer} write here is encrypted on your devices and only ` +
        `your and ${peer}'s devices can read it. This cannot be turned off again, and devices added later ` +
        'cannot read what was sent before them.',
      ok: 'Turn on',
    });
    if (!ok || !this.conv) return;
    this.app.turnOnE2E(conv.id);
    this.sig = null;
    this.render();
  }

  /** "Remove this device": its keys are deleted here and it is removed on the server; then log out. */
  async removeDevice() {
    const ok = await this.app.confirm({
      title: 'Remove this device?',
      text:
        'Its keys are deleted from this browser and the others stop encrypting for it: end-to-end messages ' +
        'cannot be read here any more. You are logged out; logging in again makes a new device.',
      ok: 'Remove',
    });
    if (!ok) return;
    try {
      await this.app.e2e.removeThisDevice();
    } catch (err) {
      this.showError(err);
      return;
    }
    this.close();
    this.app.logout({ force: true });
  }
}
