// The outbox: our messages until the server has them, and our react/edit/
// delete requests until their `applied`.
//
// A message goes out as a `send` frame with a fresh `cid` and stays in the
// outbox (also kept in sessionStorage, `chatd.outbox.<user>`) until its
// `sent` (or history naming its cid) settles it. After every `ready`
// everything still there goes again with the same cid, so nothing is stored
// twice. In an end-to-end conversation an item keeps its plaintext and is
// sealed when it is about to go out (`prepare`); refused with `e2e_stale` or
// `e2e_required` it is sealed again, same cid (`sealAgain`).
//
// The item functions at the top are pure (tested under Node); `outboxMethods`
// are the App's methods that send (mixed into App by app.js).

import { randomId } from './dom.js';
import { E2EError } from './e2e.js';
import {
  discardMessage,
  dmPeer,
  isDm,
  localMessage,
  markE2E,
  markFailed,
  markSealed,
  maxSeq,
  retryMessage,
} from './state.js';

/** Where the outbox of user `me` is kept: sessionStorage[OUTBOX_PREFIX + me]. */
export const OUTBOX_PREFIX = 'chatd.outbox.';

/** e2e_stale / e2e_required answers one message may get before it fails. */
export const SEAL_TRIES = 3;

/** Sent at once after `ready`; the rest of a long queue is paced (the server's rate limit). */
const RESEND_BURST = 40;
const RESEND_GAP_MS = 60;

/** The `send` frame of a plain message (`to` the peer while the DM is not on the server yet). */
export function sendFrame(conv, cid, body, replyTo, me) {
  const frame = { type: 'send', cid, body };
  if (conv.provisional) frame.to = dmPeer(conv.id, me);
  else frame.conversation = conv.id;
  if (replyTo) frame.reply_to = replyTo;
  return frame;
}

/**
 * The outbox entry of a message of ours: its `send` frame, or (end-to-end)
 * its plaintext, sealed into a frame when it goes out.
 */
export function outboxItem(conv, msg, me) {
  const item = { cid: msg.cid, conversation: msg.conversation, frame: null, ts: msg.ts, afterSeq: msg.afterSeq };
  if (msg.sealed) Object.assign(item, { sealed: true, body: msg.body, replyTo: msg.replyTo });
  else item.frame = sendFrame(conv, msg.cid, msg.body, msg.replyTo, me);
  return item;
}

/** The `send` frame of a sealed item (`e2e` is what `E2E.seal` made of its text). */
export function sealedFrame(item, conversation, e2e) {
  const frame = { type: 'send', cid: item.cid, conversation, e2e };
  if (item.replyTo) frame.reply_to = item.replyTo;
  return frame;
}

/** The outbox less the item `cid` (the same array when it was not there). */
export function unqueue(outbox, cid) {
  const rest = outbox.filter((i) => i.cid !== cid);
  return rest.length === outbox.length ? outbox : rest;
}

/** What is kept of the outbox: the frame, or (end-to-end, not sealed yet) the text; never the working flags. */
export function storedItems(outbox) {
  return outbox.map(({ cid, conversation, frame, ts, afterSeq, sealed, body, replyTo }) => ({
    cid,
    conversation,
    frame,
    ts,
    afterSeq,
    sealed,
    body,
    replyTo,
  }));
}

/** The items of a kept outbox (JSON) that can go again; anything unreadable is dropped. */
export function restoredItems(json) {
  let items;
  try {
    items = JSON.parse(json || '[]');
  } catch {
    return [];
  }
  if (!Array.isArray(items)) return [];
  return items.filter((item) => item && item.cid && (item.frame || (item.sealed && typeof item.body === 'string')));
}

/** The message of a restored item, as `localMessage` takes it. */
export function restoredMessage(item, now) {
  return {
    cid: item.cid,
    conversation: item.conversation,
    body: item.sealed ? item.body : item.frame.body,
    ts: item.ts || now,
    afterSeq: item.afterSeq || 0,
    replyTo: item.sealed ? item.replyTo : item.frame.reply_to,
    sealed: Boolean(item.sealed),
  };
}

/** When each item goes again after `ready` (ms from now): the first ones at once. */
export function resendDelays(items) {
  return items.map((item, i) => ({ item, delay: i < RESEND_BURST ? 0 : (i - RESEND_BURST + 1) * RESEND_GAP_MS }));
}

/**
 * A plain item refused as `e2e_required` becomes an end-to-end one (its text
 * from its frame); any item loses its frame, to be sealed again. False once
 * it was refused more than SEAL_TRIES times.
 */
export function toReseal(item) {
  item.sealTries = (item.sealTries || 0) + 1;
  if (item.sealTries > SEAL_TRIES) return false;
  if (!item.sealed && item.frame) {
    Object.assign(item, { sealed: true, body: item.frame.body, replyTo: item.frame.reply_to || null });
  }
  item.frame = null;
  return true;
}

/** The App's sending methods (`this` is the App). */
export const outboxMethods = {
  /** Send a message typed in `convId` (the browser tests call it through `window.chatd`). */
  send(convId, body, replyTo = null) {
    const conv = this.convs.get(convId);
    const cid = randomId('w');
    const afterSeq = maxSeq(this.state, convId);
    const sealed = this.isE2E(conv);
    const fields = { cid, conversation: convId, body, ts: Date.now(), afterSeq, replyTo, sealed };
    const { msg } = this.update(localMessage, fields);
    const item = outboxItem(conv, msg, this.me);
    this.outbox.push(item);
    this.saveOutbox();
    this.dispatch(item);
    if (convId === this.openId) this.scrollMode = 'bottom';
    this.scheduleRender();
  },

  /** Send an outbox item: a plain one as it is, an end-to-end one once sealed. */
  dispatch(item) {
    if (item.sealed && !item.frame) this.prepare(item);
    else if (this.conn) this.conn.send(item.frame);
  },

  /**
   * Seal an end-to-end outbox item ({t: "msg"}, a new epoch if one is due)
   * and send it. It waits (stays pending) while the device is not registered
   * or sending is paused for a contact; the network failing leaves it for the
   * next `ready`; anything else fails it (with why).
   */
  async prepare(item) {
    const conv = this.convs.get(item.conversation);
    if (item.preparing || !conv || !this.outbox.includes(item)) return;
    if (!this.e2e.device && this.e2e.failure) {
      this.sendFailed(item.cid, 'bad_request', this.e2e.failure);
      return;
    }
    if (!this.e2e.ready || this.pausedBy(conv).length) return;
    item.preparing = true;
    try {
      const e2e = await this.e2e.seal(conv, { t: 'msg', body: item.body });
      if (!this.outbox.includes(item)) return;
      item.frame = sealedFrame(item, conv.id, e2e);
      this.saveOutbox();
      if (this.conn) this.conn.send(item.frame);
    } catch (err) {
      if (err.status === 401) this.sessionEnded(err.message);
      else if (err instanceof E2EError || (err.status >= 400 && err.status < 500)) {
        this.sendFailed(item.cid, err.code || 'bad_request', err.message);
      }
    } finally {
      item.preparing = false;
    }
  },

  /** One of our messages will not go: it shows "Not sent" with why, and Retry. */
  sendFailed(cid, code, message) {
    this.removeFromOutbox(cid);
    this.update(markFailed, cid, code, message);
  },

  /** Sending was paused (a contact to check) or waited for the device: go on. */
  resumeSealed() {
    for (const item of this.outbox) if (item.sealed && !item.frame) this.prepare(item);
    for (const [cid, action] of this.actions) if (action.sealed && !action.frame) this.prepareEdit(cid, action);
  },

  /**
   * The server refused one of our sends or edits with `e2e_stale` (the
   * epoch's shares are not the conversation's devices now) or `e2e_required`
   * (switched on another device): seal it again, new epoch, same cid (never
   * stored twice). False when it was tried too often (it fails as usual).
   */
  sealAgain(f) {
    const item = this.outbox.find((i) => i.cid === f.cid);
    const action = this.actions.get(f.cid);
    const target = item || action;
    const conv = target && this.convs.get(target.conversation);
    if (!conv) return false;
    if (item) {
      const wasSealed = item.sealed;
      if (!toReseal(item)) return false;
      this.noteSealRefusal(conv, f);
      if (!wasSealed) this.update(markSealed, item.cid);
      this.saveOutbox();
      this.prepare(item);
    } else {
      action.sealTries = (action.sealTries || 0) + 1;
      if (action.sealTries > SEAL_TRIES) return false;
      this.noteSealRefusal(conv, f);
      Object.assign(action, { sealed: true, frame: null });
      this.prepareEdit(f.cid, action);
    }
    this.scheduleRender();
    return true;
  },

  /** What an e2e refusal says about the conversation: switched on, or its epoch is stale. */
  noteSealRefusal(conv, f) {
    if (f.reason === 'e2e_required') this.update(markE2E, conv.id);
    else this.e2e.markStale(conv.id);
  },

  /** Send a failed message again, with the same cid: it can never be stored twice. */
  retry(msg) {
    const conv = this.convs.get(msg.conversation);
    const retried = conv && this.update(retryMessage, msg, this.isE2E(conv)).msg;
    if (!retried) return;
    const item = outboxItem(conv, retried, this.me);
    this.outbox.push(item);
    this.saveOutbox();
    this.dispatch(item);
  },

  /** Drop a failed message. */
  discard(msg) {
    this.update(discardMessage, msg);
  },

  removeFromOutbox(cid) {
    const rest = unqueue(this.outbox, cid);
    if (rest === this.outbox) return;
    this.outbox = rest;
    this.saveOutbox();
  },

  saveOutbox() {
    if (!this.me) return;
    const key = OUTBOX_PREFIX + this.me;
    const items = storedItems(this.outbox);
    if (items.length) sessionStorage.setItem(key, JSON.stringify(items));
    else sessionStorage.removeItem(key);
  },

  /** After logging in: the messages not sent in this tab before are pending again. */
  restoreOutbox() {
    for (const item of restoredItems(sessionStorage.getItem(OUTBOX_PREFIX + this.me))) {
      if (isDm(item.conversation)) this.provisionalDm(dmPeer(item.conversation, this.me));
      else this.ensureConv(item.conversation);
      this.update(localMessage, restoredMessage(item, Date.now()));
      this.outbox.push(item);
    }
  },

  /** After `ready`: everything not yet confirmed goes again, same cid (no doubles). */
  resendOutbox() {
    for (const { item, delay } of resendDelays([...this.outbox])) {
      const send = () => {
        if (this.outbox.includes(item)) this.dispatch(item);
      };
      if (!delay) send();
      else setTimeout(send, delay);
    }
  },

  /** Send a react/edit/delete request; it waits in `actions` for its answer. */
  request(type, msg, fields) {
    const cid = randomId('a');
    const frame = { type, cid, id: msg.id, ...fields };
    this.actions.set(cid, { frame, type, id: msg.id, conversation: msg.conversation, ...fields });
    if (this.conn) this.conn.send(frame); // else after the next `ready`
    return cid;
  },

  /** An edit in an end-to-end conversation: {t: "edit", id, body} sealed, then sent. */
  requestSealedEdit(msg, body) {
    const cid = randomId('a');
    const action = { frame: null, type: 'edit', id: msg.id, body, sealed: true, conversation: msg.conversation };
    this.actions.set(cid, action);
    this.prepareEdit(cid, action);
    return cid;
  },

  async prepareEdit(cid, action) {
    const conv = this.convs.get(action.conversation);
    if (action.preparing || !conv || !this.e2e.ready || this.pausedBy(conv).length) return;
    action.preparing = true;
    try {
      const e2e = await this.e2e.seal(conv, { t: 'edit', id: action.id, body: action.body });
      if (this.actions.get(cid) !== action) return;
      action.frame = { type: 'edit', cid, id: action.id, e2e };
      if (this.conn) this.conn.send(action.frame); // else after the next `ready`
    } catch (err) {
      if (err.status === 401) this.sessionEnded(err.message);
      else if (err instanceof E2EError || (err.status >= 400 && err.status < 500)) {
        this.toast('bad_request', `The edit was not sent: ${err.message}`);
        this.actionFailed(cid, 'bad_request');
      }
    } finally {
      action.preparing = false;
    }
  },
};
