// Devices in end-to-end mode (docs/e2e.md "Devices"): this profile's own
// device (loaded or made in IndexedDB, registered on the server after
// login, removed on request) and every user's device list as the server
// gives it (cached, asked for again on a `devices` frame or when a message
// names a device the list does not have yet).
//
// `deviceMethods` are E2E's methods (mixed into E2E by e2e.js); the
// functions above them are pure.

import { api } from './api.js';
import { registration } from './e2e-crypto.js';
import { Db, E2EError, deleteDevice, deviceLock, loadOrCreateDevice, openDb, withLock } from './e2e-store.js';

/** The devices of a list that are not removed. */
export const active = (devices) => devices.filter((d) => d.removed_ts == null);

/** Do two lists hold the same items in the same order? */
export const sameList = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

/** A sorted copy. */
export const sorted = (list) => [...list].sort();

/** Device `id` in a list (or in no list: null), or undefined. */
export const deviceIn = (list, id) => (list || []).find((d) => d.device === id);

/** Is device `id` in `devices` and removed (tombstoned)? A device not listed is not. */
export function isRemoved(devices, id) {
  const found = deviceIn(devices, id);
  return Boolean(found && found.removed_ts != null);
}

export const deviceMethods = {
  // -- this device -------------------------------------------------------------------

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
  },

  async loadNow() {
    if (!globalThis.crypto || !crypto.subtle) throw new E2EError('it needs a secure (https) page');
    this.db = new Db(await openDb());
    this.device = await withLock(deviceLock(this.user), () => this.loadOrCreate());
    await this.loadTrust();
    return this.device.device;
  },

  loadOrCreate() {
    return loadOrCreateDevice(this.db, this.user);
  },

  /**
   * Register this device (PUT /api/e2e/devices/{id}; 200 and 201 both
   * mean done). A 409 means the id was removed (or taken): make a new
   * device and register that. Throws ApiError on other failures.
   */
  register() {
    this.registering = this.registerNow();
    return this.registering;
  },

  async registerNow() {
    if (this.retired) throw new E2EError('this device was removed');
    if (!this.device) throw new E2EError('no device loaded');
    try {
      await this.put();
    } catch (err) {
      if (err.status !== 409) throw err;
      const stale = this.device.device;
      this.device = await withLock(deviceLock(this.user), async () => {
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
      const me = deviceIn(mine, this.device.device);
      if (me) this.deviceCreated = me.created_ts;
    } catch {
      /* only used to say "sent before this device was added" */
    }
    return this.device.device;
  },

  async put() {
    const body = await registration(this.device, this.user);
    await api(`/api/e2e/devices/${encodeURIComponent(this.device.device)}`, {
      method: 'PUT',
      token: this.getToken(),
      body,
    });
  },

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
    await withLock(deviceLock(this.user), () => this.forgetDevice(id));
    this.device = null;
    this.registered = false;
  },

  /** Delete a device's keys, epochs and opened shares from IndexedDB. */
  async forgetDevice(id) {
    await deleteDevice(this.db, this.user, id);
    this.own.clear();
    this.keyCache.clear();
  },

  // -- device lists --------------------------------------------------------------------

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
  },

  listEntry(user) {
    let entry = this.lists.get(user);
    if (!entry) {
      // seq/applied: requests made and answered; freshAt/fresh: the latest request.
      entry = { devices: null, seq: 0, applied: 0, pending: null, freshAt: 0, fresh: null, next: null };
      this.lists.set(user, entry);
    }
    return entry;
  },

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
  },

  /** The cached list, or null (never asks the server). */
  cachedDevices(user) {
    const entry = this.lists.get(user);
    return entry ? entry.devices : null;
  },

  /**
   * A `devices` frame: `user`'s devices changed. Fetch the list again (trust
   * is checked there). -> {removedMe}: whether this device is no longer
   * active (removed from another tab or profile).
   */
  async onDevicesFrame(user) {
    const devices = await this.devicesOf(user, { fresh: true });
    if (user !== this.user || !this.device || this.retired) return { removedMe: false };
    return { removedMe: isRemoved(devices, this.device.device) };
  },

  /**
   * The sig_key of `user`'s `device`, or null. A device not in the cached
   * list may be newer than it: the list is asked for again, once fetched
   * after `since` (when the message was taken in), which surely has it.
   */
  async sigKeyOf(user, device, since = Date.now()) {
    let found = deviceIn(await this.devicesOf(user).catch(() => null), device);
    if (!found) found = deviceIn(await this.listSince(user, since).catch(() => null), device);
    return found ? found.sig_key : null;
  },
};
