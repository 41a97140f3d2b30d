// Reading in end-to-end mode (docs/e2e.md, docs/e2e-crypto.md "Checks"):
// a message's epoch key (this device's own epoch, or another device's
// share of it: fetched in batches, opened, kept), the six checks with the
// sender's device list, a replay guard that does not care about the order
// messages are read in, a cache of the results by message, and why a
// message that cannot be shown is not ("couldn't decrypt: …").
//
// The rules at the top are pure (tested under Node); `readMethods` are
// E2E's methods (mixed into E2E by e2e.js).

import { api } from './api.js';
import { DecryptError, b64url, checkKind, decrypt, openShare, unb64url } from './e2e-crypto.js';

const EPOCHS_PER_GET = 100; // the server's limit per request
export const NO_SHARE_TTL_MS = 30_000; // "no share for us" is believed this long before asking again
const ID = /^[A-Za-z0-9_-]{8,64}$/;

/** The verdict on a message found out to be a replay. */
export const REPLAYED = Object.freeze({ reason: 'replayed', before: false });

/** The placeholder of a message that cannot be shown: never any of its text. */
export function placeholderText(result) {
  if (result.unavailable) return `couldn't decrypt: ${result.unavailable}`;
  if (result.before) return 'sent before this device was added';
  return `couldn't decrypt: ${result.reason}`;
}

/**
 * The verdict on a message that failed a check with `reason`: {reason,
 * before}. `before`: there is no key for this device and the message
 * (sent at `ts`) is older than the device (`created`), so it was never
 * meant for it.
 */
export function unreadable(reason, ts, created) {
  const before = reason === 'no key for this device' && ts != null && ts < created;
  return { reason, before };
}

/** Has an `e2e` object the shape step 1 asks for (version 1, a device and an epoch id)? */
export function wellFormed(e) {
  return Boolean(e && typeof e === 'object' && e.v === 1 && ID.test(e.device) && ID.test(e.epoch));
}

/** What a message's result is cached by: its id and everything of it that is checked. */
export function cacheKey(m) {
  const e = m.e2e || {};
  return `${m.id} ${m.conversation} ${m.from} ${e.device} ${e.epoch} ${e.iv} ${e.sig}`;
}

/** The id of the epoch key of message `m` (another device's) as opened by device `mine` (store `keys`). */
export function keyId(mine, m) {
  return `${mine} ${m.conversation} ${m.from} ${m.e2e.device} ${m.e2e.epoch}`;
}

/** Is "no share for us", learnt at `missed` (or never: undefined), still believed at `now`? */
export function stillMissing(missed, now) {
  return Boolean(missed) && now - missed < NO_SHARE_TTL_MS;
}

/** The epochs asked for cut into the batches of successive requests, `size` at most each. */
export function epochBatches(epochs, size = EPOCHS_PER_GET) {
  const batches = [];
  for (let i = 0; i < epochs.length; i += size) batches.push(epochs.slice(i, i + size));
  return batches;
}

/** Device `mine`'s shares in a `shares` answer, by epoch. */
export function sharesFor(shares, mine) {
  return new Map(shares.filter((s) => s.to === mine).map((s) => [s.epoch, s]));
}

/**
 * Step 6 of the checks (docs/e2e-crypto.md) for a client that reads a
 * conversation out of order: the list's last message first, history pages
 * newest first. e2e-crypto.js's ReplayGuard keeps the first message *seen*
 * with a (device, epoch, iv); here the first one *sent* (lowest seq) is the
 * original and every other a replay, whatever the order they are read in.
 * A triple is tied to one conversation (its signature covers it). A copy
 * read before its original is taken back (`takeBack`); so that it was never
 * shown, the page shows a text only once every earlier message of its
 * device that it holds was read (state.js releaseSealed).
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

export const readMethods = {
  // -- epoch keys ----------------------------------------------------------------------

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
    const id = keyId(this.device.device, m);
    if (stillMissing(this.noShare.get(id), Date.now())) return null;
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
  },

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
  },

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
  },

  async flushShares(conversation) {
    const pending = this.waiting.get(conversation);
    this.waiting.delete(conversation);
    for (const some of epochBatches([...pending.keys()])) {
      const path = `/api/conversations/${encodeURIComponent(conversation)}/e2e/shares?epochs=${some.join(',')}`;
      try {
        const { shares } = await api(path, { token: this.getToken() });
        const mine = sharesFor(shares, this.device.device);
        for (const e of some) for (const w of pending.get(e)) w.resolve(mine.get(e) || null);
      } catch (err) {
        for (const e of some) for (const w of pending.get(e)) w.reject(err);
      }
    }
  },

  // -- messages ------------------------------------------------------------------------

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
  },

  /**
   * The result of `open` if it is already known: for drawing without a
   * flash, and as the last word (a replay found out after it was read).
   */
  peek(m) {
    return this.settled.get(this.cacheKey(m)) || null;
  },

  cacheKey(m) {
    return cacheKey(m);
  },

  /** A message shown before turned out to be a replay of an earlier one: say so now. */
  takeBack(id) {
    this.takenBack.add(id);
    for (const key of [...this.settled.keys()]) {
      if (!key.startsWith(`${id} `)) continue;
      this.settled.set(key, REPLAYED);
      this.results.set(key, Promise.resolve(REPLAYED));
    }
    this.onChange({ type: 'replayed', id, verdict: REPLAYED });
  },

  async openNow(m, editOf) {
    const since = Date.now();
    if (!(await this.loading)) return { reason: 'no key for this device', unavailable: this.failure };
    if (!this.device) return { retry: true }; // removed just now: a new one comes
    try {
      const e = m.e2e;
      // Step 1's shape first: a damaged object never reaches the device lookup.
      if (!wellFormed(e)) throw new DecryptError('damaged message');
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
        return unreadable(err.reason, m.ts, this.deviceCreated ?? this.device.created);
      }
      return { retry: true, error: err };
    }
  },
};
