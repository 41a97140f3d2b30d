// The state layer is pure (web/js/state.js, web/js/frames.js): every update
// takes a deep-frozen state (a change to it, or to anything in it, throws)
// and returns the new state it should; what it did not change is shared,
// not copied. Every export of the two modules is an update tested here, a
// step of one (on a Draft), or a read that changes nothing either.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as frames from '../js/frames.js';
import * as state from '../js/state.js';
import { deepFreeze, follow } from './support.mjs';

const {
  applyEvent,
  applyMembersEvent,
  expireTyping,
  firstTime,
  leaveConv,
  receiveEvent,
  receiveMessage,
  receivePresence,
  receiveReceipt,
  receiveSent,
  receiveTyping,
  setPresence,
} = frames;
const {
  RENDER,
  REFRESH,
  addGroup,
  convMsgs,
  discardMessage,
  dmId,
  histState,
  knownConv,
  localMessage,
  markE2E,
  markFailed,
  markSealed,
  markSeen,
  mergeConversations,
  mergeLatest,
  mergeOlder,
  newState,
  provisionalDm,
  readingSealed,
  retryMessage,
  sealedOpened,
  setHistory,
} = state;

const DM = dmId('alice', 'bob');
const GROUP = 'g:1';
const T0 = 1_700_000_000_000;
const types = (fx) => fx.map((e) => e.type);

/**
 * alice's state, deep-frozen: a DM with bob (his m1 and m2, unread, her
 * pending c1 and failed c2, bob typing, bob online), a group with bob and
 * carol (bob's g2 and g3, not all of its history, a line about a change),
 * one event applied (e0).
 */
function rich() {
  const s = newState('alice');
  s.convs.set(DM, { id: DM, kind: 'dm', title: null, members: ['alice', 'bob'], last_seq: 2, last_ts: 0, unread: 2 });
  s.convs.set(GROUP, {
    id: GROUP,
    kind: 'group',
    title: 'G',
    members: ['alice', 'bob', 'carol'],
    admins: ['alice'],
    last_seq: 0,
    last_ts: 0,
    unread: 0,
  });
  const t = follow(s);
  const msg = (id, seq, conversation = DM) => ({ id, conversation, seq, from: 'bob', body: `${id}!`, ts: T0 + seq });
  t.do(mergeLatest, DM, [msg('m1', 1), msg('m2', 2)], { asOf: T0, pageSize: 50 });
  t.do(mergeLatest, GROUP, [msg('g2', 2, GROUP), msg('g3', 3, GROUP)], { asOf: T0, pageSize: 2 });
  t.do(localMessage, { cid: 'c1', conversation: DM, body: 'pending', ts: T0 + 10, afterSeq: 2, replyTo: null });
  t.do(localMessage, { cid: 'c2', conversation: DM, body: 'failed', ts: T0 + 11, afterSeq: 2, replyTo: 'm1' });
  t.do(markFailed, 'c2', 'internal', 'oops');
  t.do(receiveTyping, { conversation: DM, from: 'bob' }, T0);
  t.do(receivePresence, { user: 'bob', online: true, last_seen: T0 });
  t.do(firstTime, 'e0');
  t.do(applyMembersEvent, { type: 'members', conversation: GROUP, by: 'alice', action: 'rename', users: [],
    members: ['alice', 'bob', 'carol'], admins: ['alice'], title: 'G', eseq: 1, ts: T0 + 5 }, T0 + 5);
  return deepFreeze(t.s);
}

/** The maps of the state an update left as they were (the same objects). */
function shared(before, after) {
  return Object.keys(before).filter((k) => typeof before[k] === 'object' && before[k] === after[k]);
}

/**
 * Each update: `run` it on the frozen state `s`; `check` what it answered
 * (`r`) against `s`; `untouched`: the maps it must share with `s`.
 */
const UPDATES = {
  knownConv: {
    run: (s) => knownConv(s, 'g:new'),
    check(r) {
      assert.equal(r.conv.id, 'g:new');
      assert.equal(r.state.convs.get('g:new'), r.conv);
      assert.deepEqual(r.fx, [REFRESH]);
    },
    untouched: ['msgs', 'byId', 'hist', 'typing'],
  },
  provisionalDm: {
    run: (s) => provisionalDm(s, 'dave', T0),
    check(r) {
      assert.equal(r.id, dmId('alice', 'dave'));
      assert.equal(r.state.convs.get(r.id).provisional, true);
    },
    untouched: ['msgs', 'byId', 'byCid', 'hist'],
  },
  addGroup: {
    run: (s) => addGroup(s, { id: 'g:2', members: ['alice', 'dave'], title: 'New', e2e: true }, T0),
    check(r) {
      assert.deepEqual(r.state.convs.get('g:2').admins, ['alice']);
      assert.equal(r.state.convs.get('g:2').e2e, true);
      assert.deepEqual([histState(r.state, 'g:2').loaded, histState(r.state, 'g:2').complete], [true, true]);
    },
    untouched: ['msgs', 'byId'],
  },
  setHistory: {
    run: (s) => setHistory(s, DM, { loading: true }),
    check(r, s) {
      assert.deepEqual(histState(r.state, DM), { ...histState(s, DM), loading: true });
      assert.equal(histState(s, DM).loading, false);
    },
    untouched: ['convs', 'msgs', 'byId'],
  },
  mergeConversations: {
    run: (s) =>
      mergeConversations(
        s,
        [
          { id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 3, unread: 1, e2e: true,
            last_message: { id: 'm3', seq: 3, from: 'bob', body: 'm3!', ts: T0 + 3 } },
          { id: dmId('alice', 'erin'), kind: 'dm', members: ['alice', 'erin'], last_seq: 0, unread: 0 },
        ],
        T0,
      ),
    check(r) {
      const conv = r.state.convs.get(DM);
      assert.deepEqual([conv.last_seq, conv.unread, conv.e2e], [3, 1, true]);
      assert.equal(r.state.byId.get('m3').body, 'm3!');
      assert.deepEqual(r.fx, [{ type: 'loadPresence', user: 'erin' }]); // bob's presence is known
    },
    untouched: ['presence', 'typing', 'hist'],
  },
  localMessage: {
    run: (s) => localMessage(s, { cid: 'c3', conversation: DM, body: 'new', ts: T0 + 20, afterSeq: 2 }),
    check(r, s) {
      assert.equal(r.state.byCid.get('c3'), r.msg);
      assert.equal(convMsgs(r.state, DM).get('c:c3'), r.msg);
      assert.deepEqual([r.msg.state, r.msg.order], ['pending', s.order + 1]);
      assert.equal(convMsgs(s, DM).has('c:c3'), false);
    },
    untouched: ['convs', 'byId', 'hist'],
  },
  mergeLatest: {
    run: (s) =>
      mergeLatest(s, DM, [{ id: 'm2', seq: 2, from: 'bob', body: 'm2 edited', edited_ts: T0 + 9, ts: T0 + 2 },
        { id: 'm3', seq: 3, from: 'bob', body: 'm3!', ts: T0 + 3, seen_by: ['alice'] }],
      { refresh: true, asOf: T0 + 10, pageSize: 50 }),
    check(r, s) {
      assert.equal(r.state.byId.get('m2').body, 'm2 edited');
      assert.equal(s.byId.get('m2').body, 'm2!');
      assert.ok(r.state.byId.get('m3').seenBy.has('alice'));
      assert.equal(r.state.byId.get('m1'), s.byId.get('m1')); // unchanged: the same message
    },
    untouched: ['presence', 'typing', 'eids'],
  },
  'mergeLatest (a hole)': {
    run: (s) => mergeLatest(s, DM, [{ id: 'm9', seq: 9, from: 'bob', body: 'm9!', ts: T0 + 9 }],
      { refresh: true, asOf: T0, pageSize: 1 }),
    check(r, s) {
      assert.equal(r.state.byId.has('m1'), false);
      assert.ok(s.byId.has('m1'));
      assert.equal(histState(r.state, DM).oldest, 9);
    },
    untouched: ['convs', 'typing'],
  },
  mergeOlder: {
    run: (s) =>
      mergeOlder(s, GROUP, [{ id: 'g1', seq: 1, from: 'carol', body: 'g1!', ts: T0 + 1 }], { asOf: T0, pageSize: 2 }),
    check(r, s) {
      assert.equal(r.state.byId.get('g1').body, 'g1!');
      assert.deepEqual([histState(r.state, GROUP).oldest, histState(r.state, GROUP).complete], [1, true]);
      assert.equal(histState(s, GROUP).complete, false);
      assert.equal(r.state.msgs.get(DM), s.msgs.get(DM));
    },
    untouched: ['convs', 'typing', 'byCid'],
  },
  markSeen: {
    run: (s) => markSeen(s, s.byId.get('m1')),
    check(r, s) {
      assert.deepEqual(r.fx, [{ type: 'seen', id: 'm1' }, RENDER]);
      assert.ok(r.state.byId.get('m1').seenBy.has('alice'));
      assert.equal(s.byId.get('m1').seenBy.has('alice'), false);
      assert.equal(r.state.convs.get(DM).unread, s.convs.get(DM).unread - 1);
    },
    untouched: ['byCid', 'hist', 'typing'],
  },
  markFailed: {
    run: (s) => markFailed(s, 'c1', 'rate_limited', 'slow down'),
    check(r, s) {
      assert.equal(r.state.byCid.get('c1').state, 'failed');
      assert.equal(s.byCid.get('c1').state, 'pending');
    },
    untouched: ['convs', 'byId', 'hist'],
  },
  retryMessage: {
    run: (s) => retryMessage(s, s.byCid.get('c2'), true),
    check(r, s) {
      assert.deepEqual([r.msg.state, r.msg.sealed, r.msg.error], ['pending', true, null]);
      assert.equal(r.state.byCid.get('c2'), r.msg);
      assert.equal(s.byCid.get('c2').state, 'failed');
    },
    untouched: ['convs', 'byId'],
  },
  discardMessage: {
    run: (s) => discardMessage(s, s.byCid.get('c2')),
    check(r, s) {
      assert.equal(r.state.byCid.has('c2'), false);
      assert.equal(convMsgs(r.state, DM).has('c:c2'), false);
      assert.ok(convMsgs(s, DM).has('c:c2'));
    },
    untouched: ['convs', 'byId'],
  },
  markE2E: {
    run: (s) => markE2E(s, DM),
    check(r, s) {
      assert.equal(r.state.convs.get(DM).e2e, true);
      assert.equal(s.convs.get(DM).e2e, undefined);
    },
    untouched: ['msgs', 'byId'],
  },
  markSealed: {
    run: (s) => markSealed(s, 'c1'),
    check(r) {
      assert.deepEqual([r.state.byCid.get('c1').sealed, r.state.byCid.get('c1').e2eState], [true, 'ok']);
    },
    untouched: ['convs', 'byId'],
  },
  readingSealed: {
    run: (s) => readingSealed(s, 'm1', { id: 'm1', v: 1 }),
    check(r) {
      assert.deepEqual(r.state.byId.get('m1').e2eInput, { id: 'm1', v: 1 });
      assert.equal(r.state.byId.get('m1').sealed, true);
    },
    untouched: ['convs', 'byCid'],
  },
  sealedOpened: {
    run: (s) => sealedOpened(s, 'm1', { body: null, e2eState: 'failed', e2eError: 'no key', e2eReason: 'key' }),
    check(r, s) {
      assert.equal(r.state.byId.get('m1').body, null);
      assert.equal(convMsgs(r.state, DM).get('m:m1'), r.state.byId.get('m1'));
      assert.equal(s.byId.get('m1').body, 'm1!');
    },
    untouched: ['convs', 'byCid'],
  },
  receiveSent: {
    run: (s) => receiveSent(s, { type: 'sent', cid: 'c1', id: 'm4', conversation: DM, seq: 4, ts: T0 + 30 }),
    check(r, s) {
      const msg = r.state.byId.get('m4');
      assert.deepEqual([msg.key, msg.state, msg.seq], ['c:c1', 'stored', 4]);
      assert.equal(r.state.byCid.get('c1'), msg);
      assert.equal(r.state.convs.get(DM).last_seq, 4);
      assert.equal(s.byCid.get('c1').state, 'pending');
    },
    untouched: ['hist', 'typing'],
  },
  receiveMessage: {
    run: (s) => receiveMessage(s, { id: 'm3', conversation: DM, seq: 3, from: 'bob', body: 'm3!', ts: T0 + 3 }, T0),
    check(r, s) {
      assert.equal(r.state.byId.get('m3').body, 'm3!');
      assert.equal(r.state.convs.get(DM).unread, s.convs.get(DM).unread + 1);
      assert.equal(r.state.typing.get(DM).has('bob'), false); // his message ends his typing
      assert.ok(s.typing.get(DM).has('bob'));
      assert.equal(r.state.msgs.get(GROUP), s.msgs.get(GROUP)); // the other chat's messages: not copied
    },
    untouched: ['byCid', 'hist', 'presence', 'eids'],
  },
  receiveReceipt: {
    run: (s) => receiveReceipt(s, { rid: 'r1', id: 'm1', by: 'carol', status: 'seen' }),
    check(r, s) {
      assert.ok(r.state.byId.get('m1').seenBy.has('carol'));
      assert.equal(s.byId.get('m1').seenBy.has('carol'), false);
    },
    untouched: ['convs', 'byCid', 'hist'],
  },
  receiveTyping: {
    run: (s) => receiveTyping(s, { conversation: GROUP, from: 'carol' }, T0),
    check(r, s) {
      assert.ok(r.state.typing.get(GROUP).has('carol'));
      assert.equal(s.typing.has(GROUP), false);
      assert.equal(r.state.typing.get(DM), s.typing.get(DM));
    },
    untouched: ['convs', 'msgs', 'byId'],
  },
  expireTyping: {
    run: (s) => expireTyping(s, T0 + 60_000),
    check(r, s) {
      assert.equal(r.state.typing.get(DM).size, 0);
      assert.equal(s.typing.get(DM).size, 1);
      assert.deepEqual(r.fx, [RENDER]);
    },
    untouched: ['convs', 'msgs'],
  },
  receivePresence: {
    run: (s) => receivePresence(s, { user: 'bob', online: false, last_seen: T0 + 1 }),
    check(r, s) {
      assert.deepEqual(r.state.presence.get('bob'), { online: false, last_seen: T0 + 1 });
      assert.equal(r.state.typing.get(DM).has('bob'), false); // offline: no longer typing
      assert.equal(s.presence.get('bob').online, true);
    },
    untouched: ['convs', 'msgs'],
  },
  setPresence: {
    run: (s) => setPresence(s, 'carol', { online: true, last_seen: null }),
    check(r) {
      assert.equal(r.state.presence.get('carol').online, true);
    },
    untouched: ['convs', 'msgs', 'typing'],
  },
  firstTime: {
    run: (s) => firstTime(s, 'e1'),
    check(r, s) {
      assert.equal(r.first, true);
      assert.ok(r.state.eids.has('e1'));
      assert.equal(s.eids.has('e1'), false);
    },
    untouched: ['convs', 'msgs'],
  },
  receiveEvent: {
    run: (s) => receiveEvent(s, { type: 'reaction', eid: 'e1', id: 'm1', by: 'bob', emoji: '👍', on: true }, T0),
    check(r, s) {
      assert.equal(r.state.byId.get('m1').reactions.get('👍').count, 1);
      assert.equal(s.byId.get('m1').reactions.size, 0);
      assert.ok(r.state.eids.has('e1'));
      assert.deepEqual(types(r.fx), ['ack', 'render']);
    },
    untouched: ['convs', 'hist'],
  },
  applyEvent: {
    run: (s) => applyEvent(s, 'deleted', { id: 'm1', by: 'bob' }, T0),
    check(r, s) {
      assert.equal(r.state.byId.get('m1').deleted, true);
      assert.equal(s.byId.get('m1').deleted, false);
      assert.equal(r.fx[0].msg, r.state.byId.get('m1'));
    },
    untouched: ['convs', 'eids'],
  },
  applyMembersEvent: {
    run: (s) => {
      const removed = { type: 'members', eid: 'e1', conversation: GROUP, by: 'bob', action: 'remove' };
      const group = { members: ['bob', 'carol'], admins: ['bob'], title: 'G', eseq: 2 };
      return applyMembersEvent(s, { ...removed, users: ['alice'], ...group, ts: T0 + 6 }, T0 + 6);
    },
    check(r, s) {
      const conv = r.state.convs.get(GROUP);
      assert.deepEqual([conv.left, conv.members], [true, ['bob', 'carol']]);
      assert.deepEqual(s.convs.get(GROUP).members, ['alice', 'bob', 'carol']);
      const lines = r.state.notes.get(GROUP).slice(s.notes.get(GROUP).length).map((n) => n.text);
      assert.deepEqual(lines, ['bob removed you', 'bob is now an admin']);
      assert.ok(types(r.fx).includes('left'));
    },
    untouched: ['msgs', 'byId'],
  },
  leaveConv: {
    run: (s) => leaveConv(s, DM, 'gone'),
    check(r, s) {
      assert.deepEqual([r.state.convs.get(DM).left, r.state.convs.get(DM).leftNote], [true, 'gone']);
      assert.equal(r.state.typing.has(DM), false);
      assert.equal(s.convs.get(DM).left, undefined);
    },
    untouched: ['msgs', 'byId'],
  },
};

for (const [name, { run, check, untouched }] of Object.entries(UPDATES)) {
  test(`${name}: a frozen state in, the new state out; what it did not change is shared`, () => {
    const s = rich();
    const r = run(s);
    assert.notEqual(r.state, s);
    assert.ok(Array.isArray(r.fx));
    check(r, s);
    for (const key of untouched) assert.ok(shared(s, r.state).includes(key), `${key} was copied`);
  });
}

test('an update that changes nothing answers the very same state', () => {
  const s = rich();
  for (const r of [
    knownConv(s, DM),
    receiveReceipt(s, { rid: 'r1', id: 'nope', by: 'bob', status: 'seen' }),
    receiveMessage(s, { id: 'm1', conversation: DM, seq: 1, from: 'bob', body: 'm1!', ts: T0 + 1 }, T0),
    receiveTyping(s, { conversation: DM, from: 'alice' }, T0),
    expireTyping(s, T0),
    firstTime(s, 'e0'),
    receiveEvent(s, { type: 'edited', eid: 'e0', id: 'm1', body: 'again', ts: T0 }, T0),
    applyEvent(s, 'edited', { id: 'nope', body: 'x', ts: T0 }, T0),
    markSeen(s, s.byCid.get('c1')),
    markFailed(s, 'nope', 'internal', null),
    retryMessage(s, s.byCid.get('c1'), false),
    discardMessage(s, s.byCid.get('c1')),
    markE2E(s, 'nope'),
  ]) {
    assert.equal(r.state, s);
  }
});

/** The exports that are no update: reads (pure, they change nothing), steps (on a Draft), constants. */
const READS = [
  'TICK_LABELS', 'RENDER', 'REFRESH', 'TYPING_SHOW_MS', 'isDm', 'dmId', 'dmPeer', 'bySeq', 'withItem',
  'newState', 'convMsgs', 'histState', 'title', 'others', 'dmPeerOf', 'sortedConvs', 'activity',
  'unreadTotal', 'shadowed', 'sortedMessages', 'lastMessage', 'maxSeq', 'firstUnread', 'timeline',
  'recipients', 'status', 'statusDetail', 'actionsFor', 'typingNames', 'previewText',
];
const STEPS = ['Draft', 'ensureConv', 'ingest', 'settle', 'releaseSealed'];

test('every export of state.js and frames.js is an update tested here, a step or a read', () => {
  const tested = new Set(Object.keys(UPDATES).map((name) => name.split(' ')[0]));
  const unknown = [...Object.keys(state), ...Object.keys(frames)].filter(
    (name) => !tested.has(name) && !READS.includes(name) && !STEPS.includes(name),
  );
  assert.deepEqual(unknown, []);
});

test('reads change nothing, not even for a conversation not held (a frozen state)', () => {
  const s = rich();
  for (const id of [DM, GROUP, 'g:unknown']) {
    state.sortedMessages(s, id);
    state.lastMessage(s, id);
    state.maxSeq(s, id);
    state.shadowed(s, id);
    state.previewText(s, state.lastMessage(s, id));
    state.timeline(s, id, state.sortedMessages(s, id));
    assert.equal(state.convMsgs(s, id).size, id === 'g:unknown' ? 0 : convMsgs(s, id).size);
    assert.equal(state.histState(s, id).loaded, id !== 'g:unknown');
    frames.typingNames(s, id, T0);
  }
  state.sortedConvs(s);
  state.unreadTotal(s);
  for (const msg of s.byId.values()) {
    state.status(s, msg);
    state.statusDetail(s, msg);
    state.actionsFor(s, msg, s.convs.get(msg.conversation), T0);
  }
  assert.equal(s.msgs.has('g:unknown'), false);
  assert.equal(s.hist.has('g:unknown'), false);
});
