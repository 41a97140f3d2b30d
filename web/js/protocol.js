// The wire: the WebSocket's frames and the HTTP reads of the list and of
// history. Each frame goes to its update in frames.js or state.js, which
// returns the new state and effects; `update` keeps the state and carries
// the effects out (`run`): acks batched every 30 ms, the list asked for
// again, end-to-end bodies decrypted, and so on.
//
// Acks: every `message` from someone else is acked by id, every `receipt` by
// its rid, every event by its eid (at most MAX_IDS of each a frame); `seen`
// is sent for what was shown in a focused tab (render.js finds it).
//
// `protocolMethods` are mixed into App by app.js (`this` is the App).

import { api } from './api.js';
import { Connection } from './connection.js';
import { placeholderText } from './e2e.js';
import {
  applyEvent,
  applyMembersEvent,
  firstTime,
  leaveConv,
  receiveEvent,
  receiveMessage,
  receivePresence,
  receiveReceipt,
  receiveSent,
  receiveTyping,
  setPresence,
} from './frames.js';
import {
  dmPeer,
  histState,
  isDm,
  markFailed,
  mergeConversations,
  mergeLatest,
  mergeOlder,
  readingSealed,
  sealedOpened,
  setHistory,
} from './state.js';
import { resolveWsUrl } from './wsurl.js';

const PAGE = 50; // messages per history page
const MAX_IDS = 500; // per ack/seen frame (the server takes up to 1000)
const ACK_DELAY_MS = 30;
const EVENT_OF = { react: 'reaction', edit: 'edited', delete: 'deleted' }; // request -> its event
const DECRYPT_RETRY_MS = 3000; // a message that could not be decrypted for now (network) is tried again

function chunks(list, size) {
  const out = [];
  for (let i = 0; i < list.length; i += size) out.push(list.slice(i, i + size));
  return out;
}

/** What a sealed message shows once read: its text, or why there is none (never any text then). */
function opened(r) {
  if (r.body != null) return { body: r.body, e2eState: 'ok', e2eError: null, e2eReason: null };
  const reason = r.unavailable ? 'unavailable' : r.before ? 'before' : r.reason;
  return { body: null, e2eState: 'failed', e2eError: placeholderText(r), e2eReason: reason };
}

/** The App's protocol methods (`this` is the App). */
export const protocolMethods = {
  /**
   * Apply a state update (state.js, frames.js) to the state: keep the new
   * state, then carry out its effects. Returns the update's answer.
   */
  update(fn, ...args) {
    const r = fn(this.state, ...args);
    this.state = r.state;
    this.run(r.fx);
    return r;
  },

  /** Carry out the effects of a state update (see state.js). */
  run(fx) {
    for (const e of fx) {
      switch (e.type) {
        case 'render':
          this.scheduleRender();
          break;
        case 'refreshConversations':
          this.refreshConversationsSoon();
          break;
        case 'loadPresence':
          this.loadPresence(e.user);
          break;
        case 'ack':
          ({ ids: this.ackIds, receipts: this.ackReceipts, events: this.ackEvents })[e.queue].add(e.id);
          this.flushSoon();
          break;
        case 'seen':
          this.seenQueue.add(e.id);
          this.flushSoon();
          break;
        case 'unqueue':
          this.removeFromOutbox(e.cid);
          break;
        case 'readSealed':
          this.readSealed(e.id, e.e2e, { editOf: e.editOf, ts: e.ts });
          break;
        case 'scrollBottom':
          if (e.conversation === this.openId) this.scrollMode = 'bottom';
          break;
        case 'reload':
          if (e.conversation === this.openId) this.loadLatest(e.conversation, { refresh: true });
          break;
        case 'forgetDeleted':
          this.forgetDeleted(e.msg, e.by);
          break;
        case 'left':
          this.leftChat(e.conversation);
          break;
        case 'membersChanged':
          // New members' devices (the next epoch goes to them too) in the panel.
          if (this.devicesPanel.isOpen && this.devicesPanel.convId === e.conversation) this.devicesPanel.refresh();
          break;
        default:
          throw new Error(`unknown effect ${e.type}`);
      }
    }
  },

  startConnection() {
    this.conn = new Connection({
      token: this.token,
      authFields: () => (this.e2e.deviceId ? { device: this.e2e.deviceId } : {}),
      resolveUrl: () => this.wsUrl(),
      onFrame: (f) => this.onFrame(f),
      onStatus: (s) => this.onStatus(s),
      onUnauthorized: (msg) => this.sessionEnded(msg),
    });
    this.conn.start();
  },

  async wsUrl() {
    if (!this.info) this.info = await api('/api/info');
    return resolveWsUrl(this.info, window.location);
  },

  onStatus(s) {
    this.connState = s;
    if (s.state === 'waiting') this.info = null; // ask /api/info again next time
    this.renderStatus();
  },

  onFrame(f) {
    switch (f.type) {
      case 'ready':
        return this.onReady(f);
      case 'sent':
        return this.update(receiveSent, f);
      case 'message':
        return this.update(receiveMessage, f, Date.now());
      case 'receipt':
        return this.update(receiveReceipt, f);
      case 'typing':
        return this.update(receiveTyping, f, Date.now());
      case 'presence':
        return this.update(receivePresence, f);
      case 'applied':
        return this.onApplied(f);
      case 'reaction':
      case 'edited':
      case 'deleted':
      case 'members':
        return this.update(receiveEvent, f, Date.now());
      case 'devices':
        return this.onDevices(f);
      case 'error':
        return this.onError(f);
      default:
        return undefined; // frames this client does not know are ignored
    }
  },

  onReady(f) {
    this.readyCount += 1;
    // The socket speaks for our device only if `ready` says so.
    if (this.e2e.device && f.device !== this.e2e.deviceId) this.claimDevice();
    this.resendOutbox();
    // Requests not answered yet go again, same cid: applied once at most.
    for (const [cid, action] of this.actions) {
      if (action.frame) this.conn.send(action.frame);
      else if (action.sealed) this.prepareEdit(cid, action);
    }
    this.flush();
    if (!this.convsLoaded) this.loadConversations(); // the first try failed
    if (this.readyCount > 1) {
      // Back after a drop: the backlog brings what is owed; refresh the rest
      // (receipts seen elsewhere, presence, the list's counts).
      this.loadConversations();
      for (const [id, st] of this.hist) {
        if (!st.loaded) continue;
        if (id === this.openId) this.loadLatest(id, { refresh: true });
        else this.update(setHistory, id, { stale: true });
      }
      if (this.openId && isDm(this.openId)) this.loadPresence(dmPeer(this.openId, this.me));
    }
    this.renderStatus();
  },

  /** Our own request is stored: apply it as the event it became. */
  onApplied(f) {
    const action = this.actions.get(f.cid);
    this.actions.delete(f.cid);
    if (!action || !this.update(firstTime, f.eid).first) return;
    const event = { ...action, id: f.id || action.id, by: this.me, ts: f.ts };
    this.update(applyEvent, EVENT_OF[action.type], event, Date.now());
  },

  /**
   * Our own change of a group is stored (the HTTP answer: the group after
   * it, with the eid of the `members` event it became): apply it as that
   * event, once, whichever of the two comes first.
   */
  groupChanged(answer, action, users) {
    if (!this.update(firstTime, answer.eid).first) return;
    const now = Date.now();
    const event = {
      type: 'members',
      eid: answer.eid,
      conversation: answer.id,
      eseq: answer.eseq,
      by: this.me,
      ts: now,
      action,
      users,
      members: answer.members,
      admins: answer.admins,
      title: answer.title,
    };
    this.update(applyMembersEvent, event, now);
  },

  /** Removed, or left: the chat stays on screen, read-only, until a reload. */
  noLongerMember(conv, why) {
    this.update(leaveConv, conv.id, why);
  },

  /** The open chat became read-only: no palette, no reply or edit under way. */
  leftChat(id) {
    if (this.openId !== id) return;
    this.paletteFor = null;
    if (this.compose) this.setCompose(null);
  },

  /**
   * A `devices` frame: someone's devices changed (a contact's, or ours).
   * The list is fetched again (trust on first use compares it there; the
   * next send sees the new devices and makes a new epoch).
   */
  async onDevices(f) {
    if (typeof f.user !== 'string' || !this.e2e.device) return;
    const e2e = this.e2e;
    let removedMe = false;
    try {
      ({ removedMe } = await e2e.onDevicesFrame(f.user));
    } catch {
      return; // no longer shares a conversation with us: nothing to show
    }
    if (this.e2e !== e2e) return;
    if (removedMe) {
      // Removed from another tab or window: this tab gets a new device.
      this.toast('forbidden', 'This device was removed from your account. A new device is registered for this browser.');
      this.deviceFixAt = 0;
      this.claimDevice();
    }
    if (this.devicesPanel.isOpen) this.devicesPanel.refresh();
    this.scheduleRender();
  },

  onError(f) {
    // An end-to-end refusal of ours is no error to show: sealed again and resent.
    if (f.cid && (f.reason === 'e2e_stale' || f.reason === 'e2e_required') && this.sealAgain(f)) return;
    if (f.cid && this.actions.has(f.cid)) this.actionFailed(f.cid, f.code);
    if (f.cid) {
      this.removeFromOutbox(f.cid);
      this.update(markFailed, f.cid, f.code, f.message);
    }
    // An unauthorized during auth is followed by close 4001, which logs out.
    if (f.code === 'unauthorized' && this.conn && !this.conn.ready) return;
    if (f.code === 'not_found' && Array.isArray(f.ids)) {
      // An ack or seen of a message deleted meanwhile (its `deleted` event may
      // still be on its way) is refused like this: nothing to tell anyone.
      const me = this.me;
      setTimeout(() => {
        if (this.me === me && f.ids.some((id) => !this.byId.get(id)?.deleted)) this.toast(f.code, f.message);
      }, 1500);
      return;
    }
    this.toast(f.code, f.message);
  },

  apiFailed(err) {
    if (err.status === 401) this.sessionEnded(err.message);
    else this.toast(err.code, err.message);
  },

  // --- acks and seen ------------------------------------------------------------

  flushSoon() {
    if (!this.flushTimer) this.flushTimer = setTimeout(() => this.flush(), ACK_DELAY_MS);
  },

  flush() {
    this.flushTimer = 0;
    if (!this.conn || !this.conn.ready) return; // kept; sent after the next `ready`
    const ids = [...this.ackIds];
    const receipts = [...this.ackReceipts];
    const events = [...this.ackEvents];
    const n = Math.max(...[ids, receipts, events].map((l) => Math.ceil(l.length / MAX_IDS)));
    for (let i = 0; i < n; i++) {
      const frame = { type: 'ack' };
      const someIds = ids.slice(i * MAX_IDS, (i + 1) * MAX_IDS);
      const someRids = receipts.slice(i * MAX_IDS, (i + 1) * MAX_IDS);
      const someEids = events.slice(i * MAX_IDS, (i + 1) * MAX_IDS);
      if (someIds.length) frame.ids = someIds;
      if (someRids.length) frame.receipts = someRids;
      if (someEids.length) frame.events = someEids;
      if (!this.conn.send(frame)) return;
      someIds.forEach((x) => this.ackIds.delete(x));
      someRids.forEach((x) => this.ackReceipts.delete(x));
      someEids.forEach((x) => this.ackEvents.delete(x));
    }
    for (const part of chunks([...this.seenQueue], MAX_IDS)) {
      if (!this.conn.send({ type: 'seen', ids: part })) return;
      part.forEach((x) => this.seenQueue.delete(x));
      this.lastSeenFlush = Date.now();
    }
  },

  // --- the list and history (HTTP) ------------------------------------------------

  async loadConversations() {
    const started = Date.now();
    const me = this.me;
    let data;
    try {
      data = await api('/api/conversations', { token: this.token });
    } catch (err) {
      this.apiFailed(err);
      return;
    }
    if (!this.me || this.me !== me) return;
    if (this.lastSeenFlush > started - 1000) {
      // A `seen` may have crossed this request: the counts could be stale.
      // Ask once more when the server has surely applied it.
      clearTimeout(this.settleTimer);
      this.settleTimer = setTimeout(() => this.loadConversations(), 600);
    }
    this.update(mergeConversations, data.conversations, started);
    const first = !this.convsLoaded;
    this.convsLoaded = true;
    if (first) this.route();
    if (this.openId) {
      const st = histState(this.state, this.openId);
      if (!st.loaded || st.stale) this.loadLatest(this.openId, { refresh: st.loaded });
    }
    this.scheduleRender();
  },

  refreshConversationsSoon() {
    if (this.convRefreshTimer) return;
    this.convRefreshTimer = setTimeout(() => {
      this.convRefreshTimer = 0;
      this.loadConversations();
    }, 250);
  },

  async loadPresence(user) {
    try {
      const token = this.token;
      const info = await api(`/api/users/${encodeURIComponent(user)}`, { token });
      if (token !== this.token) return;
      this.update(setPresence, info.username, { online: info.online, last_seen: info.last_seen });
    } catch (err) {
      if (err.status === 401) this.sessionEnded(err.message);
      // 404: nothing shared yet; the header just shows no presence.
    }
  },

  /** The newest page of a chat's history (again after a reconnect: `refresh`). */
  async loadLatest(id, { refresh = false } = {}) {
    const st = histState(this.state, id);
    const conv = this.convs.get(id);
    if (st.loading || (conv && conv.left)) return; // no history for a former member
    if (conv && conv.provisional) {
      this.update(setHistory, id, { loaded: true, complete: true });
      this.scheduleRender();
      return;
    }
    this.update(setHistory, id, { loading: true, stale: false });
    this.scheduleRender();
    const me = this.me;
    const token = this.token;
    const asOf = Date.now();
    try {
      const data = await api(`/api/conversations/${encodeURIComponent(id)}/messages?limit=${PAGE}`, { token });
      if (token !== this.token) return; // logged out meanwhile
      this.update(mergeLatest, id, data.messages, { refresh, asOf, pageSize: PAGE });
    } catch (err) {
      const here = this.me === me; // not logged out meanwhile
      if (err.status === 404) {
        if (here) this.update(setHistory, id, { loaded: true, complete: true });
      } else if (err.status === 403 && conv && conv.kind === 'group') {
        if (here) this.noLongerMember(conv);
      } else this.apiFailed(err);
    } finally {
      if (this.me === me) this.update(setHistory, id, { loading: false });
      this.scheduleRender();
    }
  },

  /** The page before the oldest message held (scrolling up). */
  async loadOlder(id) {
    const st = histState(this.state, id);
    if (!st.loaded || st.complete || st.loading || st.oldest == null) return;
    if (this.convs.get(id)?.left) return;
    this.update(setHistory, id, { loading: true });
    this.scheduleRender();
    const me = this.me;
    const token = this.token;
    const asOf = Date.now();
    try {
      const data = await api(
        `/api/conversations/${encodeURIComponent(id)}/messages?before=${st.oldest}&limit=${PAGE}`,
        { token },
      );
      if (token !== this.token) return;
      this.update(mergeOlder, id, data.messages, { asOf, pageSize: PAGE });
      if (this.openId === id) this.scrollMode = 'keep';
    } catch (err) {
      this.apiFailed(err);
    } finally {
      if (this.me === me) this.update(setHistory, id, { loading: false });
      this.scheduleRender();
    }
  },

  // --- end-to-end bodies ------------------------------------------------------------

  /**
   * Decrypt the `e2e` object of message `id` (or, with `editOf`, an edit's)
   * into its body. Until it is done (and judged: `showOpened`) the message
   * shows "decrypting", and when it fails a placeholder saying why
   * (`e2eError`), never text. `ts` is when the content was made (for "sent
   * before this device was added"). `again`: read it even if this version
   * was tried already (it could not be, for now).
   */
  readSealed(id, e2e, { editOf = null, ts, again = false } = {}) {
    const msg = this.byId.get(id);
    if (!msg) return;
    const input = { id, conversation: msg.conversation, from: msg.from, seq: msg.seq, ts: ts ?? msg.ts, e2e };
    const same = !again && msg.e2eInput && this.e2e.cacheKey(msg.e2eInput) === this.e2e.cacheKey(input);
    if (same) return; // this version is read already, or being read
    this.update(readingSealed, id, input);
    const known = this.e2e.peek(input);
    if (known) {
      this.showOpened(id, known);
      return;
    }
    // Still this version of this message (not a newer one, not logged out)?
    const current = () => this.byId.get(id)?.e2eInput === input;
    this.e2e.open(input, { editOf }).then((result) => {
      if (!current() || this.byId.get(id).deleted) return; // a newer version came meanwhile
      const r = this.e2e.peek(input) || result; // taken back meanwhile (a replay) wins
      if (r.retry) {
        // Not tried (the network): once more in a moment.
        setTimeout(() => {
          if (current()) this.readSealed(id, e2e, { editOf, ts, again: true });
        }, DECRYPT_RETRY_MS);
        return;
      }
      this.showOpened(id, r); // drawn (and so maybe seen) once the replay guard can judge it
    });
  },

  /**
   * Message `id` shows what reading it gave (`r`: its text, or why there is
   * none). A text waits until every earlier message of its device held here
   * was read (state.js releaseSealed): only then is it drawn, and seen.
   */
  showOpened(id, r) {
    this.update(sealedOpened, id, opened(r));
  },

  /**
   * Message `id`, read before, turned out to be a replay of an earlier one
   * (e2e-read.js `takeBack`): it says so now, and a `seen` of it that is
   * still waiting for its batch does not go.
   */
  replayFound(id, verdict) {
    this.seenQueue.delete(id);
    const msg = this.byId.get(id);
    if (msg && msg.sealed) this.showOpened(id, verdict);
  },
};
