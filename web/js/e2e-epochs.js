// Sending in end-to-end mode (docs/e2e.md "Epochs"): the epochs this device
// sends under, one current per conversation, rotated when the members,
// anyone's devices, the count or the age say so, or when the server
// answered `e2e_stale`; a new epoch's key sealed to every other device and
// uploaded in chunks, kept here so this device's own messages read back;
// sealing a message under the current epoch; and the person's switch of a
// one-to-one conversation to end-to-end (until its first encrypted send).
//
// The rules at the top are pure (tested under Node); `epochMethods` are
// E2E's methods (mixed into E2E by e2e.js).

import { api } from './api.js';
import { encrypt, newEpochId, newEpochKey, sealShare } from './e2e-crypto.js';
import { active, sameList, sorted } from './e2e-devices.js';
import { E2EError, withLock } from './e2e-store.js';

export const ROTATE_AFTER_MESSAGES = 100;
export const ROTATE_AFTER_MS = 7 * 24 * 3600 * 1000;
export const SHARES_PER_PUT = 256; // the server's limit per request
const WANT_PREFIX = 'chatd.e2e.on.';

/**
 * Why `epoch` (an own epoch record) must not be sent under any more, or
 * null when it is still the current one: "count" (ROTATE_AFTER_MESSAGES
 * sent), "age" (ROTATE_AFTER_MS old at `now`), "stale" (made before
 * `staleAt`, when the server said `e2e_stale`), "members" (the
 * conversation's `members` changed), "devices" (the `recipients`, sorted
 * device ids, changed). A count or time that is not a number rotates too.
 */
export function rotationReason(epoch, { members, recipients, staleAt = 0, now }) {
  if (!(epoch.count < ROTATE_AFTER_MESSAGES)) return 'count';
  if (!(now - epoch.created < ROTATE_AFTER_MS)) return 'age';
  if (!(epoch.created >= staleAt)) return 'stale';
  if (!sameList(epoch.members, sorted(members))) return 'members';
  if (!sameList(epoch.recipients, recipients)) return 'devices';
  return null;
}

/**
 * The devices that must get a share, from the members' device `lists`:
 * every active device but this one (`mine`), sorted by id.
 */
export function recipientsFrom(lists, mine) {
  const out = [];
  for (const list of lists) for (const d of active(list)) if (d.device !== mine) out.push(d);
  return out.sort((a, b) => (a.device < b.device ? -1 : a.device > b.device ? 1 : 0));
}

/** The shares ({device: share}) cut into the bodies' `shares` of successive uploads, `size` at most each. */
export function shareChunks(shares, size = SHARES_PER_PUT) {
  const entries = Object.entries(shares);
  const chunks = [];
  for (let i = 0; i < entries.length; i += size) chunks.push(Object.fromEntries(entries.slice(i, i + size)));
  return chunks;
}

/** The record of a new own epoch of `conv` for the `targets` devices, made at `now`, nothing sent yet. */
export function epochRecord({ epoch, key, user, device, conv, targets, now }) {
  return {
    epoch,
    user,
    device,
    conversation: conv.id,
    key,
    count: 0,
    created: now,
    members: sorted(conv.members),
    recipients: targets.map((t) => t.device),
  };
}

export const epochMethods = {
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
  },

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
  },

  isWanted(conversation) {
    return this.wanted().includes(conversation);
  },

  // -- epochs and sending ------------------------------------------------------------

  /** The server said `e2e_stale`: the next send in this conversation makes a new epoch. */
  markStale(conversation) {
    this.staleAt.set(conversation, Date.now());
  },

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
  },

  /** Devices that must get a share: every active device of every member, but this one. */
  async recipientsOf(members, { fresh = false } = {}) {
    const lists = await Promise.all(members.map((u) => this.devicesOf(u, { fresh })));
    return recipientsFrom(lists, this.device.device);
  },

  /** Is this epoch still the one to send under? */
  isCurrent(epoch, conv, recipientIds) {
    const staleAt = this.staleAt.get(conv.id) || 0;
    const reason = rotationReason(epoch, { members: conv.members, recipients: recipientIds, staleAt, now: Date.now() });
    return reason === null;
  },

  async loadCurrent(conversation) {
    const slot = `${this.device.device} ${conversation}`;
    const cur = await this.db.get('current', slot);
    return cur ? this.ownEpoch(cur.epoch) : null;
  },

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
  },

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
    const rec = epochRecord({ epoch, key, user: this.user, device: mine, conv, targets, now: Date.now() });
    await this.db.put('epochs', rec);
    this.own.set(epoch, rec);
    const path = `/api/conversations/${encodeURIComponent(conv.id)}/e2e/epochs/${epoch}`;
    for (const chunk of shareChunks(shares)) {
      await api(path, { method: 'PUT', token: this.getToken(), body: { device: mine, shares: chunk } });
    }
    await this.db.put('current', { slot: `${mine} ${conv.id}`, epoch });
    return rec;
  },

  /** One of this device's own epochs (memory, then IndexedDB), or null. */
  async ownEpoch(epoch) {
    if (this.own.has(epoch)) return this.own.get(epoch);
    const rec = await this.db.get('epochs', epoch);
    if (!rec || !this.device || rec.device !== this.device.device) return null;
    this.own.set(epoch, rec);
    return rec;
  },
};
