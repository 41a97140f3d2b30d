// A replayed end-to-end message is never shown as text and never reported
// `seen`, whatever order the page reads it and its original in
// (docs/e2e.md "Replays"). Under Node, no browser: the page's own reading
// and seen code (protocol.js `readSealed`, `flush`; render.js `reportSeen`)
// on the real E2E front (e2e.js: the six checks, the replay guard, the
// cache) and the real state updates, with messages really sealed and
// signed by bob's device. Only the network is stood in for: each message's
// epoch key arrives when the test says, so the test picks the order in
// which the reads finish. The page "draws" on every render effect at once,
// and every message in `visible` is on screen in a focused tab: a text, once
// in the state, is seen at the first chance.
//
// tests/web/test_web_e2e.py shows the same in Chromium after a reload.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { encrypt, generateDevice, newEpochId, newEpochKey } from '../js/e2e-crypto.js';
import { E2E } from '../js/e2e.js';
import { protocolMethods } from '../js/protocol.js';
import { renderMethods } from '../js/render.js';
import * as state from '../js/state.js';

const { dmId, lastMessage, mergeConversations, mergeLatest, mergeOlder, newState, setHistory } = state;

const DM = dmId('alice', 'bob');
const T0 = 1_700_000_000_000;
const DAY = 24 * 3600 * 1000;

async function supports(name, usages) {
  try {
    await globalThis.crypto.subtle.generateKey({ name }, false, usages);
    return true;
  } catch {
    return false;
  }
}
const NEED_BOTH =
  (await supports('X25519', ['deriveBits'])) && (await supports('Ed25519', ['sign', 'verify']))
    ? {}
    : { skip: "this runtime's WebCrypto lacks X25519 or Ed25519" };

/** The preview the list draws for a message (state.js previewText; its body before there was one). */
const preview = (s, msg) => (state.previewText ? state.previewText(s, msg) : msg.body);

/** bob's device and one epoch of his, and messages sealed under it. */
async function bobsDevice() {
  const device = await generateDevice('bob', 'bob-phone-0001');
  const epoch = newEpochId();
  const key = newEpochKey();
  const seal = (body) =>
    encrypt(key, device.sign.privateKey, {
      conversation: DM,
      sender: 'bob',
      device: device.device,
      epoch,
      plaintext: { t: 'msg', body },
    });
  return { device, key, seal };
}

/** A message of bob's as the server gives it (history, the list's last message). */
const stored = (seq, e2e) => ({ id: `m${seq}`, conversation: DM, seq, from: 'bob', ts: T0 + seq * 1000, e2e });

/**
 * alice's page: the App's reading and seen methods on a state of its own,
 * with a real E2E whose epoch keys come when `release(id)` is called (one
 * gate per message). Records every state it holds (`watch`), every `seen`
 * effect and every frame it sends.
 */
function alicesPage(bob, watch) {
  const seenEffects = [];
  const frames = [];
  let current = newState('alice');
  const page = {
    me: 'alice',
    openId: null,
    visible: new Set(), // message keys on screen
    seenQueue: new Set(),
    ackIds: new Set(),
    ackReceipts: new Set(),
    ackEvents: new Set(),
    msgEls: new Map(),
    io: { unobserve() {} },
    lastSeenFlush: 0,
    conn: null, // not connected: `seen` waits in its queue
    get byId() {
      return this.state.byId;
    },
    attentive: () => true,
    scheduleRender() {
      this.reportSeen(); // drawn at once; what is on screen is seen at once
    },
    flushSoon() {},
    refreshConversationsSoon() {},
    loadPresence() {},
  };
  Object.defineProperty(page, 'state', {
    get: () => current,
    set: (s) => {
      current = s;
      watch(s);
    },
  });
  Object.assign(page, protocolMethods, { reportSeen: renderMethods.reportSeen });
  const run = page.run;
  page.run = function (fx) {
    for (const e of fx) if (e.type === 'seen') seenEffects.push(e.id);
    return run.call(this, fx);
  };
  page.connect = () => {
    page.conn = { ready: true, send: (f) => frames.push(f) > 0 };
  };

  const gates = new Map();
  const gate = (id) => {
    if (!gates.has(id)) {
      let open;
      const promise = new Promise((resolve) => {
        open = resolve;
      });
      gates.set(id, { promise, open });
    }
    return gates.get(id);
  };
  const e2e = new E2E({
    getToken: () => 'token',
    onChange: (ev) => ev.type === 'replayed' && page.replayFound(ev.id, ev.verdict),
  });
  Object.assign(e2e, {
    user: 'alice',
    loading: Promise.resolve(true),
    device: { device: 'alice-web-0001', created: T0 - DAY },
    registered: true,
    sigKeyOf: async (user, device) => (user === 'bob' && device === bob.device.device ? bob.device.sig_key : null),
    epochKeyOf: (m) => gate(m.id).promise.then(() => bob.key),
  });
  page.e2e = e2e;

  /** Message `id`'s read may finish now; resolves once the page has its result. */
  page.release = async (id) => {
    gate(id).open();
    const done = () => [...e2e.settled.keys()].some((k) => k.startsWith(`${id} `));
    for (let i = 0; i < 400 && !done(); i++) await new Promise((r) => setTimeout(r, 5));
    assert.ok(done(), `${id} was read`);
    await new Promise((r) => setTimeout(r, 0)); // the page's own `then`
  };
  return { page, seenEffects, frames };
}

/** The reload: the list's last message (the replay), then the chat opens and asks for its history. */
function reload(page, list) {
  page.update(mergeConversations, list, T0);
  page.openId = DM; // the chat in the address opens ...
  page.update(setHistory, DM, { loading: true }); // ... and asks for its history
  page.visible.add('m:m5'); // the one message it holds is on screen
  page.reportSeen();
}

/** The history page arrives, and all of it is on screen. */
function historyArrives(page, messages) {
  page.update(mergeLatest, DM, messages, { asOf: T0, pageSize: 50 });
  page.update(setHistory, DM, { loading: false });
  for (const m of messages) page.visible.add(`m:${m.id}`);
  page.reportSeen();
}

const ORDERS = {
  'the replay read first, its history here': ['page', 'm5', 'm4', 'm3'],
  'the replay read before its history arrives': ['m5', 'page', 'm4', 'm3'],
  'the replay read between the two genuine ones': ['page', 'm4', 'm5', 'm3'],
  'the original read first (the control)': ['page', 'm3', 'm4', 'm5'],
};

for (const [name, order] of Object.entries(ORDERS)) {
  test(`a replay is never shown as text nor seen: ${name}`, NEED_BOTH, async () => {
    const bob = await bobsDevice();
    const first = await bob.seal('the real thing');
    const second = await bob.seal('and one more');
    const history = [stored(3, first), stored(4, second), stored(5, first)]; // m5 replays m3
    const shown = new Set(); // where m5's text was drawn, in any state the page held: the chat, the list's preview
    const watch = (s) => {
      const replay = s.byId.get('m5');
      if (replay && replay.body != null) shown.add('chat');
      const last = lastMessage(s, DM);
      if (last && last.id === 'm5' && preview(s, last) != null) shown.add('the list');
    };
    const { page, seenEffects, frames } = alicesPage(bob, watch);
    const list = [{ id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 5, unread: 3, e2e: true, last_message: history[2] }];

    reload(page, list);
    for (const step of ['reload', ...order]) {
      if (step === 'page') historyArrives(page, history);
      else if (step !== 'reload') await page.release(step);
      assert.ok(!seenEffects.includes('m5'), `a \`seen\` of the replay was reported (after: ${step})`);
      assert.deepEqual([...shown], [], `the replay's text was drawn (after: ${step})`);
    }
    page.connect();
    page.flush();

    assert.ok(!frames.some((f) => f.type === 'seen' && f.ids.includes('m5')), 'a `seen` of the replay was sent');
    const replay = page.state.byId.get('m5');
    assert.deepEqual(
      [replay.body, replay.e2eState, replay.e2eError, replay.e2eReason],
      [null, 'failed', "couldn't decrypt: replayed", 'replayed'],
    );
    // The genuine ones are shown and seen (the control).
    assert.equal(page.state.byId.get('m3').body, 'the real thing');
    assert.equal(page.state.byId.get('m4').body, 'and one more');
    assert.deepEqual(frames.filter((f) => f.type === 'seen').flatMap((f) => f.ids).sort(), ['m3', 'm4']);
    assert.equal(preview(page.state, lastMessage(page.state, DM)), null);
  });
}

test('a replay found out only when an older page loads: its `seen`, still queued, does not go', NEED_BOTH, async () => {
  const bob = await bobsDevice();
  const first = await bob.seal('the real thing');
  const later = await bob.seal('later on');
  const { page, frames } = alicesPage(bob, () => {});
  const list = [{ id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 6, unread: 4, e2e: true, last_message: stored(6, later) }];
  page.update(mergeConversations, list, T0);
  page.openId = DM;
  // The newest page holds the replay (m5) but not its original (m3): nobody
  // here can tell, so it is shown, and seen.
  page.update(mergeLatest, DM, [stored(5, first), stored(6, later)], { asOf: T0, pageSize: 2 });
  page.visible = new Set(['m:m5', 'm:m6']);
  await page.release('m5');
  await page.release('m6');
  assert.equal(page.state.byId.get('m5').body, 'the real thing');
  assert.deepEqual([...page.seenQueue].sort(), ['m5', 'm6']);
  // Scrolling up brings the original before the `seen` went out.
  page.update(mergeOlder, DM, [stored(3, first), stored(4, await bob.seal('between'))], { asOf: T0, pageSize: 2 });
  await page.release('m3');
  await page.release('m4');
  assert.equal(page.state.byId.get('m5').e2eError, "couldn't decrypt: replayed");
  assert.deepEqual([...page.seenQueue], ['m6']);
  page.connect();
  page.flush();
  assert.deepEqual(frames, [{ type: 'seen', ids: ['m6'] }]);
});
