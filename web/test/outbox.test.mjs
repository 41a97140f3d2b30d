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
import { applyDelete } from '../js/events.js';
import { receiveSent } from '../js/frames.js';
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

const DM = dmId('alice', 'bob');
const T0 = 1_700_000_000_000;

function alice() {
  const s = newState('alice');
  s.convs.set(DM, { id: DM, kind: 'dm', members: ['alice', 'bob'], last_seq: 4, last_ts: 0, unread: 0 });
  return s;
}

const typed = (s, cid, body = 'hi', replyTo = null) =>
  localMessage(s, { cid, conversation: DM, body, ts: T0, afterSeq: 4, replyTo });

test('a message goes out as `send` with its cid, the conversation and what it answers', () => {
  const s = alice();
  const msg = typed(s, 'w1', 'hello', 'm3');
  const item = outboxItem(s.convs.get(DM), msg, 'alice');
  assert.deepEqual(item.frame, { type: 'send', cid: 'w1', body: 'hello', conversation: DM, reply_to: 'm3' });
  assert.deepEqual([item.cid, item.conversation, item.ts, item.afterSeq], ['w1', DM, T0, 4]);
});

test('the first message of a chat the server does not have yet goes `to` the peer', () => {
  const s = newState('alice');
  const id = provisionalDm(s, 'dave', T0);
  assert.deepEqual(sendFrame(s.convs.get(id), 'w1', 'hi dave', null, 'alice'), {
    type: 'send',
    cid: 'w1',
    body: 'hi dave',
    to: 'dave',
  });
});

test('end-to-end: the item keeps the text, sealed into a frame when it goes', () => {
  const s = alice();
  const msg = localMessage(s, { cid: 'w1', conversation: DM, body: 'secret', ts: T0, afterSeq: 4, replyTo: 'm2', sealed: true });
  const item = outboxItem(s.convs.get(DM), msg, 'alice');
  assert.equal(item.frame, null);
  assert.deepEqual([item.sealed, item.body, item.replyTo], [true, 'secret', 'm2']);
  assert.deepEqual(sealedFrame(item, DM, { v: 1 }), { type: 'send', cid: 'w1', conversation: DM, e2e: { v: 1 }, reply_to: 'm2' });
});

test('a failed message is retried with the same cid (the server stores it once)', () => {
  const s = alice();
  const msg = typed(s, 'w1', 'again');
  const first = outboxItem(s.convs.get(DM), msg, 'alice');
  assert.equal(retryMessage(s, msg, false), false); // only a failed message is retried
  markFailed(s, 'w1', 'rate_limited', 'slow down');
  assert.equal(retryMessage(s, msg, false), true);
  assert.equal(status(s, msg), 'pending');
  assert.equal(msg.error, null);
  const second = outboxItem(s.convs.get(DM), msg, 'alice');
  assert.deepEqual(second.frame, first.frame);
  assert.equal(second.frame.cid, 'w1');
  // Its `sent` settles the one message.
  receiveSent(s, { cid: 'w1', id: 'm5', conversation: DM, seq: 5, ts: T0 });
  assert.equal(convMsgs(s, DM).size, 1);
  assert.equal(status(s, msg), 'sent');
});

test('a retried reply to a message deleted meanwhile goes as a plain message', () => {
  const s = alice();
  const original = localMessage(s, { cid: 'x', conversation: DM, body: 'q', ts: T0, afterSeq: 0 });
  Object.assign(original, { id: 'm3', state: 'stored' });
  s.byId.set('m3', original);
  const msg = typed(s, 'w1', 'answer', 'm3');
  markFailed(s, 'w1', 'internal', null);
  applyDelete(original);
  retryMessage(s, msg, true);
  assert.equal(msg.replyTo, null);
  assert.deepEqual([msg.sealed, msg.e2eState], [true, 'ok']); // the chat is end-to-end now
});

test('discarding drops a failed message only', () => {
  const s = alice();
  const msg = typed(s, 'w1');
  assert.equal(discardMessage(s, msg), false);
  markFailed(s, 'w1', 'internal', null);
  assert.equal(discardMessage(s, msg), true);
  assert.equal(convMsgs(s, DM).size, 0);
  assert.equal(s.byCid.has('w1'), false);
});

test('the kept outbox: frames and texts, never the working flags; bad entries dropped', () => {
  const s = alice();
  const plain = outboxItem(s.convs.get(DM), typed(s, 'w1', 'one'), 'alice');
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
  const s = alice();
  const item = outboxItem(s.convs.get(DM), typed(newState('alice'), 'w9', 'kept', 'm1'), 'alice');
  const msg = localMessage(s, restoredMessage(JSON.parse(JSON.stringify(item)), T0));
  assert.deepEqual([msg.cid, msg.body, msg.replyTo, status(s, msg)], ['w9', 'kept', 'm1', 'pending']);
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
  const s = alice();
  const item = outboxItem(s.convs.get(DM), typed(s, 'w1', 'plain first', 'm2'), 'alice');
  assert.equal(toReseal(item), true);
  assert.deepEqual([item.sealed, item.body, item.replyTo, item.frame, item.cid], [true, 'plain first', 'm2', null, 'w1']);
  for (let i = 1; i < SEAL_TRIES; i++) assert.equal(toReseal(item), true);
  assert.equal(toReseal(item), false);
});
