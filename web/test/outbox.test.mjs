// Unit tests of the outbox's items (web/js/outbox.js) and of retrying a
// failed message (web/js/state.js) under Node: `node --test web/test/`.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  SEAL_TRIES,
  outboxItem,
  resendDelays,
  restoredItems,
  restoredMessage,
  sealedFrame,
  sendFrame,
  storedItems,
  toReseal,
  unqueue,
} from '../js/outbox.js';
import { applyEvent, receiveMessage, receiveSent } from '../js/frames.js';
import {
  convMsgs,
  discardMessage,
  dmId,
  localMessage,
  markFailed,
  newState,
  provisionalDm,
  retryMessage,
  status,
} from '../js/state.js';
import { follow } from './support.mjs';

const DM = dmId('alice', 'bob');
const T0 = 1_700_000_000_000;

/** alice's state (followed, support.mjs) with a DM with bob. */
function alice() {
  const s = newState('alice');
  s.convs.set(DM, { id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 4, last_ts: 0, unread: 0 });
  return follow(s);
}

const typed = (t, cid, body = 'hi', replyTo = null) =>
  t.do(localMessage, { cid, conversation: DM, body, ts: T0, afterSeq: 4, replyTo }).msg;

test('a message goes out as `send` with its cid, the conversation and what it answers', () => {
  const t = alice();
  const msg = typed(t, 'w1', 'hello', 'm3');
  const item = outboxItem(t.s.convs.get(DM), msg, 'alice');
  assert.deepEqual(item.frame, { type: 'send', cid: 'w1', body: 'hello', conversation: DM, reply_to: 'm3' });
  assert.deepEqual([item.cid, item.conversation, item.ts, item.afterSeq], ['w1', DM, T0, 4]);
});

test('the first message of a chat the server does not have yet goes `to` the peer', () => {
  const t = follow(newState('alice'));
  const { id } = t.do(provisionalDm, 'dave', T0);
  assert.deepEqual(sendFrame(t.s.convs.get(id), 'w1', 'hi dave', null, 'alice'), {
    type: 'send',
    cid: 'w1',
    body: 'hi dave',
    to: 'dave',
  });
});

test('end-to-end: the item keeps the text, sealed into a frame when it goes', () => {
  const t = alice();
  const { msg } = t.do(localMessage, { cid: 'w1', conversation: DM, body: 'secret', ts: T0, afterSeq: 4, replyTo: 'm2', sealed: true });
  const item = outboxItem(t.s.convs.get(DM), msg, 'alice');
  assert.equal(item.frame, null);
  assert.deepEqual([item.sealed, item.body, item.replyTo], [true, 'secret', 'm2']);
  assert.deepEqual(sealedFrame(item, DM, { v: 1 }), { type: 'send', cid: 'w1', conversation: DM, e2e: { v: 1 }, reply_to: 'm2' });
});

test('a failed message is retried with the same cid (the server stores it once)', () => {
  const t = alice();
  const msg = typed(t, 'w1', 'again');
  const first = outboxItem(t.s.convs.get(DM), msg, 'alice');
  assert.equal(t.do(retryMessage, msg, false).msg, null); // only a failed message is retried
  t.do(markFailed, 'w1', 'rate_limited', 'slow down');
  const retried = t.do(retryMessage, msg, false).msg; // (msg is the copy from before it failed)
  assert.equal(t.s.byCid.get('w1'), retried);
  assert.equal(status(t.s, retried), 'pending');
  assert.equal(retried.error, null);
  const second = outboxItem(t.s.convs.get(DM), retried, 'alice');
  assert.deepEqual(second.frame, first.frame);
  assert.equal(second.frame.cid, 'w1');
  // Its `sent` settles the one message.
  t.do(receiveSent, { cid: 'w1', id: 'm5', conversation: DM, seq: 5, ts: T0 });
  assert.equal(convMsgs(t.s, DM).size, 1);
  assert.equal(status(t.s, t.s.byCid.get('w1')), 'sent');
});

test('a retried reply to a message deleted meanwhile goes as a plain message', () => {
  const t = alice();
  t.do(receiveMessage, { id: 'm3', conversation: DM, seq: 3, from: 'bob', body: 'q', ts: T0 }, T0);
  const msg = typed(t, 'w1', 'answer', 'm3');
  t.do(markFailed, 'w1', 'internal', null);
  t.do(applyEvent, 'deleted', { id: 'm3', by: 'bob' }, T0);
  const retried = t.do(retryMessage, msg, true).msg;
  assert.equal(retried.replyTo, null);
  assert.deepEqual([retried.sealed, retried.e2eState], [true, 'ok']); // the chat is end-to-end now
});

test('discarding drops a failed message only', () => {
  const t = alice();
  const msg = typed(t, 'w1');
  const before = t.s;
  t.do(discardMessage, msg);
  assert.equal(t.s, before); // pending: kept
  t.do(markFailed, 'w1', 'internal', null);
  t.do(discardMessage, msg);
  assert.equal(convMsgs(t.s, DM).size, 0);
  assert.equal(t.s.byCid.has('w1'), false);
});

test('the kept outbox: frames and texts, never the working flags; bad entries dropped', () => {
  const t = alice();
  const plain = outboxItem(t.s.convs.get(DM), typed(t, 'w1', 'one'), 'alice');
  const sealed = { cid: 'w2', conversation: DM, frame: null, ts: T0, afterSeq: 4, sealed: true, body: 'two', replyTo: null };
  Object.assign(plain, { preparing: true, sealTries: 2 });
  const json = JSON.stringify(storedItems([plain, sealed]));
  assert.ok(!json.includes('preparing') && !json.includes('sealTries'));
  const back = restoredItems(json);
  assert.deepEqual(back.map((i) => i.cid), ['w1', 'w2']);
  assert.deepEqual(back[0].frame, plain.frame);
  assert.deepEqual(restoredMessage(back[1], T0 + 1), {
    cid: 'w2', conversation: DM, body: 'two', ts: T0, afterSeq: 4, replyTo: null, sealed: true,
  });
  const broken = JSON.stringify([null, { cid: 'x' }, { cid: 'y', sealed: true, body: 3 }, { frame: {} }]);
  assert.deepEqual(restoredItems(broken), []);
  assert.deepEqual(restoredItems('not json'), []);
  assert.deepEqual(restoredItems(null), []);
});

test('a restored message is pending again, with its cid', () => {
  const t = alice();
  const item = outboxItem(t.s.convs.get(DM), typed(follow(newState('alice')), 'w9', 'kept', 'm1'), 'alice');
  const { msg } = t.do(localMessage, restoredMessage(JSON.parse(JSON.stringify(item)), T0));
  assert.deepEqual([msg.cid, msg.body, msg.replyTo, status(t.s, msg)], ['w9', 'kept', 'm1', 'pending']);
});

test('unqueue: the item leaves; the same array when it was not there', () => {
  const items = [{ cid: 'a' }, { cid: 'b' }];
  assert.equal(unqueue(items, 'zz'), items);
  assert.deepEqual(unqueue(items, 'a'), [{ cid: 'b' }]);
});

test('after `ready` the outbox goes again in order, a long one paced', () => {
  const items = Array.from({ length: 43 }, (_, i) => ({ cid: `c${i}` }));
  const plan = resendDelays(items);
  assert.deepEqual(plan.map((p) => p.item), items);
  assert.ok(plan.slice(0, 40).every((p) => p.delay === 0));
  assert.deepEqual(plan.slice(40).map((p) => p.delay), [60, 120, 180]);
});

test('refused as end-to-end: sealed again (same cid), at most SEAL_TRIES times', () => {
  const t = alice();
  const item = outboxItem(t.s.convs.get(DM), typed(t, 'w1', 'plain first', 'm2'), 'alice');
  assert.equal(toReseal(item), true);
  assert.deepEqual([item.sealed, item.body, item.replyTo, item.frame, item.cid], [true, 'plain first', 'm2', null, 'w1']);
  for (let i = 1; i < SEAL_TRIES; i++) assert.equal(toReseal(item), true);
  assert.equal(toReseal(item), false);
});
