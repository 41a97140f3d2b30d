// Unit tests of the client's state layer (web/js/state.js, web/js/frames.js)
// under Node, no browser: `node --test web/test/`. The browser tests in
// tests/web/ cover what needs the page.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  applyEvent,
  expireTyping,
  firstTime,
  receiveEvent,
  receiveMessage,
  receivePresence,
  receiveReceipt,
  receiveSent,
  receiveTyping,
  typingNames,
} from '../js/frames.js';
import {
  actionsFor,
  convMsgs,
  dmId,
  firstUnread,
  histState,
  lastMessage,
  localMessage,
  markFailed,
  markSeen,
  maxSeq,
  mergeConversations,
  mergeLatest,
  mergeOlder,
  newState,
  provisionalDm,
  sortedMessages,
  status,
  statusDetail,
  timeline,
  unreadTotal,
} from '../js/state.js';

const DM = dmId('alice', 'bob');
const GROUP = 'g:1';
const T0 = 1_700_000_000_000;

/** alice's state with a DM with bob and a group with bob and carol. */
function alice() {
  const s = newState('alice');
  s.convs.set(DM, { id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 0, last_ts: 0, unread: 0 });
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
  return s;
}

const frame = (seq, over = {}) => ({
  type: 'message',
  id: `m${seq}`,
  conversation: DM,
  seq,
  from: 'bob',
  body: `hello ${seq}`,
  ts: T0 + seq * 1000,
  ...over,
});

const types = (fx) => fx.map((e) => e.type);
const ids = (s, conv = DM) => sortedMessages(s, conv).map((m) => m.id);

/** A message alice typed in `conv`: pending, with cid `cid`. */
function typed(s, cid, body = 'hi', conv = DM) {
  return localMessage(s, { cid, conversation: conv, body, ts: T0, afterSeq: maxSeq(s, conv), replyTo: null });
}

// --- arrival, order, duplicates ---------------------------------------------------

test('a message from someone else is stored, acked, counted unread and drawn', () => {
  const s = alice();
  const fx = receiveMessage(s, frame(1), T0);
  assert.deepEqual(fx.find((e) => e.type === 'ack'), { type: 'ack', queue: 'ids', id: 'm1' });
  assert.ok(types(fx).includes('render'));
  assert.deepEqual(ids(s), ['m1']);
  const conv = s.convs.get(DM);
  assert.equal(conv.unread, 1);
  assert.equal(conv.last_seq, 1);
  assert.equal(conv.last_ts, T0 + 1000);
  assert.equal(s.byId.get('m1').state, 'stored');
});

test('messages are shown in seq order whatever order they arrive in', () => {
  const s = alice();
  for (const seq of [3, 1, 4, 2]) receiveMessage(s, frame(seq), T0);
  assert.deepEqual(ids(s), ['m1', 'm2', 'm3', 'm4']);
  assert.equal(lastMessage(s, DM).id, 'm4');
});

test('a message that comes twice (same id) is kept once and counted once', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  const again = receiveMessage(s, frame(1), T0);
  assert.deepEqual(types(again), ['ack']); // acked again (the server resends until acked), nothing else
  assert.equal(convMsgs(s, DM).size, 1);
  assert.equal(s.convs.get(DM).unread, 1);
  // History bringing it once more changes nothing either.
  mergeLatest(s, DM, [frame(1)], { asOf: T0, pageSize: 50 });
  assert.equal(convMsgs(s, DM).size, 1);
  assert.equal(s.convs.get(DM).unread, 1);
});

test('our unsent messages come after the stored ones, in the order typed', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  typed(s, 'c1', 'first');
  typed(s, 'c2', 'second');
  receiveMessage(s, frame(2), T0);
  const shown = sortedMessages(s, DM).map((m) => m.id || m.cid);
  assert.deepEqual(shown, ['m1', 'm2', 'c1', 'c2']);
});

test('our own message from another device is shown, not acked, not unread', () => {
  const s = alice();
  const fx = receiveMessage(s, frame(1, { from: 'alice' }), T0);
  assert.ok(!types(fx).includes('ack'));
  assert.ok(fx.some((e) => e.type === 'scrollBottom' && e.conversation === DM));
  assert.equal(s.convs.get(DM).unread, 0);
  assert.equal(status(s, s.byId.get('m1')), 'sent');
});

test('a message of an unknown conversation makes it and asks for the list', () => {
  const s = alice();
  const fx = receiveMessage(s, frame(1, { conversation: 'g:new' }), T0);
  assert.ok(types(fx).includes('refreshConversations'));
  assert.equal(s.convs.get('g:new').kind, 'group');
  assert.equal(s.convs.get('g:new').unread, 1);
});

// --- ticks ---------------------------------------------------------------------------

test('ticks go pending → sent → delivered → seen, and never back', () => {
  const s = alice();
  const msg = typed(s, 'c1');
  assert.equal(status(s, msg), 'pending');
  const fx = receiveSent(s, { type: 'sent', cid: 'c1', id: 'm7', conversation: DM, seq: 7, ts: T0 + 5 });
  assert.ok(fx.some((e) => e.type === 'unqueue' && e.cid === 'c1'));
  assert.equal(status(s, msg), 'sent');
  assert.equal(s.byId.get('m7'), msg);
  receiveReceipt(s, { type: 'receipt', rid: 'r1', id: 'm7', by: 'bob', status: 'delivered' });
  assert.equal(status(s, msg), 'delivered');
  receiveReceipt(s, { type: 'receipt', rid: 'r2', id: 'm7', by: 'bob', status: 'seen' });
  assert.equal(status(s, msg), 'seen');
  // Late or repeated frames do not take it back.
  receiveReceipt(s, { type: 'receipt', rid: 'r1', id: 'm7', by: 'bob', status: 'delivered' });
  receiveSent(s, { type: 'sent', cid: 'c1', id: 'm7', conversation: DM, seq: 7, ts: T0 + 5 });
  assert.equal(markFailed(s, 'c1', 'internal', 'late error'), false);
  mergeLatest(s, DM, [{ ...frame(7, { from: 'alice', cid: 'c1' }), delivered_to: [], seen_by: [] }], {
    asOf: T0,
    pageSize: 50,
  });
  assert.equal(status(s, msg), 'seen');
});

test('a receipt is acked by its rid, even for a message not held here', () => {
  const s = alice();
  const fx = receiveReceipt(s, { type: 'receipt', rid: 'r9', id: 'nope', by: 'bob', status: 'seen' });
  assert.deepEqual(fx, [{ type: 'ack', queue: 'receipts', id: 'r9' }]);
});

test('in a group: delivered once every other member has it, seen once all have seen it', () => {
  const s = alice();
  const msg = typed(s, 'c1', 'hi all', GROUP);
  receiveSent(s, { cid: 'c1', id: 'g1', conversation: GROUP, seq: 1, ts: T0 });
  receiveReceipt(s, { rid: 'a', id: 'g1', by: 'bob', status: 'seen' });
  assert.equal(status(s, msg), 'sent'); // carol has nothing yet
  receiveReceipt(s, { rid: 'b', id: 'g1', by: 'carol', status: 'delivered' });
  assert.equal(status(s, msg), 'delivered');
  assert.equal(statusDetail(s, msg), 'Delivered · seen by bob · delivered to carol');
  receiveReceipt(s, { rid: 'c', id: 'g1', by: 'carol', status: 'seen' });
  assert.equal(status(s, msg), 'seen');
});

test('a member who joined after a message is not waited for', () => {
  const s = alice();
  const msg = typed(s, 'c1', 'before dave', GROUP);
  receiveSent(s, { cid: 'c1', id: 'g1', conversation: GROUP, seq: 1, ts: T0 });
  const conv = s.convs.get(GROUP);
  conv.members.push('dave');
  conv.joined = { dave: T0 + 60_000 };
  receiveReceipt(s, { rid: 'a', id: 'g1', by: 'bob', status: 'seen' });
  receiveReceipt(s, { rid: 'b', id: 'g1', by: 'carol', status: 'seen' });
  assert.equal(status(s, msg), 'seen');
});

test('an error naming our cid fails the pending message, with the reason', () => {
  const s = alice();
  const msg = typed(s, 'c1');
  assert.equal(markFailed(s, 'c1', 'rate_limited', 'slow down'), true);
  assert.equal(status(s, msg), 'failed');
  assert.equal(msg.error.message, 'slow down.');
  assert.equal(statusDetail(s, msg), 'Not sent: slow down.');
});

// --- settling our own messages from history ------------------------------------------

test('history naming a pending message’s cid settles it: one copy, out of the outbox', () => {
  const s = alice();
  const msg = typed(s, 'c1', 'lost answer');
  const stored = frame(5, { from: 'alice', body: 'lost answer', cid: 'c1' });
  const fx = mergeLatest(s, DM, [stored], { asOf: T0, pageSize: 50 });
  assert.ok(fx.some((e) => e.type === 'unqueue' && e.cid === 'c1'));
  assert.equal(convMsgs(s, DM).size, 1);
  assert.equal(s.byId.get('m5'), msg);
  assert.equal(msg.state, 'stored');
  // Its `sent`, arriving after all, changes nothing.
  receiveSent(s, { cid: 'c1', id: 'm5', conversation: DM, seq: 5, ts: T0 });
  assert.equal(convMsgs(s, DM).size, 1);
});

test('a stored copy without cid is shown once, as the pending message, until `sent`', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  typed(s, 'c1', 'twin');
  mergeLatest(s, DM, [frame(2, { from: 'alice', body: 'twin' })], { asOf: T0, pageSize: 50 });
  assert.deepEqual(
    sortedMessages(s, DM).map((m) => m.id || m.cid),
    ['m1', 'c1'],
  );
  receiveSent(s, { cid: 'c1', id: 'm2', conversation: DM, seq: 2, ts: T0 });
  assert.deepEqual(ids(s), ['m1', 'm2']);
});

test('the first message of a new chat makes the conversation real', () => {
  const s = newState('alice');
  const id = provisionalDm(s, 'dave', T0);
  assert.equal(s.convs.get(id).provisional, true);
  typed(s, 'c1', 'hello dave', id);
  const fx = receiveSent(s, { cid: 'c1', id: 'x1', conversation: id, seq: 1, ts: T0 });
  assert.equal(s.convs.get(id).provisional, false);
  assert.ok(fx.some((e) => e.type === 'loadPresence' && e.user === 'dave'));
  assert.ok(types(fx).includes('refreshConversations'));
});

// --- unread counts -----------------------------------------------------------------

test('unread: the list’s count covers up to its last_seq; live messages after it add', () => {
  const s = alice();
  receiveMessage(s, frame(3), T0); // arrived live before the list answered
  mergeConversations(s, [{ id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 2, unread: 2 }], T0);
  assert.equal(s.convs.get(DM).unread, 3);
  // A backlog message the list already counted does not count again.
  receiveMessage(s, frame(2), T0);
  assert.equal(s.convs.get(DM).unread, 3);
  receiveMessage(s, frame(4), T0);
  assert.equal(s.convs.get(DM).unread, 4);
  assert.equal(unreadTotal(s), 4);
});

test('seeing a message counts it down once; ours and deleted ones are never "seen"', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  receiveMessage(s, frame(2), T0);
  const m1 = s.byId.get('m1');
  assert.equal(firstUnread(s, sortedMessages(s, DM)), m1);
  assert.equal(markSeen(s, m1), true);
  assert.equal(markSeen(s, m1), false);
  assert.equal(s.convs.get(DM).unread, 1);
  assert.equal(firstUnread(s, sortedMessages(s, DM)).id, 'm2');
  receiveMessage(s, frame(3, { from: 'alice' }), T0);
  assert.equal(markSeen(s, s.byId.get('m3')), false);
  s.convs.get(DM).unread = 0;
  assert.equal(markSeen(s, s.byId.get('m2')), true);
  assert.equal(s.convs.get(DM).unread, 0); // never below zero
});

test('an end-to-end message is seen only once its text was shown', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  const msg = s.byId.get('m1');
  Object.assign(msg, { sealed: true, e2eState: 'failed' });
  assert.equal(markSeen(s, msg), false);
  msg.e2eState = 'ok';
  assert.equal(markSeen(s, msg), true);
});

// --- history ---------------------------------------------------------------------------

test('history pages: oldest and complete; older pages merge in order', () => {
  const s = alice();
  const page = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => frame(from + i));
  mergeLatest(s, DM, page(6, 7), { asOf: T0, pageSize: 2 });
  const st = histState(s, DM);
  assert.deepEqual([st.loaded, st.complete, st.oldest], [true, false, 6]);
  mergeOlder(s, DM, page(4, 5), { asOf: T0, pageSize: 2 });
  assert.deepEqual([st.complete, st.oldest], [false, 4]);
  mergeOlder(s, DM, page(1, 3).slice(2), { asOf: T0, pageSize: 2 });
  assert.equal(st.complete, true);
  assert.deepEqual(ids(s), ['m3', 'm4', 'm5', 'm6', 'm7']);
});

test('a refresh that leaves a hole drops the older part (scrolling up loads it again)', () => {
  const s = alice();
  mergeLatest(s, DM, [frame(1), frame(2)], { asOf: T0, pageSize: 2 });
  mergeLatest(s, DM, [frame(9), frame(10)], { refresh: true, asOf: T0, pageSize: 2 });
  assert.deepEqual(ids(s), ['m9', 'm10']);
  assert.equal(s.byId.has('m1'), false);
  assert.equal(histState(s, DM).oldest, 9);
  // Without a hole nothing is dropped.
  mergeLatest(s, DM, [frame(10), frame(11)], { refresh: true, asOf: T0, pageSize: 2 });
  assert.deepEqual(ids(s), ['m9', 'm10', 'm11']);
});

test('a snapshot older than an event does not undo it; a newer one wins', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  applyEvent(s, 'edited', { id: 'm1', body: 'edited live', ts: T0 + 5000 }, T0 + 10);
  mergeLatest(s, DM, [frame(1)], { asOf: T0, pageSize: 50 }); // asked for before the event
  assert.equal(s.byId.get('m1').body, 'edited live');
  mergeLatest(s, DM, [frame(1, { body: 'edited again', edited_ts: T0 + 9000 })], { asOf: T0 + 20, pageSize: 50 });
  assert.equal(s.byId.get('m1').body, 'edited again');
});

test('an end-to-end message has no body until decrypted (an effect)', () => {
  const s = alice();
  const fx = receiveMessage(s, frame(1, { body: undefined, e2e: { v: 1 } }), T0);
  assert.equal(s.byId.get('m1').body, null);
  assert.equal(s.convs.get(DM).e2e, true);
  assert.deepEqual(fx.find((e) => e.type === 'readSealed').e2e, { v: 1 });
});

// --- events ----------------------------------------------------------------------------

test('events are acked every time and applied once per eid', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  const react = { type: 'reaction', eid: 'e1', id: 'm1', by: 'bob', emoji: '👍', on: true };
  const first = receiveEvent(s, react, T0);
  const again = receiveEvent(s, react, T0);
  assert.deepEqual(first[0], { type: 'ack', queue: 'events', id: 'e1' });
  assert.deepEqual(again, [{ type: 'ack', queue: 'events', id: 'e1' }]);
  assert.equal(s.byId.get('m1').reactions.get('👍').count, 1);
  // The same reaction under another eid is a set operation: still one.
  receiveEvent(s, { ...react, eid: 'e2' }, T0);
  assert.equal(s.byId.get('m1').reactions.get('👍').count, 1);
  assert.equal(firstTime(s, 'e1'), false);
  assert.equal(firstTime(s, undefined), true);
});

test('an older edit does not replace a newer one; a deletion lets the composer go', () => {
  const s = alice();
  receiveMessage(s, frame(1), T0);
  receiveEvent(s, { type: 'edited', eid: 'e1', id: 'm1', body: 'new', ts: T0 + 2000 }, T0);
  receiveEvent(s, { type: 'edited', eid: 'e2', id: 'm1', body: 'old', ts: T0 + 1000 }, T0);
  assert.equal(s.byId.get('m1').body, 'new');
  const fx = receiveEvent(s, { type: 'deleted', eid: 'e3', id: 'm1', by: 'bob' }, T0);
  assert.ok(fx.some((e) => e.type === 'forgetDeleted' && e.msg.id === 'm1' && e.by === 'bob'));
  assert.equal(s.byId.get('m1').deleted, true);
  assert.equal(s.convs.get(DM).unread, 1); // the count is the server's business
  assert.deepEqual(actionsFor(s, s.byId.get('m1'), s.convs.get(DM), T0), []);
});

test('an end-to-end edit is decrypted as an edit of its message; an older one is not', () => {
  const s = alice();
  receiveMessage(s, frame(1, { body: undefined, e2e: { v: 1 } }), T0);
  const fx = receiveEvent(s, { type: 'edited', eid: 'e1', id: 'm1', e2e: { v: 2 }, ts: T0 + 2000 }, T0);
  const read = fx.find((e) => e.type === 'readSealed');
  assert.deepEqual([read.editOf, read.ts, read.e2e], ['m1', T0 + 2000, { v: 2 }]);
  assert.equal(s.byId.get('m1').editedTs, T0 + 2000);
  const older = receiveEvent(s, { type: 'edited', eid: 'e2', id: 'm1', e2e: { v: 3 }, ts: T0 + 1000 }, T0);
  assert.deepEqual(types(older), ['ack']);
  assert.equal(s.byId.get('m1').editedTs, T0 + 2000);
});

test('an event about a message not held here is ignored (history shows the latest state)', () => {
  const s = alice();
  const fx = receiveEvent(s, { type: 'edited', eid: 'e1', id: 'elsewhere', body: 'x', ts: T0 }, T0);
  assert.deepEqual(types(fx), ['ack']);
});

test('members events: a line in the chat, in time order; removed means read-only', () => {
  const s = alice();
  receiveMessage(s, frame(1, { conversation: GROUP, ts: T0 }), T0);
  receiveMessage(s, frame(2, { conversation: GROUP, ts: T0 + 20_000 }), T0);
  const base = { type: 'members', conversation: GROUP, by: 'bob', admins: ['alice'], title: 'G' };
  receiveEvent(s, { ...base, eid: 'e1', eseq: 1, ts: T0 + 10_000, action: 'add', users: ['dave'],
    members: ['alice', 'bob', 'carol', 'dave'] }, T0 + 10_000);
  const shown = timeline(s, GROUP, sortedMessages(s, GROUP)).map((m) => (m.note ? m.text : m.id));
  assert.deepEqual(shown, ['m1', 'bob added dave', 'm2']);
  const fx = receiveEvent(s, { ...base, eid: 'e2', eseq: 2, ts: T0 + 30_000, action: 'remove', users: ['alice'],
    members: ['bob', 'carol', 'dave'] }, T0 + 30_000);
  const conv = s.convs.get(GROUP);
  assert.equal(conv.left, true);
  assert.ok(fx.some((e) => e.type === 'left' && e.conversation === GROUP));
  assert.deepEqual(actionsFor(s, s.byId.get('m1'), conv, T0), []);
});

test('what a person may do: their own messages within the edit window, admins delete others', () => {
  const s = alice();
  receiveMessage(s, frame(1, { conversation: GROUP, ts: T0 }), T0);
  receiveMessage(s, frame(2, { conversation: GROUP, from: 'alice', ts: T0 }), T0);
  const conv = s.convs.get(GROUP);
  assert.deepEqual(actionsFor(s, s.byId.get('m2'), conv, T0 + 1000), ['reply', 'react', 'edit', 'delete']);
  assert.deepEqual(actionsFor(s, s.byId.get('m2'), conv, T0 + 49 * 3600_000), ['reply', 'react', 'delete']);
  assert.deepEqual(actionsFor(s, s.byId.get('m1'), conv, T0), ['reply', 'react', 'delete']); // alice is admin
  conv.admins = ['bob'];
  assert.deepEqual(actionsFor(s, s.byId.get('m1'), conv, T0), ['reply', 'react']);
});

// --- typing and presence -------------------------------------------------------------

test('typing shows for a while, ends with their message or going offline', () => {
  const s = alice();
  assert.deepEqual(receiveTyping(s, { conversation: DM, from: 'alice' }, T0), []); // our own: ignored
  receiveTyping(s, { conversation: DM, from: 'bob' }, T0);
  assert.deepEqual(typingNames(s, DM, T0 + 1000), ['bob']);
  assert.deepEqual(typingNames(s, DM, T0 + 7000), []);
  assert.equal(expireTyping(s, T0 + 7000), true);
  assert.equal(expireTyping(s, T0 + 7000), false);
  receiveTyping(s, { conversation: DM, from: 'bob' }, T0);
  receiveMessage(s, frame(1), T0);
  assert.deepEqual(typingNames(s, DM, T0), []);
  receiveTyping(s, { conversation: DM, from: 'bob' }, T0);
  receivePresence(s, { user: 'bob', online: false, last_seen: T0 });
  assert.deepEqual(typingNames(s, DM, T0), []);
  assert.deepEqual(s.presence.get('bob'), { online: false, last_seen: T0 });
});
