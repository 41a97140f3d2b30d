// Where end-to-end mode keeps its keys (docs/e2e.md): this browser
// profile's IndexedDB, shared by its tabs, and the Web Locks that keep two
// tabs from doing the same thing at once. The database `chatd-e2e`:
//
//   devices  {user, device, name, sign, dh, sig_key, dh_key, created}  by user
//   epochs   own epochs {epoch, user, device, conversation, key, count,
//            created, members, recipients}                            by epoch
//   current  {slot: "<device> <conversation>", epoch}                  by slot
//   keys     other devices' epoch keys {id, key}     by "<my device> <conv> <sender> <device> <epoch>"
//   trust    {id: "<me> <contact>", contact, devices, verified, changed, blocked}
//
// Here are the database, this profile's device record in it (made on first
// use, deleted with everything kept for it) and E2EError; what the records
// mean is the other e2e-*.js modules'.

import { generateDevice } from './e2e-crypto.js';

const DB_NAME = 'chatd-e2e';
const DB_VERSION = 1;

/** A failure that is not about one message (no device, nobody to encrypt for, network). */
export class E2EError extends Error {
  constructor(message) {
    super(message);
    this.name = 'E2EError';
  }
}

function done(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** Open (and on first use create) the database. Throws when IndexedDB is unavailable. */
export function openDb() {
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
export class Db {
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
export function withLock(name, fn) {
  if (globalThis.navigator && navigator.locks) return navigator.locks.request(name, fn);
  return fn();
}

/** The lock around `user`'s device record (making, replacing, forgetting it). */
export const deviceLock = (user) => `chatd-e2e-device ${user}`;

function deviceName() {
  const platform = (navigator.userAgentData && navigator.userAgentData.platform) || navigator.platform || '';
  return `web browser${platform ? ` (${platform})` : ''}`.slice(0, 64);
}

/** `user`'s device record in `db` (a Db), made and stored first when there is none. Hold deviceLock(user). */
export async function loadOrCreateDevice(db, user) {
  const found = await db.get('devices', user);
  if (found) return found;
  // The private halves are not extractable: IndexedDB keeps the CryptoKey
  // objects themselves (structured clone), never the key bytes.
  const dev = await generateDevice(user, undefined, deviceName());
  const rec = { user, ...dev, created: Date.now() };
  await db.put('devices', rec);
  return rec;
}

/** Delete device `id` of `user` from `db`: its keys, own epochs, current slots and opened shares. */
export async function deleteDevice(db, user, id) {
  const cur = await db.get('devices', user);
  if (cur && cur.device === id) await db.del('devices', user);
  for (const ep of await db.all('epochs')) if (ep.device === id) await db.del('epochs', ep.epoch);
  for (const c of await db.all('current')) if (c.slot.startsWith(`${id} `)) await db.del('current', c.slot);
  for (const k of await db.all('keys')) if (k.id.startsWith(`${id} `)) await db.del('keys', k.id);
}
