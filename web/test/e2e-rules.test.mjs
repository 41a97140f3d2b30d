// Unit tests of end-to-end mode's pure rules under Node: `node --test web/test/`.
// The rules live at the top of web/js/e2e-devices.js, e2e-trust.js,
// e2e-epochs.js and e2e-read.js (no DOM, no IndexedDB, no network, the
// time comes in); each takes deep-frozen arguments here (support.mjs), so
// one that changes what it is given fails. The last tests put the E2E
// front (web/js/e2e.js) together with an in-memory stand-in for IndexedDB.
// The rest (IndexedDB, the server, the panel) is tested in Chromium:
// tests/web/test_web_e2e.py.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';

import { DecryptError, b64url } from '../js/e2e-crypto.js';
import { active, deviceIn, isRemoved, sameList, sorted } from '../js/e2e-devices.js';
import {
  ROTATE_AFTER_MESSAGES,
  ROTATE_AFTER_MS,
  SHARES_PER_PUT,
  epochRecord,
  recipientsFrom,
  rotationReason,
  shareChunks,
} from '../js/e2e-epochs.js';
import {
  NO_SHARE_TTL_MS,
  OrderedReplayGuard,
  REPLAYED,
  cacheKey,
  epochBatches,
  keyId,
  placeholderText,
  sharesFor,
  stillMissing,
  unreadable,
  wellFormed,
} from '../js/e2e-read.js';
import {
  deviceLines,
  fingerprint,
  firstTrust,
  trustAfterList,
  trustDismissed,
  trustId,
  trustState,
  trustVerified,
} from '../js/e2e-trust.js';
import * as front from '../js/e2e.js';
import { deepFreeze } from './support.mjs';

const T0 = 1_700_000_000_000;
const DAY = 24 * 3600 * 1000;

/** A device as the server lists it (removed when `removed` is a time). */
const dev = (device, removed = null) =>
  deepFreeze({
    device,
    name: 'web',
    sig_key: `S-${device}`,
    dh_key: `D-${device}`,
    created_ts: T0,
    removed_ts: removed,
  });

// -- device lists ----------------------------------------------------------------------

test('a device list: the active ones, a device by id, whether one was removed', () => {
  const list = deepFreeze([dev('phone-001'), dev('laptop-01', T0 + 5), dev('tablet-01')]);
  assert.deepEqual(
    active(list).map((d) => d.device),
    ['phone-001', 'tablet-01'],
  );
  assert.equal(deviceIn(list, 'tablet-01'), list[2]);
  assert.equal(deviceIn(list, 'missing-1'), undefined);
  assert.equal(deviceIn(null, 'phone-001'), undefined, 'no list (the request failed) has no device');
  assert.equal(isRemoved(list, 'laptop-01'), true);
  assert.equal(isRemoved(list, 'phone-001'), false);
  assert.equal(isRemoved(list, 'missing-1'), false, 'a device not listed is not removed');
  assert.deepEqual(sorted(deepFreeze(['b', 'a', 'c'])), ['a', 'b', 'c']);
  assert.equal(sameList(['a', 'b'], ['a', 'b']), true);
  assert.equal(sameList(['a', 'b'], ['b', 'a']), false, 'the order counts');
  assert.equal(sameList(['a'], ['a', 'b']), false);
});

// -- trust on first use ----------------------------------------------------------------

test('a contact is remembered by their active devices: id and both keys, sorted', () => {
  const lines = deviceLines(deepFreeze([dev('zeta-0001'), dev('alpha-001'), dev('gone-0001', T0)]));
  assert.deepEqual(lines, ['alpha-001 S-alpha-001 D-alpha-001', 'zeta-0001 S-zeta-0001 D-zeta-0001']);
  assert.deepEqual(deviceLines([]), []);
});

test('trust on first use: the first list is believed, nothing flagged', () => {
  const rec = firstTrust('alice', 'bob', ['a-line']);
  assert.deepEqual(rec, {
    id: 'alice bob',
    contact: 'bob',
    devices: ['a-line'],
    verified: false,
    changed: false,
    blocked: false,
  });
  assert.equal(trustId('alice', 'bob'), rec.id);
});

test('the same devices again change nothing; other devices flag a change, without pausing', () => {
  const rec = deepFreeze(firstTrust('alice', 'bob', ['a-line']));
  assert.equal(trustAfterList(rec, ['a-line'], T0), null);
  const next = trustAfterList(rec, ['a-line', 'b-line'], T0);
  assert.deepEqual(next, { ...rec, devices: ['a-line', 'b-line'], changed: true, changedAt: T0 });
  assert.equal(next.blocked, false, 'a contact nobody verified is not paused');
  // A device removed is a change too.
  assert.equal(trustAfterList(deepFreeze(next), ['b-line'], T0 + 1).changed, true);
});

test('a verified contact whose devices change is no longer verified, and sending pauses', () => {
  const verified = deepFreeze(trustVerified(null, 'alice', 'bob', ['a-line'], T0));
  assert.deepEqual(verified, {
    id: 'alice bob',
    contact: 'bob',
    devices: ['a-line'],
    verified: true,
    changed: false,
    blocked: false,
    verifiedAt: T0,
  });
  assert.equal(trustAfterList(verified, ['a-line'], T0 + 1), null, 'the same devices keep the verification');
  const changed = deepFreeze(trustAfterList(verified, ['a-line', 'b-line'], T0 + 1));
  assert.equal(changed.verified, false);
  assert.equal(changed.changed, true);
  assert.equal(changed.blocked, true);
  assert.equal(changed.changedAt, T0 + 1);
  assert.equal(changed.verifiedAt, T0, 'when it was verified is kept');

  // Verifying again (for the devices on screen) unpauses and takes the notice away.
  const again = trustVerified(changed, 'alice', 'bob', ['a-line', 'b-line'], T0 + 2);
  assert.deepEqual(
    [again.verified, again.changed, again.blocked, again.verifiedAt, again.devices],
    [true, false, false, T0 + 2, ['a-line', 'b-line']],
  );
  assert.equal(again.changedAt, T0 + 1);

  // Dismissing unpauses too, but does not verify.
  const dismissed = trustDismissed(changed);
  assert.deepEqual([dismissed.verified, dismissed.changed, dismissed.blocked], [false, false, false]);
  assert.deepEqual(dismissed.devices, changed.devices, 'the new devices stay remembered');
});

test('a contact with no record: nothing verified, changed or paused', () => {
  assert.deepEqual(trustState(undefined), { verified: false, changed: false, blocked: false });
  const rec = deepFreeze(firstTrust('alice', 'bob', []));
  assert.equal(trustState(rec), rec);
});

test("a device's fingerprint: SHA-256 of sig_key ‖ dh_key, the first 16 bytes in 8 groups", async () => {
  const sig = Buffer.alloc(32, 1);
  const dh = Buffer.alloc(32, 2);
  const d = deepFreeze({ device: 'phone-001', sig_key: b64url(sig), dh_key: b64url(dh) });
  const hex = createHash('sha256').update(Buffer.concat([sig, dh])).digest('hex').slice(0, 32);
  const print = await fingerprint(d);
  assert.equal(print, hex.match(/.{4}/g).join(' '));
  assert.match(print, /^([0-9a-f]{4} ){7}[0-9a-f]{4}$/);
  // The keys' order counts: swapping them is another device.
  assert.notEqual(await fingerprint({ sig_key: d.dh_key, dh_key: d.sig_key }), print);
});

// -- epochs and rotation ---------------------------------------------------------------

/** An own epoch of a group of alice, bob and carol, sent under `count` times. */
const epoch = (count = 0, created = T0) =>
  deepFreeze({
    epoch: 'epoch-0001',
    count,
    created,
    members: ['alice', 'bob', 'carol'],
    recipients: ['bob-phone', 'carol-web'],
  });
const now = { members: ['carol', 'alice', 'bob'], recipients: ['bob-phone', 'carol-web'], staleAt: 0, now: T0 + 1000 };

test('an epoch stays current while nothing changed (the members in any order)', () => {
  assert.equal(rotationReason(epoch(), deepFreeze(now)), null);
  assert.equal(rotationReason(epoch(ROTATE_AFTER_MESSAGES - 1), now), null);
  assert.equal(rotationReason(epoch(), { ...now, staleAt: undefined }), null, 'never stale by default');
});

test('rotation after 100 messages and after 7 days', () => {
  assert.equal(ROTATE_AFTER_MESSAGES, 100);
  assert.equal(ROTATE_AFTER_MS, 7 * DAY);
  assert.equal(rotationReason(epoch(100), now), 'count');
  assert.equal(rotationReason(epoch(0, T0 - 7 * DAY + 1), { ...now, now: T0 }), null);
  assert.equal(rotationReason(epoch(0, T0 - 7 * DAY), { ...now, now: T0 }), 'age');
  assert.equal(rotationReason(epoch(0, T0 - 8 * DAY), now), 'age');
  // A damaged record (no count, no time) is not sent under again.
  assert.equal(rotationReason({ ...epoch(), count: undefined }, now), 'count');
  assert.equal(rotationReason({ ...epoch(), created: undefined }, now), 'age');
});

test('rotation after `e2e_stale`: epochs made before the answer', () => {
  assert.equal(rotationReason(epoch(0, T0), { ...now, staleAt: T0 + 1 }), 'stale');
  assert.equal(rotationReason(epoch(0, T0 + 1), { ...now, staleAt: T0 + 1 }), null, 'one made since is fine');
});

test("rotation when the members or anyone's devices change", () => {
  assert.equal(rotationReason(epoch(), { ...now, members: ['alice', 'bob'] }), 'members');
  assert.equal(rotationReason(epoch(), { ...now, members: ['alice', 'bob', 'carol', 'dave'] }), 'members');
  assert.equal(rotationReason(epoch(), { ...now, recipients: ['bob-phone', 'bob-tablet', 'carol-web'] }), 'devices');
  assert.equal(rotationReason(epoch(), { ...now, recipients: ['carol-web'] }), 'devices');
});

test('the recipients: every active device of every member but this one, by id', () => {
  const lists = deepFreeze([
    [dev('alice-web'), dev('alice-old', T0)],
    [dev('bob-tablet'), dev('bob-phone')],
    [dev('carol-web')],
    [],
  ]);
  assert.deepEqual(
    recipientsFrom(lists, 'alice-web').map((d) => d.device),
    ['bob-phone', 'bob-tablet', 'carol-web'],
  );
  // Our own other devices get a share too.
  assert.deepEqual(
    recipientsFrom(lists, 'alice-phone').map((d) => d.device),
    ['alice-web', 'bob-phone', 'bob-tablet', 'carol-web'],
  );
  assert.deepEqual(recipientsFrom([[dev('alice-web')]], 'alice-web'), [], 'alone: nobody to encrypt for');
});

test("a new epoch's shares go up 256 at most per request, every one once", () => {
  assert.equal(SHARES_PER_PUT, 256);
  const shares = {};
  for (let i = 0; i < 600; i++) shares[`device-${String(i).padStart(4, '0')}`] = `share-${i}`;
  const chunks = shareChunks(deepFreeze(shares));
  assert.deepEqual(
    chunks.map((c) => Object.keys(c).length),
    [256, 256, 88],
  );
  assert.deepEqual(Object.assign({}, ...chunks), shares);
  assert.deepEqual(shareChunks({ 'device-0001': 's' }), [{ 'device-0001': 's' }]);
  assert.deepEqual(shareChunks({}), []);
  assert.deepEqual(
    shareChunks({ a: 1, b: 2, c: 3 }, 2).map((c) => Object.keys(c)),
    [['a', 'b'], ['c']],
  );
});

test('a new epoch record: nothing sent yet, the members sorted, the recipients it was sealed to', () => {
  const conv = deepFreeze({ id: 'g:1', members: ['carol', 'alice', 'bob'] });
  const targets = deepFreeze([dev('bob-phone'), dev('carol-web')]);
  const key = new Uint8Array(32);
  const rec = epochRecord({ epoch: 'epoch-0002', key, user: 'alice', device: 'alice-web', conv, targets, now: T0 });
  assert.deepEqual(rec, {
    epoch: 'epoch-0002',
    user: 'alice',
    device: 'alice-web',
    conversation: 'g:1',
    key,
    count: 0,
    created: T0,
    members: ['alice', 'bob', 'carol'],
    recipients: ['bob-phone', 'carol-web'],
  });
  assert.equal(rotationReason(rec, { members: conv.members, recipients: rec.recipients, now: T0 }), null);
});

// -- reading -------------------------------------------------------------------------------

test('the placeholder of a message that cannot be shown names the reason, never its text', () => {
  assert.equal(placeholderText({ reason: 'bad signature', before: false }), "couldn't decrypt: bad signature");
  const noKey = 'no key for this device';
  assert.equal(placeholderText({ reason: noKey, before: true }), 'sent before this device was added');
  assert.equal(
    placeholderText({ reason: noKey, unavailable: 'end-to-end encryption is not available here: x' }),
    "couldn't decrypt: end-to-end encryption is not available here: x",
  );
  assert.equal(placeholderText(REPLAYED), "couldn't decrypt: replayed");
  assert.ok(Object.isFrozen(REPLAYED));
});

test('"sent before this device was added": no key, and older than the device', () => {
  const created = T0;
  const noKey = 'no key for this device';
  assert.deepEqual(unreadable(noKey, T0 - 1, created), { reason: noKey, before: true });
  assert.deepEqual(unreadable(noKey, T0, created), { reason: noKey, before: false });
  assert.equal(unreadable(noKey, null, created).before, false, 'no time: not known to be older');
  assert.equal(unreadable(noKey, undefined, created).before, false);
  assert.deepEqual(unreadable('bad signature', T0 - 1, created), { reason: 'bad signature', before: false });
  assert.equal(unreadable(noKey, T0 - 1, undefined).before, false, 'no device time: not older');
});

test("step 1's shape: version 1, a device and an epoch id", () => {
  const e = deepFreeze({ v: 1, device: 'phone-001', epoch: 'epoch-0001', iv: 'AAAA', ct: 'x', sig: 'y' });
  assert.equal(wellFormed(e), true);
  for (const bad of [
    null,
    undefined,
    'a string',
    { ...e, v: 2 },
    { ...e, v: '1' },
    { ...e, device: 'short' },
    { ...e, device: 'has space 1' },
    { ...e, epoch: 'x'.repeat(65) },
    { ...e, epoch: 7 },
  ]) {
    assert.equal(wellFormed(bad), false, JSON.stringify(bad));
  }
});

test('a result is cached by the message and everything checked of it', () => {
  const m = deepFreeze({
    id: 'm1',
    conversation: 'd:alice:bob',
    from: 'bob',
    seq: 3,
    ts: T0,
    e2e: { v: 1, device: 'bob-phone', epoch: 'epoch-0001', iv: 'iv1', sig: 'sig1', ct: 'ct1' },
  });
  const key = cacheKey(m);
  assert.equal(key, 'm1 d:alice:bob bob bob-phone epoch-0001 iv1 sig1');
  assert.ok(key.startsWith('m1 '), 'takeBack finds the keys of an id by this prefix');
  assert.equal(cacheKey({ ...m, seq: 4, ts: T0 + 1 }), key, 'where it is shown does not count');
  for (const other of [
    { ...m, from: 'carol' },
    { ...m, e2e: { ...m.e2e, iv: 'iv2' } },
    { ...m, e2e: { ...m.e2e, sig: 'sig2' } },
  ]) {
    assert.notEqual(cacheKey(other), key);
  }
  const bare = cacheKey({ id: 'm2', conversation: 'c', from: 'bob' });
  assert.equal(bare, 'm2 c bob undefined undefined undefined undefined');
  assert.equal(keyId('alice-web', m), 'alice-web d:alice:bob bob bob-phone epoch-0001');
});

test('"no share for us" is believed for 30 s, then asked again', () => {
  assert.equal(NO_SHARE_TTL_MS, 30_000);
  assert.equal(stillMissing(undefined, T0), false);
  assert.equal(stillMissing(T0, T0 + NO_SHARE_TTL_MS - 1), true);
  assert.equal(stillMissing(T0, T0 + NO_SHARE_TTL_MS), false);
});

test("shares are asked for 100 epochs at a time; only this device's count", () => {
  const epochs = Array.from({ length: 250 }, (_, i) => `epoch-${String(i).padStart(4, '0')}`);
  const batches = epochBatches(deepFreeze(epochs));
  assert.deepEqual(
    batches.map((b) => b.length),
    [100, 100, 50],
  );
  assert.deepEqual(batches.flat(), epochs);
  assert.deepEqual(epochBatches([]), []);
  const answer = deepFreeze([
    { epoch: 'e1', to: 'alice-web', share: 's1' },
    { epoch: 'e1', to: 'alice-phone', share: 's1p' },
    { epoch: 'e2', to: 'alice-phone', share: 's2p' },
  ]);
  const mine = sharesFor(answer, 'alice-web');
  assert.deepEqual([...mine.keys()], ['e1']);
  assert.equal(mine.get('e1').share, 's1');
});

test('replays: the first message sent is the original, whatever order they are read in', () => {
  const guard = new OrderedReplayGuard();
  // The newest is read first (the list's last message) ...
  assert.equal(guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAAA', 'm9', 9), null);
  assert.equal(guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAAA', 'm9', 9), null, 'the same message again');
  // ... then history brings an older one with the same triple: m9 is the replay.
  assert.equal(guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAAA', 'm3', 3), 'm9');
  // Anything later with it is a replay now.
  assert.throws(
    () => guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAAA', 'm12', 12),
    (err) => err instanceof DecryptError && err.reason === 'replayed',
  );
  assert.throws(() => guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAAA', 'm9', 9), DecryptError);
  // Another device, epoch or iv is another triple.
  assert.equal(guard.check('bob-tablet', 'epoch-0001', 'AAAAAAAAAAAAAAAA', 'm10', 10), null);
  assert.equal(guard.check('bob-phone', 'epoch-0002', 'AAAAAAAAAAAAAAAA', 'm11', 11), null);
  assert.equal(guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAAB', 'm13', 13), null);
});

test('replays: the iv is compared as bytes (padding makes no new iv); no seq reads as last', () => {
  const guard = new OrderedReplayGuard();
  assert.equal(guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAA', 'm1', 1), null);
  assert.throws(() => guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAA=', 'm2', 2), DecryptError);
  assert.throws(() => guard.check('bob-phone', 'epoch-0001', 'AAAAAAAAAAAAAAA', 'live', undefined), DecryptError);
  const other = new OrderedReplayGuard();
  assert.equal(other.check('bob-phone', 'epoch-0001', 'AAAA', 'live', undefined), null);
  // A stored message is earlier than one without seq.
  assert.equal(other.check('bob-phone', 'epoch-0001', 'AAAA', 'm5', 5), 'live');
});

// -- the front: E2E put together ----------------------------------------------------

test('e2e.js keeps the names its importers use', () => {
  assert.deepEqual(Object.keys(front).sort(), [
    'DevicesPanel',
    'E2E',
    'E2EError',
    'OrderedReplayGuard',
    'ROTATE_AFTER_MESSAGES',
    'ROTATE_AFTER_MS',
    'placeholderText',
  ]);
  assert.equal(front.placeholderText, placeholderText);
  const err = new front.E2EError('no device');
  assert.ok(err instanceof Error);
  assert.equal(err.name, 'E2EError');
  const e2e = new front.E2E({ getToken: () => 'token' });
  for (const name of [
    'load', 'register', 'removeThisDevice', 'devicesOf', 'cachedDevices', 'onDevicesFrame', 'sigKeyOf',
    'noteDevices', 'trustOf', 'verify', 'dismiss', 'safety', 'fingerprint',
    'want', 'wanted', 'isWanted', 'markStale', 'seal', 'isCurrent', 'loadCurrent', 'currentEpoch', 'rotate', 'ownEpoch',
    'open', 'peek', 'cacheKey', 'takeBack',
  ]) {
    assert.equal(typeof e2e[name], 'function', name);
  }
  assert.deepEqual([e2e.ready, e2e.deviceId], [false, null]);
});

/** An in-memory stand-in for e2e-store.js's Db (no IndexedDB under Node). */
function memoryDb() {
  const stores = new Map();
  const store = (name) => stores.get(name) || stores.set(name, new Map()).get(name);
  const keyOf = { devices: 'user', epochs: 'epoch', current: 'slot', keys: 'id', trust: 'id' };
  return {
    get: async (name, key) => structuredClone(store(name).get(key)),
    all: async (name) => [...store(name).values()].map((v) => structuredClone(v)),
    put: async (name, value) => void store(name).set(value[keyOf[name]], structuredClone(value)),
    del: async (name, key) => void store(name).delete(key),
  };
}

test('E2E: trust follows the lists, is kept, and says when it changed', async () => {
  const changes = [];
  const e2e = new front.E2E({ getToken: () => 'token', onChange: (ev) => changes.push(ev) });
  e2e.user = 'alice';
  e2e.db = memoryDb();
  await e2e.noteDevices('bob', [dev('bob-phone')]);
  assert.deepEqual(e2e.trustOf('bob'), firstTrust('alice', 'bob', deviceLines([dev('bob-phone')])));
  assert.deepEqual(changes, [], 'the first list is no change');
  await e2e.verify('bob', [dev('bob-phone')]);
  assert.equal(e2e.trustOf('bob').verified, true);
  await e2e.noteDevices('bob', [dev('bob-phone'), dev('bob-tablet')]);
  assert.deepEqual([e2e.trustOf('bob').changed, e2e.trustOf('bob').blocked], [true, true]);
  // Another tab of the profile reads the same records.
  const tab = new front.E2E({ getToken: () => 'token' });
  Object.assign(tab, { user: 'alice', db: e2e.db });
  await tab.loadTrust();
  assert.deepEqual(tab.trustOf('bob'), e2e.trustOf('bob'));
  await e2e.dismiss('bob');
  assert.deepEqual([e2e.trustOf('bob').changed, e2e.trustOf('bob').blocked], [false, false]);
  assert.deepEqual(
    changes.map((c) => [c.type, c.user]),
    [
      ['trust', 'bob'],
      ['trust', 'bob'],
      ['trust', 'bob'],
    ],
  );
  await e2e.dismiss('carol'); // nobody known: nothing to do
  assert.equal(changes.length, 3);
});

test('E2E: an epoch is current until `e2e_stale` is marked for its conversation', () => {
  const e2e = new front.E2E({ getToken: () => 'token' });
  const conv = { id: 'g:1', members: ['alice', 'bob', 'carol'] };
  const ep = { ...epoch(), created: Date.now() - 1000 };
  assert.equal(e2e.isCurrent(ep, conv, ep.recipients), true);
  assert.equal(e2e.isCurrent({ ...ep, count: ROTATE_AFTER_MESSAGES }, conv, ep.recipients), false);
  e2e.markStale('g:2');
  assert.equal(e2e.isCurrent(ep, conv, ep.recipients), true, 'another conversation');
  e2e.markStale('g:1');
  assert.equal(e2e.isCurrent(ep, conv, ep.recipients), false);
});
