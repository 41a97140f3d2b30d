// End-to-end encrypted conversations, the client's side (docs/e2e.md,
// docs/protocol.md "End-to-end devices" and "End-to-end conversations").
// The byte formats are e2e-crypto.js's; this module is the front of the
// state around them: the E2E object (one per logged-in user in a tab), put
// together from modules that each own a part:
//
//   e2e-store.js    IndexedDB (database `chatd-e2e`, shared by the profile's
//                   tabs), Web Locks, this profile's device record, E2EError
//   e2e-devices.js  this device (loaded or made, registered after login,
//                   removed on request) and every user's device list
//   e2e-trust.js    trust on first use: each contact's active devices
//                   remembered, a change flagged (and, for a contact the
//                   person had verified, sending paused); safety numbers and
//                   device fingerprints
//   e2e-epochs.js   the epochs this device sends under: rotation, shares
//                   uploaded in chunks, sealing; the one-to-one switch
//   e2e-read.js     decrypting a message: its epoch key (shares fetched in
//                   batches), the six checks of docs/e2e-crypto.md, a cache
//                   by message, a replay guard, the "couldn't decrypt" reasons
//   e2e-panel.js    the devices and safety-number panel (DevicesPanel), the
//                   only part with a DOM
//
// Each of those modules starts with its pure rules (tested under Node in
// web/test/e2e-rules.test.mjs) and ends with the E2E methods that use them
// (mixed in below). Importers take everything from here.

import { deviceMethods } from './e2e-devices.js';
import { epochMethods } from './e2e-epochs.js';
import { OrderedReplayGuard, readMethods } from './e2e-read.js';
import { trustMethods } from './e2e-trust.js';

export { DevicesPanel } from './e2e-panel.js';
export { ROTATE_AFTER_MESSAGES, ROTATE_AFTER_MS } from './e2e-epochs.js';
export { OrderedReplayGuard, placeholderText } from './e2e-read.js';
export { E2EError } from './e2e-store.js';

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
}

Object.assign(E2E.prototype, deviceMethods, trustMethods, epochMethods, readMethods);
