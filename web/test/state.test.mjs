// Unit tests of the client's state layer (web/js/state.js, web/js/frames.js)
// under Node, no browser: `node --test web/test/`. The browser tests in
// tests/web/ cover what needs the page. Every update here runs on a
// deep-frozen state (support.mjs `follow`): one that changed its input
// would throw.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
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
  typingNames,
} from '../js/frames.js';
import {
  RENDER,
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
  previewText,
  provisionalDm,
  readingSealed,
  sealedOpened,
  setHistory,
  sortedMessages,
  status,
  statusDetail,
  timeline,
  unreadTotal,
} from '../js/state.js';
import { follow } from './support.mjs';

const DM = dmId('alice', 'bob');
const GROUP = 'g:1';
const T0 = 1_700_000_000_000;

/** alice's state (followed) with a DM with bob and a group with bob and carol. */
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
  return follow(s);
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
function typed(t, cid, body = 'hi', conv = DM) {
  const afterSeq = maxSeq(t.s, conv);
  return t.do(localMessage, { cid, conversation: conv, body, ts: T0, afterSeq, replyTo: null }).msg;
}

// --- arrival, order, duplicates ---------------------------------------------------

test('a message from someone else is stored, acked, counted unread and drawn', () => {
  const t = alice();
  const { fx } = t.do(receiveMessage, frame(1), T0);
  assert.deepEqual(fx.find((e) => e.type === 'ack'), { type: 'ack', queue: 'ids', id: 'm1' });
  assert.ok(types(fx).includes('render'));
  assert.deepEqual(ids(t.s), ['m1']);
  const conv = t.s.convs.get(DM);
  assert.equal(conv.unread, 1);
  assert.equal(conv.last_seq, 1);
  assert.equal(conv.last_ts, T0 + 1000);
  assert.equal(t.s.byId.get('m1').state, 'stored');
});

test('messages are shown in seq order whatever order they arrive in', () => {
  const t = alice();
  for (const seq of [3, 1, 4, 2]) t.do(receiveMessage, frame(seq), T0);
  assert.deepEqual(ids(t.s), ['m1', 'm2', 'm3', 'm4']);
  assert.equal(lastMessage(t.s, DM).id, 'm4');
});

test('a message that comes twice (same id) is kept once and counted once', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  const before = t.s;
  const again = t.do(receiveMessage, frame(1), T0);
  assert.deepEqual(types(again.fx), ['ack']); // acked again (the server resends until acked), nothing else
  assert.equal(again.state, before); // and the state is the same one
  assert.equal(convMsgs(t.s, DM).size, 1);
  assert.equal(t.s.convs.get(DM).unread, 1);
  // History bringing it once more changes nothing either.
  t.do(mergeLatest, DM, [frame(1)], { asOf: T0, pageSize: 50 });
  assert.equal(convMsgs(t.s, DM).size, 1);
  assert.equal(t.s.convs.get(DM).unread, 1);
});

test('our unsent messages come after the stored ones, in the order typed', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  typed(t, 'c1', 'first');
  typed(t, 'c2', 'second');
  t.do(receiveMessage, frame(2), T0);
  const shown = sortedMessages(t.s, DM).map((m) => m.id || m.cid);
  assert.deepEqual(shown, ['m1', 'm2', 'c1', 'c2']);
});

test('our own message from another device is shown, not acked, not unread', () => {
  const t = alice();
  const { fx } = t.do(receiveMessage, frame(1, { from: 'alice' }), T0);
  assert.ok(!types(fx).includes('ack'));
  assert.ok(fx.some((e) => e.type === 'scrollBottom' && e.conversation === DM));
  assert.equal(t.s.convs.get(DM).unread, 0);
  assert.equal(status(t.s, t.s.byId.get('m1')), 'sent');
});

test('a message of an unknown conversation makes it and asks for the list', () => {
  const t = alice();
  const { fx } = t.do(receiveMessage, frame(1, { conversation: 'g:new' }), T0);
  assert.ok(types(fx).includes('refreshConversations'));
  assert.equal(t.s.convs.get('g:new').kind, 'group');
  assert.equal(t.s.convs.get('g:new').unread, 1);
});

// --- ticks ---------------------------------------------------------------------------

test('ticks go pending → sent → delivered → seen, and never back', () => {
  const t = alice();
  const mine = () => t.s.byCid.get('c1');
  assert.equal(status(t.s, typed(t, 'c1')), 'pending');
  const { fx } = t.do(receiveSent, { type: 'sent', cid: 'c1', id: 'm7', conversation: DM, seq: 7, ts: T0 + 5 });
  assert.ok(fx.some((e) => e.type === 'unqueue' && e.cid === 'c1'));
  assert.equal(status(t.s, mine()), 'sent');
  assert.equal(t.s.byId.get('m7'), mine()); // the same message, found by id now too
  assert.equal(mine().key, 'c:c1');
  t.do(receiveReceipt, { type: 'receipt', rid: 'r1', id: 'm7', by: 'bob', status: 'delivered' });
  assert.equal(status(t.s, mine()), 'delivered');
  t.do(receiveReceipt, { type: 'receipt', rid: 'r2', id: 'm7', by: 'bob', status: 'seen' });
  assert.equal(status(t.s, mine()), 'seen');
  // Late or repeated frames do not take it back.
  t.do(receiveReceipt, { type: 'receipt', rid: 'r1', id: 'm7', by: 'bob', status: 'delivered' });
  t.do(receiveSent, { type: 'sent', cid: 'c1', id: 'm7', conversation: DM, seq: 7, ts: T0 + 5 });
  const before = t.s;
  assert.deepEqual(t.do(markFailed, 'c1', 'internal', 'late error').fx, []);
  assert.equal(t.s, before);
  t.do(mergeLatest, DM, [{ ...frame(7, { from: 'alice', cid: 'c1' }), delivered_to: [], seen_by: [] }], {
    asOf: T0,
    pageSize: 50,
  });
  assert.equal(status(t.s, mine()), 'seen');
});

test('a receipt is acked by its rid, even for a message not held here', () => {
  const t = alice();
  const before = t.s;
  const { fx } = t.do(receiveReceipt, { type: 'receipt', rid: 'r9', id: 'nope', by: 'bob', status: 'seen' });
  assert.deepEqual(fx, [{ type: 'ack', queue: 'receipts', id: 'r9' }]);
  assert.equal(t.s, before);
});

test('in a group: delivered once every other member has it, seen once all have seen it', () => {
  const t = alice();
  typed(t, 'c1', 'hi all', GROUP);
  const mine = () => t.s.byId.get('g1');
  t.do(receiveSent, { cid: 'c1', id: 'g1', conversation: GROUP, seq: 1, ts: T0 });
  t.do(receiveReceipt, { rid: 'a', id: 'g1', by: 'bob', status: 'seen' });
  assert.equal(status(t.s, mine()), 'sent'); // carol has nothing yet
  t.do(receiveReceipt, { rid: 'b', id: 'g1', by: 'carol', status: 'delivered' });
  assert.equal(status(t.s, mine()), 'delivered');
  assert.equal(statusDetail(t.s, mine()), 'Delivered · seen by bob · delivered to carol');
  t.do(receiveReceipt, { rid: 'c', id: 'g1', by: 'carol', status: 'seen' });
  assert.equal(status(t.s, mine()), 'seen');
});

test('a member who joined after a message is not waited for', () => {
  const t = alice();
  typed(t, 'c1', 'before dave', GROUP);
  t.do(receiveSent, { cid: 'c1', id: 'g1', conversation: GROUP, seq: 1, ts: T0 });
  t.do(
    applyMembersEvent,
    { type: 'members', conversation: GROUP, eseq: 1, by: 'alice', action: 'add', users: ['dave'],
      members: ['alice', 'bob', 'carol', 'dave'], admins: ['alice'], title: 'G', ts: T0 + 60_000 },
    T0 + 60_000,
  );
  assert.deepEqual(t.s.convs.get(GROUP).joined, { dave: T0 + 60_000 });
  t.do(receiveReceipt, { rid: 'a', id: 'g1', by: 'bob', status: 'seen' });
  t.do(receiveReceipt, { rid: 'b', id: 'g1', by: 'carol', status: 'seen' });
  assert.equal(status(t.s, t.s.byId.get('g1')), 'seen');
});

test('an error naming our cid fails the pending message, with the reason', () => {
  const t = alice();
  typed(t, 'c1');
  assert.deepEqual(t.do(markFailed, 'c1', 'rate_limited', 'slow down').fx, [RENDER]);
  const msg = t.s.byCid.get('c1');
  assert.equal(status(t.s, msg), 'failed');
  assert.equal(msg.error.message, 'slow down.');
  assert.equal(statusDetail(t.s, msg), 'Not sent: slow down.');
});

// --- settling our own messages from history ------------------------------------------

test('history naming a pending message’s cid settles it: one copy, out of the outbox', () => {
  const t = alice();
  typed(t, 'c1', 'lost answer');
  const stored = frame(5, { from: 'alice', body: 'lost answer', cid: 'c1' });
  const { fx } = t.do(mergeLatest, DM, [stored], { asOf: T0, pageSize: 50 });
  assert.ok(fx.some((e) => e.type === 'unqueue' && e.cid === 'c1'));
  assert.equal(convMsgs(t.s, DM).size, 1);
  assert.equal(t.s.byId.get('m5').key, 'c:c1'); // the pending message, stored now
  assert.equal(t.s.byId.get('m5').state, 'stored');
  // Its `sent`, arriving after all, changes nothing.
  t.do(receiveSent, { cid: 'c1', id: 'm5', conversation: DM, seq: 5, ts: T0 });
  assert.equal(convMsgs(t.s, DM).size, 1);
});

test('a stored copy without cid is shown once, as the pending message, until `sent`', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  typed(t, 'c1', 'twin');
  t.do(mergeLatest, DM, [frame(2, { from: 'alice', body: 'twin' })], { asOf: T0, pageSize: 50 });
  assert.deepEqual(
    sortedMessages(t.s, DM).map((m) => m.id || m.cid),
    ['m1', 'c1'],
  );
  t.do(receiveSent, { cid: 'c1', id: 'm2', conversation: DM, seq: 2, ts: T0 });
  assert.deepEqual(ids(t.s), ['m1', 'm2']);
});

test('the first message of a new chat makes the conversation real', () => {
  const t = follow(newState('alice'));
  const { id } = t.do(provisionalDm, 'dave', T0);
  assert.equal(t.s.convs.get(id).provisional, true);
  typed(t, 'c1', 'hello dave', id);
  const { fx } = t.do(receiveSent, { cid: 'c1', id: 'x1', conversation: id, seq: 1, ts: T0 });
  assert.equal(t.s.convs.get(id).provisional, false);
  assert.ok(fx.some((e) => e.type === 'loadPresence' && e.user === 'dave'));
  assert.ok(types(fx).includes('refreshConversations'));
});

// --- unread counts -----------------------------------------------------------------

test('unread: the list’s count covers up to its last_seq; live messages after it add', () => {
  const t = alice();
  t.do(receiveMessage, frame(3), T0); // arrived live before the list answered
  t.do(mergeConversations, [{ id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 2, unread: 2 }], T0);
  assert.equal(t.s.convs.get(DM).unread, 3);
  // A backlog message the list already counted does not count again.
  t.do(receiveMessage, frame(2), T0);
  assert.equal(t.s.convs.get(DM).unread, 3);
  t.do(receiveMessage, frame(4), T0);
  assert.equal(t.s.convs.get(DM).unread, 4);
  assert.equal(unreadTotal(t.s), 4);
});

test('seeing a message counts it down once; ours and deleted ones are never "seen"', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  t.do(receiveMessage, frame(2), T0);
  const m1 = t.s.byId.get('m1');
  assert.equal(firstUnread(t.s, sortedMessages(t.s, DM)), m1);
  assert.deepEqual(t.do(markSeen, m1).fx, [{ type: 'seen', id: 'm1' }, RENDER]);
  assert.deepEqual(t.do(markSeen, m1).fx, []); // the old copy of m1 says nothing: the state does
  assert.equal(t.s.convs.get(DM).unread, 1);
  assert.equal(firstUnread(t.s, sortedMessages(t.s, DM)).id, 'm2');
  t.do(receiveMessage, frame(3, { from: 'alice' }), T0);
  assert.deepEqual(t.do(markSeen, t.s.byId.get('m3')).fx, []);
  t.setUp((d) => d.patchConv(DM, { unread: 0 }));
  assert.equal(t.do(markSeen, t.s.byId.get('m2')).fx.length, 2);
  assert.equal(t.s.convs.get(DM).unread, 0); // never below zero
});

test('an end-to-end message is seen only once its text was shown', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  t.do(readingSealed, 'm1', { id: 'm1' });
  t.do(sealedOpened, 'm1', { body: null, e2eState: 'failed', e2eError: 'no key', e2eReason: 'key' });
  assert.deepEqual(t.do(markSeen, t.s.byId.get('m1')).fx, []);
  t.do(sealedOpened, 'm1', { body: 'hello', e2eState: 'ok', e2eError: null, e2eReason: null });
  // Read, but its history is not here: nothing tells whether an earlier copy exists.
  assert.deepEqual(t.do(markSeen, t.s.byId.get('m1')).fx, []);
  t.do(setHistory, DM, { loaded: true, complete: true });
  assert.equal(t.s.byId.get('m1').body, 'hello');
  assert.equal(t.do(markSeen, t.s.byId.get('m1')).fx[0].type, 'seen');
});

// --- history ---------------------------------------------------------------------------

test('history pages: oldest and complete; older pages merge in order', () => {
  const t = alice();
  const page = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => frame(from + i));
  const st = () => histState(t.s, DM);
  t.do(mergeLatest, DM, page(6, 7), { asOf: T0, pageSize: 2 });
  assert.deepEqual([st().loaded, st().complete, st().oldest], [true, false, 6]);
  t.do(mergeOlder, DM, page(4, 5), { asOf: T0, pageSize: 2 });
  assert.deepEqual([st().complete, st().oldest], [false, 4]);
  t.do(mergeOlder, DM, page(1, 3).slice(2), { asOf: T0, pageSize: 2 });
  assert.equal(st().complete, true);
  assert.deepEqual(ids(t.s), ['m3', 'm4', 'm5', 'm6', 'm7']);
});

test('a refresh that leaves a hole drops the older part (scrolling up loads it again)', () => {
  const t = alice();
  t.do(mergeLatest, DM, [frame(1), frame(2)], { asOf: T0, pageSize: 2 });
  t.do(mergeLatest, DM, [frame(9), frame(10)], { refresh: true, asOf: T0, pageSize: 2 });
  assert.deepEqual(ids(t.s), ['m9', 'm10']);
  assert.equal(t.s.byId.has('m1'), false);
  assert.equal(histState(t.s, DM).oldest, 9);
  // Without a hole nothing is dropped.
  t.do(mergeLatest, DM, [frame(10), frame(11)], { refresh: true, asOf: T0, pageSize: 2 });
  assert.deepEqual(ids(t.s), ['m9', 'm10', 'm11']);
});

test('a snapshot older than an event does not undo it; a newer one wins', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  t.do(applyEvent, 'edited', { id: 'm1', body: 'edited live', ts: T0 + 5000 }, T0 + 10);
  t.do(mergeLatest, DM, [frame(1)], { asOf: T0, pageSize: 50 }); // asked for before the event
  assert.equal(t.s.byId.get('m1').body, 'edited live');
  t.do(mergeLatest, DM, [frame(1, { body: 'edited again', edited_ts: T0 + 9000 })], { asOf: T0 + 20, pageSize: 50 });
  assert.equal(t.s.byId.get('m1').body, 'edited again');
});

test('an end-to-end message has no body until decrypted (an effect)', () => {
  const t = alice();
  const { fx } = t.do(receiveMessage, frame(1, { body: undefined, e2e: { v: 1 } }), T0);
  assert.equal(t.s.byId.get('m1').body, null);
  assert.equal(t.s.convs.get(DM).e2e, true);
  const read = fx.find((e) => e.type === 'readSealed');
  assert.deepEqual([read.id, read.e2e], ['m1', { v: 1 }]);
});

// --- end-to-end: a text waits until the replay guard can judge it ------------------------

/** An `e2e` object of device `device` (its contents are e2e-read.js's to check). */
const sealed = (device, iv) => ({ v: 1, device, epoch: 'epoch-0001', iv, ct: 'ct', sig: `sig-${iv}` });
/** A message of bob's sealed by `device`, as history gives it. */
const sealedFrame = (seq, device = 'bob-phone', iv = `iv${seq}`) =>
  frame(seq, { body: undefined, e2e: sealed(device, iv) });
/** What reading it gave: its text, or why there is none. */
const text = (body) => ({ body, e2eState: 'ok', e2eError: null, e2eReason: null });
const why = (reason) => ({ body: null, e2eState: 'failed', e2eError: `couldn't decrypt: ${reason}`, e2eReason: reason });
/** The page reads message `id`, sealed by `device` (protocol.js readSealed, before it decrypts). */
const reading = (t, id, device = 'bob-phone') => {
  const m = t.s.byId.get(id);
  const e2e = sealed(device, `iv${m.seq}`);
  t.do(readingSealed, id, { id, conversation: m.conversation, from: m.from, seq: m.seq, ts: m.ts, e2e });
};

test('an end-to-end text waits for every earlier message of its device held here, then is shown and seen', () => {
  const t = alice();
  t.do(mergeLatest, DM, [sealedFrame(3), sealedFrame(4, 'bob-tablet'), sealedFrame(5)], { asOf: T0, pageSize: 50 });
  assert.deepEqual(['m3', 'm4', 'm5'].map((id) => t.s.byId.get(id).e2eRead), [null, null, null], 'all due');
  reading(t, 'm3');
  reading(t, 'm4', 'bob-tablet');
  reading(t, 'm5');
  // m5 is read first: m3, from the same device, could be its original.
  t.do(sealedOpened, 'm5', text('five'));
  assert.deepEqual([t.s.byId.get('m5').body, t.s.byId.get('m5').e2eState], [null, 'pending']);
  assert.deepEqual(t.do(markSeen, t.s.byId.get('m5')).fx, []);
  // Another device's message waits for nothing of bob-phone's.
  t.do(sealedOpened, 'm4', text('four'));
  assert.equal(t.s.byId.get('m4').body, 'four');
  // m3 is read: m5 can be judged now (had it been a replay, the guard would have said so first).
  t.do(sealedOpened, 'm3', text('three'));
  assert.deepEqual(ids(t.s).map((id) => t.s.byId.get(id).body), ['three', 'four', 'five']);
  assert.equal(t.do(markSeen, t.s.byId.get('m5')).fx[0].type, 'seen');
  // Why a message cannot be shown needs no judging: it shows at once.
  t.do(receiveMessage, { ...sealedFrame(6), type: 'message' }, T0);
  t.do(receiveMessage, { ...sealedFrame(7), type: 'message' }, T0);
  reading(t, 'm6');
  reading(t, 'm7');
  t.do(sealedOpened, 'm7', why('replayed'));
  assert.equal(t.s.byId.get('m7').e2eError, "couldn't decrypt: replayed");
  // A message deleted while it is read is waited for no longer.
  t.do(receiveMessage, { ...sealedFrame(8), type: 'message' }, T0);
  reading(t, 'm8');
  t.do(sealedOpened, 'm8', text('eight'));
  assert.equal(t.s.byId.get('m8').body, null);
  t.do(applyEvent, 'deleted', { id: 'm6', by: 'bob', ts: T0 }, T0);
  assert.equal(t.s.byId.get('m8').body, 'eight');
});

test('an end-to-end text waits for its history; the same version again is not read again', () => {
  const t = alice();
  const list = [{ id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 5, unread: 1, last_message: sealedFrame(5) }];
  t.do(mergeConversations, list, T0);
  reading(t, 'm5');
  t.do(sealedOpened, 'm5', text('five'));
  assert.equal(t.s.byId.get('m5').body, null, 'nothing tells yet whether an earlier copy exists');
  t.do(setHistory, DM, { loading: true });
  const { fx } = t.do(mergeLatest, DM, [sealedFrame(3), sealedFrame(5)], { asOf: T0, pageSize: 50 });
  assert.deepEqual(fx.map((e) => e.id), ['m3', 'm5']); // both read (m5's read answers from its cache)
  assert.equal(t.s.byId.get('m5').e2eRead.body, 'five', 'the same version keeps its result');
  assert.equal(t.s.byId.get('m5').body, null, 'm3 is due');
  reading(t, 'm3');
  t.do(sealedOpened, 'm3', text('three'));
  assert.equal(t.s.byId.get('m5').body, 'five');
  // A new version (an edit in history) is due again until read; the old text stays meanwhile.
  t.do(mergeLatest, DM, [{ ...sealedFrame(3, 'bob-phone', 'iv3-edit'), edited_ts: T0 + 9 }], {
    asOf: T0 + 10,
    pageSize: 50,
  });
  assert.deepEqual([t.s.byId.get('m3').e2eRead, t.s.byId.get('m3').body], [null, 'three']);
});

test("the list's preview: a text read but not judged, only while its chat's history is not loaded nor coming", () => {
  const t = alice();
  const list = [{ id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 5, unread: 1, last_message: sealedFrame(5) }];
  t.do(mergeConversations, list, T0);
  assert.equal(previewText(t.s, lastMessage(t.s, DM)), null, 'not read yet');
  reading(t, 'm5');
  t.do(sealedOpened, 'm5', text('five'));
  // Judged against what the page holds, which is all the list can do.
  assert.equal(previewText(t.s, lastMessage(t.s, DM)), 'five');
  t.do(setHistory, DM, { loading: true }); // the chat opens: its history is on its way
  assert.equal(previewText(t.s, lastMessage(t.s, DM)), null);
  t.do(mergeLatest, DM, [sealedFrame(3), sealedFrame(5)], { asOf: T0, pageSize: 50 });
  t.do(setHistory, DM, { loading: false });
  assert.equal(previewText(t.s, lastMessage(t.s, DM)), null, 'm3 could be its original');
  reading(t, 'm3');
  t.do(sealedOpened, 'm3', text('three'));
  assert.equal(previewText(t.s, lastMessage(t.s, DM)), 'five');
  assert.equal(previewText(t.s, t.s.byId.get('m3')), 'three');
});

test('a chat we are no longer in judges the texts it holds: no more history comes', () => {
  const t = alice();
  t.do(receiveMessage, { ...sealedFrame(5), conversation: GROUP, type: 'message' }, T0);
  reading(t, 'm5');
  t.do(sealedOpened, 'm5', text('five'));
  assert.equal(t.s.byId.get('m5').body, null);
  t.do(leaveConv, GROUP, 'You were removed');
  assert.equal(t.s.byId.get('m5').body, 'five');
});

// --- events ----------------------------------------------------------------------------

test('events are acked every time and applied once per eid', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  const react = { type: 'reaction', eid: 'e1', id: 'm1', by: 'bob', emoji: '👍', on: true };
  const first = t.do(receiveEvent, react, T0).fx;
  const again = t.do(receiveEvent, react, T0).fx;
  assert.deepEqual(first[0], { type: 'ack', queue: 'events', id: 'e1' });
  assert.deepEqual(again, [{ type: 'ack', queue: 'events', id: 'e1' }]);
  assert.equal(t.s.byId.get('m1').reactions.get('👍').count, 1);
  // The same reaction under another eid is a set operation: still one.
  t.do(receiveEvent, { ...react, eid: 'e2' }, T0);
  assert.equal(t.s.byId.get('m1').reactions.get('👍').count, 1);
  assert.equal(t.do(firstTime, 'e1').first, false);
  assert.equal(t.do(firstTime, undefined).first, true);
});

test('an older edit does not replace a newer one; a deletion lets the composer go', () => {
  const t = alice();
  t.do(receiveMessage, frame(1), T0);
  t.do(receiveEvent, { type: 'edited', eid: 'e1', id: 'm1', body: 'new', ts: T0 + 2000 }, T0);
  t.do(receiveEvent, { type: 'edited', eid: 'e2', id: 'm1', body: 'old', ts: T0 + 1000 }, T0);
  assert.equal(t.s.byId.get('m1').body, 'new');
  const { fx } = t.do(receiveEvent, { type: 'deleted', eid: 'e3', id: 'm1', by: 'bob' }, T0);
  assert.ok(fx.some((e) => e.type === 'forgetDeleted' && e.msg.id === 'm1' && e.by === 'bob'));
  assert.equal(t.s.byId.get('m1').deleted, true);
  assert.equal(t.s.convs.get(DM).unread, 1); // the count is the server's business
  assert.deepEqual(actionsFor(t.s, t.s.byId.get('m1'), t.s.convs.get(DM), T0), []);
});

test('an end-to-end edit is decrypted as an edit of its message; an older one is not', () => {
  const t = alice();
  t.do(receiveMessage, frame(1, { body: undefined, e2e: { v: 1 } }), T0);
  const { fx } = t.do(receiveEvent, { type: 'edited', eid: 'e1', id: 'm1', e2e: { v: 2 }, ts: T0 + 2000 }, T0);
  const read = fx.find((e) => e.type === 'readSealed');
  assert.deepEqual([read.id, read.editOf, read.ts, read.e2e], ['m1', 'm1', T0 + 2000, { v: 2 }]);
  assert.equal(t.s.byId.get('m1').editedTs, T0 + 2000);
  const older = t.do(receiveEvent, { type: 'edited', eid: 'e2', id: 'm1', e2e: { v: 3 }, ts: T0 + 1000 }, T0);
  assert.deepEqual(types(older.fx), ['ack']);
  assert.equal(t.s.byId.get('m1').editedTs, T0 + 2000);
});

test('an event about a message not held here is ignored (history shows the latest state)', () => {
  const t = alice();
  const { fx } = t.do(receiveEvent, { type: 'edited', eid: 'e1', id: 'elsewhere', body: 'x', ts: T0 }, T0);
  assert.deepEqual(types(fx), ['ack']);
});

test('members events: a line in the chat, in time order; removed means read-only', () => {
  const t = alice();
  t.do(receiveMessage, frame(1, { conversation: GROUP, ts: T0 }), T0);
  t.do(receiveMessage, frame(2, { conversation: GROUP, ts: T0 + 20_000 }), T0);
  const base = { type: 'members', conversation: GROUP, by: 'bob', admins: ['alice'], title: 'G' };
  t.do(receiveEvent, { ...base, eid: 'e1', eseq: 1, ts: T0 + 10_000, action: 'add', users: ['dave'],
    members: ['alice', 'bob', 'carol', 'dave'] }, T0 + 10_000);
  const shown = timeline(t.s, GROUP, sortedMessages(t.s, GROUP)).map((m) => (m.note ? m.text : m.id));
  assert.deepEqual(shown, ['m1', 'bob added dave', 'm2']);
  const { fx } = t.do(receiveEvent, { ...base, eid: 'e2', eseq: 2, ts: T0 + 30_000, action: 'remove', users: ['alice'],
    members: ['bob', 'carol', 'dave'] }, T0 + 30_000);
  const conv = t.s.convs.get(GROUP);
  assert.equal(conv.left, true);
  assert.ok(fx.some((e) => e.type === 'left' && e.conversation === GROUP));
  assert.deepEqual(actionsFor(t.s, t.s.byId.get('m1'), conv, T0), []);
});

test('what a person may do: their own messages within the edit window, admins delete others', () => {
  const t = alice();
  t.do(receiveMessage, frame(1, { conversation: GROUP, ts: T0 }), T0);
  t.do(receiveMessage, frame(2, { conversation: GROUP, from: 'alice', ts: T0 }), T0);
  const conv = () => t.s.convs.get(GROUP);
  assert.deepEqual(actionsFor(t.s, t.s.byId.get('m2'), conv(), T0 + 1000), ['reply', 'react', 'edit', 'delete']);
  assert.deepEqual(actionsFor(t.s, t.s.byId.get('m2'), conv(), T0 + 49 * 3600_000), ['reply', 'react', 'delete']);
  assert.deepEqual(actionsFor(t.s, t.s.byId.get('m1'), conv(), T0), ['reply', 'react', 'delete']); // alice is admin
  t.setUp((d) => d.patchConv(GROUP, { admins: ['bob'] }));
  assert.deepEqual(actionsFor(t.s, t.s.byId.get('m1'), conv(), T0), ['reply', 'react']);
});

// --- typing and presence -------------------------------------------------------------

test('typing shows for a while, ends with their message or going offline', () => {
  const t = alice();
  assert.deepEqual(t.do(receiveTyping, { conversation: DM, from: 'alice' }, T0).fx, []); // our own: ignored
  t.do(receiveTyping, { conversation: DM, from: 'bob' }, T0);
  assert.deepEqual(typingNames(t.s, DM, T0 + 1000), ['bob']);
  assert.deepEqual(typingNames(t.s, DM, T0 + 7000), []);
  assert.deepEqual(t.do(expireTyping, T0 + 7000).fx, [RENDER]);
  assert.deepEqual(t.do(expireTyping, T0 + 7000).fx, []);
  t.do(receiveTyping, { conversation: DM, from: 'bob' }, T0);
  t.do(receiveMessage, frame(1), T0);
  assert.deepEqual(typingNames(t.s, DM, T0), []);
  t.do(receiveTyping, { conversation: DM, from: 'bob' }, T0);
  t.do(receivePresence, { user: 'bob', online: false, last_seen: T0 });
  assert.deepEqual(typingNames(t.s, DM, T0), []);
  assert.deepEqual(t.s.presence.get('bob'), { online: false, last_seen: T0 });
});
