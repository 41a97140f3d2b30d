// Trust on first use (docs/e2e.md): each contact's active devices are
// remembered the first time their list comes; a later list with other
// devices flags a change, and for a contact the person had verified (by
// comparing the safety number) pauses sending until they verify again or
// dismiss the notice. Also the safety numbers and device fingerprints the
// devices panel shows.
//
// The record of a contact, kept in IndexedDB (store `trust`, see
// e2e-store.js) and in `E2E.trust`:
//   {id: "<me> <contact>", contact, devices, verified, changed, blocked,
//    changedAt?, verifiedAt?}
// where `devices` are the contact's deviceLines. The functions at the top
// are pure: each returns a new record and never changes the one it is
// given. `trustMethods` are E2E's methods (mixed into E2E by e2e.js).

import { formatSafetyNumber, safetyNumber, unb64url } from './e2e-crypto.js';
import { active, sameList, sorted } from './e2e-devices.js';

/** A device as remembered for trust on first use: one line of its id and keys, active ones only, sorted. */
export function deviceLines(devices) {
  return sorted(active(devices).map((d) => `${d.device} ${d.sig_key} ${d.dh_key}`));
}

/** The id of `me`'s record about `contact`. */
export const trustId = (me, contact) => `${me} ${contact}`;

/** The first record of a contact: their devices `lines` remembered, nothing flagged. */
export function firstTrust(me, contact, lines) {
  return { id: trustId(me, contact), contact, devices: lines, verified: false, changed: false, blocked: false };
}

/**
 * The record after the contact's list came again with `lines` (at `now`):
 * null when the devices are the ones remembered. Otherwise they are
 * remembered and the change flagged; a verified contact is no longer
 * verified and sending to them pauses (`blocked`): the new device may be
 * someone else's, and the person had said they care.
 */
export function trustAfterList(rec, lines, now) {
  if (sameList(rec.devices, lines)) return null;
  const next = { ...rec, devices: lines, changed: true, changedAt: now };
  if (rec.verified) Object.assign(next, { verified: false, blocked: true });
  return next;
}

/**
 * The record once the person verified the contact (at `now`) for the
 * devices `lines` whose safety number they compared: the notice gone,
 * sending unpaused. `rec` is the record so far, or null.
 */
export function trustVerified(rec, me, contact, lines, now) {
  const base = rec || { id: trustId(me, contact), contact };
  return { ...base, devices: lines, verified: true, changed: false, blocked: false, verifiedAt: now };
}

/** The record with the change notice taken away and sending unpaused, without verifying. */
export function trustDismissed(rec) {
  return { ...rec, changed: false, blocked: false };
}

/** The trust of a contact to go by: their record, or nothing verified, changed or paused. */
export function trustState(rec) {
  return rec || { verified: false, changed: false, blocked: false };
}

/** A device's short fingerprint: SHA-256 over sig_key ‖ dh_key (raw), 16 bytes as 8 groups of hex. */
export async function fingerprint(device) {
  const sig = unb64url(device.sig_key);
  const dh = unb64url(device.dh_key);
  const both = new Uint8Array(sig.length + dh.length);
  both.set(sig);
  both.set(dh, sig.length);
  const hash = new Uint8Array(await crypto.subtle.digest('SHA-256', both));
  const hex = Array.from(hash.subarray(0, 16), (b) => b.toString(16).padStart(2, '0')).join('');
  return hex.match(/.{4}/g).join(' ');
}

export const trustMethods = {
  /** Read this user's records from IndexedDB (after loading the device). */
  async loadTrust() {
    for (const rec of await this.db.all('trust')) {
      if (rec.id.startsWith(`${this.user} `)) this.trust.set(rec.contact, rec);
    }
  },

  /** Compare a contact's active devices with the ones remembered; remember, and flag a change. */
  async noteDevices(contact, devices) {
    const lines = deviceLines(devices);
    // IndexedDB first: another tab of this profile may have verified meanwhile.
    const rec = (await this.db.get('trust', trustId(this.user, contact))) || null;
    if (!rec) {
      const first = firstTrust(this.user, contact, lines);
      this.trust.set(contact, first);
      await this.db.put('trust', first);
      return;
    }
    const next = trustAfterList(rec, lines, Date.now());
    this.trust.set(contact, next || rec);
    if (!next) return;
    await this.db.put('trust', next);
    this.onChange({ type: 'trust', user: contact });
  },

  /** The trust record of a contact: {verified, changed, blocked} (all false when unknown). */
  trustOf(contact) {
    return trustState(this.trust.get(contact));
  },

  /**
   * Mark a contact verified, for `devices`: the ones whose safety number
   * was shown (by default, the ones they have now). A later change of them
   * pauses sending again.
   */
  async verify(contact, devices = null) {
    if (!devices) devices = await this.devicesOf(contact, { fresh: true });
    const rec = trustVerified(this.trust.get(contact) || null, this.user, contact, deviceLines(devices), Date.now());
    this.trust.set(contact, rec);
    await this.db.put('trust', rec);
    this.onChange({ type: 'trust', user: contact });
  },

  /** Take the change notice away (and unpause sending) without verifying. */
  async dismiss(contact) {
    const rec = this.trust.get(contact);
    if (!rec) return;
    const next = trustDismissed(rec);
    this.trust.set(contact, next);
    await this.db.put('trust', next);
    this.onChange({ type: 'trust', user: contact });
  },

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
  },

  /** A device's short fingerprint (see `fingerprint` above). */
  fingerprint(device) {
    return fingerprint(device);
  },
};
