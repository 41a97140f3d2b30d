// The chat's state and its updates: conversations, messages (merged by id,
// ordered by seq), ticks, unread counts, the list and history merged in.
// What each live frame and event does is in frames.js. No DOM, no network,
// no timers, no clock (the time comes in as `now`), so it runs under Node
// (`node --test web/test/`).
//
// The state is never changed. An update takes a state (and a frame, a page
// of history, …) and returns {state, fx}: the new state, and what should
// happen next as a list of effects; some answer more (the message made, the
// id of a new chat). The page keeps the new state and carries the effects
// out (`update` and `run` in protocol.js). The new state shares with the old
// one everything the update did not change: a message, conversation or
// history state that changes is replaced by a changed copy, and a map or set
// of the state is copied the first time an update changes it (a Draft,
// below), so an update costs what it changes. web/test/pure.test.mjs runs
// every update on a deep-frozen state.
//
// The effects (the page's `run`):
//
//   {type: 'render'}                          redraw (once per frame)
//   {type: 'refreshConversations'}            ask for the conversation list again, soon
//   {type: 'loadPresence', user}              ask whether `user` is online
//   {type: 'ack', queue, id}                  ack `id`: queue is 'ids' | 'receipts' | 'events'
//   {type: 'seen', id}                        report that we saw the message `id`
//   {type: 'unqueue', cid}                    the message `cid` leaves the outbox (stored)
//   {type: 'readSealed', id, e2e, editOf, ts} decrypt an end-to-end body (or edit) of message `id`
//   {type: 'scrollBottom', conversation}      our own message arrived: follow it if open
//   {type: 'reload', conversation}            load that chat's newest page again if open
//   {type: 'forgetDeleted', msg, by}          the composer and the palette let go of `msg`
//   {type: 'left', conversation}              we are no longer a member (composer, palette)
//   {type: 'membersChanged', conversation}    an open encryption panel shows the new members
//
// Messages are keyed "c:<cid>" while they are only ours (not stored yet) and
// "m:<id>" once they came from the server; byId and byCid find either.

import { errorText } from './errors.js';
import { EDIT_WINDOW_MS, applyDelete, canManage, reactionsFromHistory } from './events.js';

/** The tick labels of our own messages, by status. */
export const TICK_LABELS = {
  pending: 'Sending…',
  sent: 'Sent',
  delivered: 'Delivered',
  seen: 'Seen',
  failed: 'Not sent',
};

/** The effect "redraw". */
export const RENDER = Object.freeze({ type: 'render' });
/** The effect "ask for the conversation list again". */
export const REFRESH = Object.freeze({ type: 'refreshConversations' });

/** Is this a one-to-one conversation id (`dm:<a>:<b>`)? */
export const isDm = (id) => id.startsWith('dm:');

/** The id of the one-to-one conversation of `a` and `b`. */
export const dmId = (a, b) => (a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`);

/** The other member of the one-to-one conversation `id`. */
export function dmPeer(id, me) {
  const [, a, b] = id.split(':');
  return a === me ? b : a;
}

/** Stored messages in seq order; our unsent ones after them, in the order typed. */
export function bySeq(a, b) {
  if (a.seq != null && b.seq != null) return a.seq - b.seq;
  if (a.seq != null) return -1;
  if (b.seq != null) return 1;
  return a.order - b.order;
}

/** The set `set` with `item` in it: `set` itself when it is there already, else a copy. */
export function withItem(set, item) {
  return set.has(item) ? set : new Set(set).add(item);
}

/** An empty state for user `me`. */
export function newState(me = null) {
  return {
    me,
    // id -> {id, kind, title, members, admins, last_seq, last_ts, unread, provisional,
    //        left, leftNote, membersEseq, membersAt, joined, created, e2e}
    convs: new Map(),
    msgs: new Map(), // conversation -> Map(key -> msg)
    byId: new Map(),
    byCid: new Map(),
    hist: new Map(), // conversation -> {loaded, loading, complete, oldest, stale}
    presence: new Map(), // user -> {online, last_seen}
    typing: new Map(), // conversation -> Map(user -> expiresAt)
    eids: new Set(), // events applied (or answered by `applied`): each counts once
    notes: new Map(), // conversation -> [{note, key, ts, text}]: group changes shown in the chat
    order: 0, // the order messages became known here (ties of unsent ones)
    noteCount: 0,
  };
}

// --- updating ------------------------------------------------------------------------

/**
 * One update under way. `s` is the state as changed so far: the state given
 * until the first change, then a shallow copy of it; a map or set of the
 * state is copied the first time it changes (once per update) and changed in
 * place after that. Messages, conversations and history states are replaced,
 * never changed. The state given is never touched. `fx` collects the effects.
 *
 * The updates below (and in frames.js) start one, take their steps on it
 * (the `ensureConv`, `ingest` and `settle` steps take a Draft too) and
 * return `done()`.
 */
export class Draft {
  constructor(state) {
    this.base = state;
    this.s = state;
    this.fx = [];
    this.copies = new Set(); // the maps and sets this update made (changed in place)
  }

  /** Set the field `name` of the state (order, noteCount, or a copied map). */
  set(name, value) {
    if (this.s === this.base) this.s = { ...this.base };
    this.s[name] = value;
  }

  /** The state's map or set `name`, to change: copied the first time. */
  own(name) {
    const c = this.s[name];
    if (this.copies.has(c)) return c;
    const copy = c instanceof Set ? new Set(c) : new Map(c);
    this.copies.add(copy);
    this.set(name, copy);
    return copy;
  }

  /** The map at `key` of the state's map `name` (msgs, typing), to change: copied the first time, made when missing. */
  ownIn(name, key) {
    const outer = this.own(name);
    const inner = outer.get(key);
    if (inner && this.copies.has(inner)) return inner;
    const copy = new Map(inner);
    this.copies.add(copy);
    outer.set(key, copy);
    return copy;
  }

  /** Put conversation `conv` (a new one, or a new version). */
  putConv(conv) {
    this.own('convs').set(conv.id, conv);
    return conv;
  }

  /** Conversation `id` (one held) with `patch` over what it is now. */
  patchConv(id, patch) {
    return this.putConv({ ...this.s.convs.get(id), ...patch });
  }

  /** How much of conversation `id`'s history is here, with `patch` over what it is now. */
  patchHist(id, patch) {
    this.own('hist').set(id, { ...histState(this.s, id), ...patch });
  }

  /** Put message `msg` (a new one, or a new version) where it is found: its conversation, byId, byCid. */
  putMsg(msg) {
    this.ownIn('msgs', msg.conversation).set(msg.key, msg);
    if (msg.id) this.own('byId').set(msg.id, msg);
    if (msg.cid && this.s.byCid.get(msg.cid)?.key === msg.key) this.own('byCid').set(msg.cid, msg);
    return msg;
  }

  /** Take message `msg` out of its conversation (byId and byCid are the caller's). */
  dropMsg(msg) {
    this.ownIn('msgs', msg.conversation).delete(msg.key);
  }

  /** The update's answer: {state, fx}, and `more`. */
  done(more) {
    return { state: this.s, fx: this.fx, ...more };
  }
}

// --- conversations ---------------------------------------------------------------

/** Step: the conversation `id`, made up (and the list asked for, effect) when unknown. */
export function ensureConv(d, id) {
  const known = d.s.convs.get(id);
  if (known) return known;
  const dm = isDm(id);
  const conv = d.putConv({
    id,
    kind: dm ? 'dm' : 'group',
    title: null,
    members: dm ? id.split(':').slice(1) : [],
    last_seq: 0,
    last_ts: 0,
    unread: 0,
    provisional: false,
  });
  d.fx.push(REFRESH); // learn its title and members
  return conv;
}

/** The conversation `id` known: made up (and the list asked for) when it is not. Answers `conv`. */
export function knownConv(s, id) {
  const d = new Draft(s);
  const conv = ensureConv(d, id);
  return d.done({ conv });
}

/** A one-to-one chat with `peer` that the server does not have yet (the first message makes it). Answers its `id`. */
export function provisionalDm(s, peer, now) {
  const d = new Draft(s);
  const id = dmId(s.me, peer);
  if (!s.convs.has(id)) {
    d.putConv({
      id,
      kind: 'dm',
      title: null,
      members: [s.me, peer].sort(),
      last_seq: 0,
      last_ts: 0,
      unread: 0,
      provisional: true,
      created: now,
    });
  }
  return d.done({ id });
}

/** A group we just made (the answer of `POST /api/conversations`): in the list, its history empty. */
export function addGroup(s, made, now) {
  const d = new Draft(s);
  d.putConv({
    id: made.id,
    kind: made.kind || 'group',
    title: made.title ?? null,
    members: made.members,
    admins: made.admins || [s.me],
    last_seq: 0,
    last_ts: 0,
    unread: 0,
    provisional: false,
    created: now,
    e2e: Boolean(made.e2e),
  });
  d.patchHist(made.id, { loaded: true, complete: true });
  return d.done();
}

/** The messages of conversation `id` (Map key -> msg; an empty one when there are none). */
export function convMsgs(s, id) {
  return s.msgs.get(id) || new Map();
}

const NO_HISTORY = Object.freeze({ loaded: false, loading: false, complete: false, oldest: null, stale: false });

/** How much of conversation `id`'s history is here. */
export function histState(s, id) {
  return s.hist.get(id) || NO_HISTORY;
}

/** How much of conversation `id`'s history is here changes (`patch`: loading, loaded, complete, stale). */
export function setHistory(s, id, patch) {
  const d = new Draft(s);
  d.patchHist(id, patch);
  releaseSealed(d, id);
  return d.done();
}

/** What a conversation is called: the peer, the group's title, or its other members. */
export function title(s, conv) {
  if (isDm(conv.id)) return dmPeer(conv.id, s.me);
  if (conv.title) return conv.title;
  const others = (conv.members || []).filter((m) => m !== s.me);
  return others.length ? others.join(', ') : 'Group';
}

/** The members other than us. */
export function others(s, conv) {
  if (isDm(conv.id)) return [dmPeer(conv.id, s.me)];
  return (conv.members || []).filter((m) => m !== s.me);
}

/** The other member of a one-to-one chat; null for a group. */
export function dmPeerOf(s, id) {
  return isDm(id) ? dmPeer(id, s.me) : null;
}

/** The conversations, most recent activity first. */
export function sortedConvs(s) {
  return [...s.convs.values()].sort((a, b) => activity(s, b) - activity(s, a));
}

/** When a conversation last saw something happen. */
export function activity(s, conv) {
  const last = lastMessage(s, conv.id);
  return Math.max(conv.last_ts || 0, last ? last.ts : 0, conv.created || 0);
}

/** The unread messages of every conversation (the tab's title). */
export function unreadTotal(s) {
  return [...s.convs.values()].reduce((n, c) => n + (c.unread || 0), 0);
}

/**
 * Merge the conversation list (`GET /api/conversations`, asked for at
 * `started`) into the state: counts, titles, members, each last message.
 */
export function mergeConversations(s, list, started) {
  const d = new Draft(s);
  for (const c of list) {
    const held = d.s.convs.get(c.id) || { created: 0 };
    if (held.provisional) d.patchHist(c.id, { stale: true }); // it has a history now
    const lastSeq = c.last_seq || 0;
    // Messages that arrived live after the server counted: add them.
    let newer = 0;
    for (const m of convMsgs(d.s, c.id).values()) {
      if (m.seq > lastSeq && !m.deleted && m.from !== s.me && !m.seenBy.has(s.me)) newer += 1;
    }
    let conv = {
      ...held,
      id: c.id,
      kind: c.kind || (isDm(c.id) ? 'dm' : 'group'),
      last_seq: Math.max(lastSeq, held.last_seq || 0),
      last_ts: Math.max(c.last_ts || 0, held.last_ts || 0),
      unread: (c.unread || 0) + newer,
      provisional: false,
      // The switch is one way: a copy of the list older than it says nothing.
      e2e: Boolean(c.e2e || held.e2e),
    };
    // A `members` event applied since the list was asked for is newer.
    if (!(held.membersAt >= started)) {
      conv = { ...conv, title: c.title ?? null, members: c.members || [], admins: c.admins || [], left: false };
    }
    d.putConv(conv);
    if (c.last_message) ingest(d, { ...c.last_message, conversation: c.id }, started);
  }
  // Who is online: ask for the peers of the most recent one-to-one chats
  // once; `presence` frames keep it current after that.
  const peers = list
    .filter((c) => isDm(c.id))
    .map((c) => dmPeer(c.id, s.me))
    .filter((u) => !s.presence.has(u))
    .slice(0, 30);
  for (const user of peers) d.fx.push({ type: 'loadPresence', user });
  return d.done();
}

// --- messages --------------------------------------------------------------------

function blankMessage(d) {
  d.set('order', d.s.order + 1);
  return {
    replyTo: null,
    editedTs: null,
    deleted: false,
    reactions: new Map(),
    touched: 0,
    deliveredTo: new Set(),
    seenBy: new Set(),
    error: null,
    order: d.s.order,
  };
}

/** A message of ours, not yet stored (sent now, or restored from the outbox): pending. Answers `msg`. */
export function localMessage(s, { cid, conversation, body, ts, afterSeq, replyTo, sealed = false }) {
  const d = new Draft(s);
  const msg = {
    ...blankMessage(d),
    afterSeq,
    key: `c:${cid}`,
    id: null,
    cid,
    conversation,
    seq: null,
    from: s.me,
    body,
    ts,
    replyTo: replyTo || null,
    state: 'pending',
    // End-to-end: the text is ours (typed here), sealed when it goes out.
    sealed,
    e2eState: sealed ? 'ok' : null,
  };
  d.putMsg(msg);
  d.own('byCid').set(cid, msg);
  return d.done({ msg });
}

/**
 * Step: take a server message (history, live frame, list summary); merges
 * by id. History names our own messages' `cid`: a pending copy with that cid
 * is the same message, settled here (no `sent` needed any more). `asOf` is
 * when the snapshot was asked for: state that events changed since then is
 * newer than the snapshot and kept. Returns {msg, fresh}.
 */
export function ingest(d, m, asOf) {
  const me = d.s.me;
  let msg = d.s.byId.get(m.id);
  if (m.cid && m.from === me) {
    const pending = d.s.byCid.get(m.cid);
    if (pending && pending.key !== msg?.key && !pending.id) {
      settle(d, pending, m);
      msg = d.s.byId.get(m.id);
    }
  }
  const fresh = !msg;
  const next = fresh
    ? {
        ...blankMessage(d),
        key: `m:${m.id}`,
        id: m.id,
        cid: m.cid || null,
        conversation: m.conversation,
        seq: m.seq,
        from: m.from,
        body: m.e2e ? null : m.body,
        ts: m.ts,
        replyTo: m.reply_to || null,
        editedTs: m.edited_ts || null,
        state: 'stored',
        ...(m.e2e ? { sealed: true, e2eState: 'pending' } : {}), // read by an effect, below
      }
    : { ...msg };
  let changed = fresh;
  const change = (patch) => {
    Object.assign(next, patch);
    changed = true;
  };
  if (m.cid && !next.cid) change({ cid: m.cid });
  if (m.reply_to && !next.replyTo) change({ replyTo: m.reply_to });
  // The first end-to-end message is the switch.
  if (m.e2e && d.s.convs.has(m.conversation) && !d.s.convs.get(m.conversation).e2e) {
    d.patchConv(m.conversation, { e2e: true });
  }
  if (m.deleted) {
    if (applyDelete(next)) changed = true;
  } else if (!next.deleted && (fresh || next.touched < asOf)) {
    // The snapshot is newer than whatever events told us: it wins.
    const editedTs = m.edited_ts || null;
    if (m.body !== undefined && (m.edited_ts || 0) >= (next.editedTs || 0)) {
      if (next.body !== m.body || next.editedTs !== editedTs) change({ body: m.body, editedTs });
    } else if (m.e2e && (m.edited_ts || 0) >= (next.editedTs || 0)) {
      // An edited message carries its latest edit: {t: "edit", id}.
      if (next.editedTs !== editedTs) change({ editedTs });
      // A version not read yet: later messages of its device wait for it (releaseSealed).
      if (!next.e2eInput || sealedKey(next.e2eInput.e2e) !== sealedKey(m.e2e)) {
        if (next.e2eRead !== null) change({ e2eRead: null, e2eWaiting: false, e2eDevice: deviceOf(m.e2e) });
      }
      const editOf = m.edited_ts ? m.id : null;
      d.fx.push({ type: 'readSealed', id: m.id, e2e: m.e2e, editOf, ts: m.edited_ts || m.ts });
    }
    if (Array.isArray(m.reactions)) {
      change({ reactions: reactionsFromHistory(m.reactions, me, dmPeerOf(d.s, m.conversation)) });
    }
  }
  const seenBy = m.seen_by || [];
  const delivered = [...(m.delivered_to || []), ...seenBy].filter((u) => !next.deliveredTo.has(u));
  const seen = seenBy.filter((u) => !next.seenBy.has(u));
  if (delivered.length) change({ deliveredTo: new Set([...next.deliveredTo, ...delivered]) });
  if (seen.length) change({ seenBy: new Set([...next.seenBy, ...seen]) });
  if (!changed) return { msg, fresh };
  return { msg: d.putMsg(next), fresh };
}

/**
 * Step: our message `msg` (pending or failed) is stored as `f` {id,
 * conversation, seq, ts}: from its `sent`, or from history naming its cid.
 */
export function settle(d, msg, f) {
  d.fx.push({ type: 'unqueue', cid: msg.cid });
  const existing = d.s.byId.get(f.id);
  if (existing && existing.key !== msg.key) {
    // It already reached us another way (history): one copy only.
    d.dropMsg(msg);
    d.own('byCid').set(msg.cid, existing);
    d.putMsg({ ...existing, cid: msg.cid });
    d.fx.push(RENDER);
    return;
  }
  if (msg.conversation !== f.conversation) d.dropMsg(msg);
  const conv = ensureConv(d, f.conversation);
  const patch = { last_seq: Math.max(conv.last_seq || 0, f.seq), last_ts: Math.max(conv.last_ts || 0, f.ts) };
  if (conv.provisional) {
    patch.provisional = false;
    d.fx.push(REFRESH, { type: 'loadPresence', user: dmPeer(conv.id, d.s.me) });
  }
  if (msg.sealed) patch.e2e = true; // our first end-to-end message was the switch
  d.putMsg({ ...msg, conversation: f.conversation, id: f.id, seq: f.seq, ts: f.ts, state: 'stored', error: null });
  d.patchConv(conv.id, patch);
  d.fx.push(RENDER);
}

/**
 * A page of history (`GET …/messages?limit=…`, asked for at `asOf`): the
 * newest `pageSize` messages. After a reconnect (`refresh`), if messages were
 * missed between what we hold and this page (acked by another device
 * meanwhile), the older part is dropped so the view has no hole; scrolling
 * up loads it again.
 */
export function mergeLatest(s, id, page, { refresh = false, asOf, pageSize }) {
  const d = new Draft(s);
  if (refresh && page.length) {
    const held = convMsgs(s, id);
    let maxHeld = 0;
    for (const m of held.values()) if (m.seq != null) maxHeld = Math.max(maxHeld, m.seq);
    if (page[0].seq > maxHeld + 1) {
      for (const [key, m] of held) {
        if (m.seq != null && m.seq < page[0].seq) {
          d.ownIn('msgs', id).delete(key);
          d.own('byId').delete(m.id);
        }
      }
      d.patchHist(id, { oldest: page[0].seq, complete: page[0].seq === 1 });
    }
  }
  for (const m of page) ingest(d, { ...m, conversation: m.conversation || id }, asOf);
  const patch = { loaded: true };
  if (!histState(d.s, id).loaded) {
    patch.oldest = page.length ? page[0].seq : null;
    patch.complete = page.length < pageSize || (page.length > 0 && page[0].seq === 1);
  }
  d.patchHist(id, patch);
  releaseSealed(d, id);
  return d.done();
}

/** An older page of history (`before=<oldest seq>`). */
export function mergeOlder(s, id, page, { asOf, pageSize }) {
  const d = new Draft(s);
  for (const m of page) ingest(d, { ...m, conversation: m.conversation || id }, asOf);
  const patch = { complete: page.length < pageSize || page[0].seq === 1 };
  if (page.length) patch.oldest = page[0].seq;
  d.patchHist(id, patch);
  releaseSealed(d, id);
  return d.done();
}

/**
 * Our own stored messages that are probably the server's copy of a message
 * still pending here (its `sent` has not arrived: lost with a dropped
 * socket, or history/the list was quicker). Same body, stored after the
 * pending one was typed, never confirmed by a `sent`: shown once, as the
 * pending one, until `sent` settles it (same id: merged; other id: both).
 */
export function shadowed(s, id) {
  const all = [...convMsgs(s, id).values()];
  const pending = all.filter((m) => m.state === 'pending').sort(bySeq);
  const hidden = new Set();
  if (!pending.length) return hidden;
  const stored = all.filter((m) => m.from === s.me && m.id && !m.cid).sort(bySeq);
  for (const p of pending) {
    const twin = stored.find((m) => !hidden.has(m.key) && m.body === p.body && m.seq > (p.afterSeq || 0));
    if (twin) hidden.add(twin.key);
  }
  return hidden;
}

/** The messages of a conversation as shown: once each, in seq order. */
export function sortedMessages(s, id) {
  const hidden = shadowed(s, id);
  return [...convMsgs(s, id).values()].filter((m) => !hidden.has(m.key)).sort(bySeq);
}

/** The last message shown of a conversation (the list's preview). */
export function lastMessage(s, id) {
  const hidden = shadowed(s, id);
  let last = null;
  for (const m of convMsgs(s, id).values()) {
    if (!hidden.has(m.key) && (!last || bySeq(last, m) < 0)) last = m;
  }
  return last;
}

/** The highest seq known in a conversation (a message typed now comes after it). */
export function maxSeq(s, id) {
  let max = s.convs.get(id)?.last_seq || 0;
  for (const m of convMsgs(s, id).values()) if (m.seq != null && m.seq > max) max = m.seq;
  return max;
}

/** The first message of the list we have not seen (where "Unread messages" goes). */
export function firstUnread(s, list) {
  return list.find((m) => m.id && !m.deleted && m.from !== s.me && !m.seenBy.has(s.me)) || null;
}

/** The messages and the lines about group changes, in order (a line before the first message after it). */
export function timeline(s, id, list) {
  const notes = [...(s.notes.get(id) || [])].sort((a, b) => a.ts - b.ts);
  if (!notes.length) return list;
  const out = [];
  let n = 0;
  for (const msg of list) {
    while (n < notes.length && msg.ts > notes[n].ts) out.push(notes[n++]);
    out.push(msg);
  }
  return out.concat(notes.slice(n));
}

/**
 * We saw an incoming message (it was on screen): news when it had not been
 * seen, reported with `seen` (effect). End-to-end, seen means its text was shown.
 */
export function markSeen(s, msg) {
  const d = new Draft(s);
  const cur = msg && msg.id ? s.byId.get(msg.id) : null;
  if (!cur || cur.deleted || cur.from === s.me || cur.seenBy.has(s.me)) return d.done();
  if (cur.sealed && cur.e2eState !== 'ok') return d.done();
  d.putMsg({ ...cur, seenBy: withItem(cur.seenBy, s.me), deliveredTo: withItem(cur.deliveredTo, s.me) });
  const conv = s.convs.get(cur.conversation);
  if (conv) d.patchConv(conv.id, { unread: Math.max(0, (conv.unread || 0) - 1) });
  d.fx.push({ type: 'seen', id: cur.id }, RENDER);
  return d.done();
}

// --- ticks -----------------------------------------------------------------------

/**
 * Who a message of ours was for: the other members, less those seen
 * joining after it (they cannot read it).
 */
export function recipients(s, msg) {
  const conv = s.convs.get(msg.conversation);
  if (!conv) return [];
  const joined = conv.joined || {};
  return others(s, conv).filter((u) => !(joined[u] > msg.ts));
}

/** pending | failed | sent | delivered | seen — for our own messages. */
export function status(s, msg) {
  if (msg.state === 'pending' || msg.state === 'failed') return msg.state;
  const to = recipients(s, msg);
  if (!to.length) return 'sent';
  if (to.every((u) => msg.seenBy.has(u))) return 'seen';
  if (to.every((u) => msg.deliveredTo.has(u) || msg.seenBy.has(u))) return 'delivered';
  return 'sent';
}

/** The tick's tooltip: in a group, who has seen it and who only received it. */
export function statusDetail(s, msg) {
  const st = status(s, msg);
  if (st === 'failed') return `Not sent: ${msg.error ? msg.error.message : ''}`;
  const conv = s.convs.get(msg.conversation);
  if (!conv || isDm(conv.id) || st === 'pending') return TICK_LABELS[st];
  const seen = [...msg.seenBy].filter((u) => u !== s.me);
  const delivered = [...msg.deliveredTo].filter((u) => u !== s.me && !msg.seenBy.has(u));
  const parts = [TICK_LABELS[st]];
  if (seen.length) parts.push(`seen by ${seen.join(', ')}`);
  if (delivered.length) parts.push(`delivered to ${delivered.join(', ')}`);
  return parts.join(' · ');
}

/** An `error` naming our message `cid`: it shows "Not sent" with why. */
export function markFailed(s, cid, code, message) {
  const d = new Draft(s);
  const msg = s.byCid.get(cid);
  if (!msg || msg.state === 'stored') return d.done();
  d.putMsg({ ...msg, state: 'failed', error: { code, message: errorText(code, message) } });
  d.fx.push(RENDER);
  return d.done();
}

/**
 * Retry a failed message (same cid): pending again. A reply to a message
 * deleted meanwhile goes as a plain message; `sealed` when the chat is
 * end-to-end now. Answers `msg`, the message retried (null if it had not failed).
 */
export function retryMessage(s, msg, sealed) {
  const d = new Draft(s);
  const cur = s.byCid.get(msg.cid);
  if (!cur || cur.state !== 'failed') return d.done({ msg: null });
  const next = { ...cur, state: 'pending', error: null };
  const original = next.replyTo && s.byId.get(next.replyTo);
  if (original && original.deleted) next.replyTo = null;
  if (sealed) Object.assign(next, { sealed: true, e2eState: 'ok' });
  d.putMsg(next);
  d.fx.push(RENDER);
  return d.done({ msg: next });
}

/** Drop a failed message (Discard); nothing else. */
export function discardMessage(s, msg) {
  const d = new Draft(s);
  const cur = s.byCid.get(msg.cid);
  if (!cur || cur.state !== 'failed') return d.done();
  d.dropMsg(cur);
  d.own('byCid').delete(cur.cid);
  d.fx.push(RENDER);
  return d.done();
}

/**
 * What a person may do with a message here: reply, react, edit, delete
 * (their own; a group's admins others' too). Nothing once no longer a member.
 */
export function actionsFor(s, msg, conv, now) {
  if (!msg.id || msg.deleted || !conv || conv.provisional || conv.left) return [];
  const acts = ['reply', 'react'];
  if (msg.from === s.me) {
    // The server's edit window is 48 h by default; it has the last word.
    if (msg.body != null && now - msg.ts < EDIT_WINDOW_MS) acts.push('edit');
    acts.push('delete');
  } else if (canManage(conv, s.me)) acts.push('delete');
  return acts;
}

// --- end-to-end ----------------------------------------------------------------------

/** Conversation `id` is end-to-end (the server refused a plain message in it). */
export function markE2E(s, id) {
  const d = new Draft(s);
  const conv = s.convs.get(id);
  if (conv && !conv.e2e) d.patchConv(id, { e2e: true });
  return d.done();
}

/** Our message `cid` goes end-to-end after all (it was refused as a plain one). */
export function markSealed(s, cid) {
  const d = new Draft(s);
  const msg = s.byCid.get(cid);
  if (msg) d.putMsg({ ...msg, sealed: true, e2eState: 'ok' });
  return d.done();
}

/**
 * Message `id`'s end-to-end content `input` is being read (protocol.js
 * `readSealed`; `e2eInput` says which version): it is sealed, and without
 * a text it shows "decrypting" until read and judged (releaseSealed).
 */
export function readingSealed(s, id, input) {
  const d = new Draft(s);
  const msg = s.byId.get(id);
  if (msg) {
    d.putMsg({
      ...msg,
      sealed: true,
      e2eInput: input,
      e2eRead: null,
      e2eWaiting: false,
      e2eDevice: deviceOf(input.e2e),
      e2eState: msg.body == null ? 'pending' : msg.e2eState,
    });
  }
  return d.done();
}

/**
 * What reading message `id` gave: its text {body, e2eState: 'ok'}, or why
 * there is none {body: null, e2eState: 'failed', e2eError, e2eReason}. Why
 * there is none shows at once; the text once the replay guard can judge it
 * (releaseSealed).
 */
export function sealedOpened(s, id, shown) {
  const d = new Draft(s);
  const msg = s.byId.get(id);
  if (msg) {
    d.putMsg({ ...msg, e2eRead: shown, e2eWaiting: true });
    releaseSealed(d, msg.conversation);
    d.fx.push(RENDER);
  }
  return d.done();
}

// --- replays: a text is shown once the guard can judge it ------------------------------
//
// The page reads a conversation out of order (the list's last message first,
// then history pages newest first), and the replay guard (e2e-read.js
// OrderedReplayGuard) calls the message sent first (lowest seq) with a
// (device, epoch, iv) the original, whatever order they are read in. A later
// copy read before its original would be taken back once the original is
// read: after its text was shown, and maybe after its `seen` went out. So a
// sealed message's text waits (the verdict in `e2eRead`, `e2eWaiting`) until
//
//   - the history before it is here: its history is loaded down to it (or
//     none can come: we are no longer a member); and
//   - every earlier message of its conversation from the same device that is
//     held here has been read (none is due: `e2eRead === null`);
//
// and only then becomes its `body` (e2eState 'ok'): shown, and seen
// (markSeen). Why a message cannot be shown needs no judging: it shows at
// once. A copy whose original is on a page not loaded yet cannot be judged
// by anyone here; loading that page takes it back (docs/e2e.md "Replays").

/** The fields of an `e2e` object a read is cached by (e2e-read.js cacheKey: same text, same read). */
function sealedKey(e2e) {
  const e = e2e || {};
  return `${e.device} ${e.epoch} ${e.iv} ${e.sig}`;
}

/** The sending device an `e2e` object names (only compared, never trusted). */
function deviceOf(e2e) {
  return String((e2e && e2e.device) || '');
}

/** Is the history before `msg` here? Or will none come (we left: it is judged against what is held)? */
function pastHeld(s, msg) {
  if (s.convs.get(msg.conversation)?.left) return true;
  const h = histState(s, msg.conversation);
  return h.loaded && (h.complete || msg.seq == null || (h.oldest != null && msg.seq >= h.oldest));
}

/** Is an earlier message of `msg`'s conversation from its device held here and not read yet? */
function earlierDue(s, msg) {
  for (const m of convMsgs(s, msg.conversation).values()) {
    if (m.e2eRead === null && !m.deleted && m.e2eDevice === msg.e2eDevice && bySeq(m, msg) < 0) return true;
  }
  return false;
}

/**
 * Step: the sealed messages of conversation `id` whose verdict waits show it
 * now if they can: a reason at once, a text once judged (above).
 */
export function releaseSealed(d, id) {
  const held = [...convMsgs(d.s, id).values()];
  if (!held.some((m) => m.e2eWaiting)) return;
  const due = new Set(); // devices with an earlier message not read yet
  for (const m of held.sort(bySeq)) {
    if (m.e2eWaiting && !m.deleted) {
      const judged = !due.has(m.e2eDevice) && pastHeld(d.s, m);
      if (m.e2eRead.body == null || judged) d.putMsg({ ...m, ...m.e2eRead, e2eWaiting: false });
    }
    if (m.e2eRead === null && !m.deleted) due.add(m.e2eDevice);
  }
}

/**
 * The text the list's preview shows for `msg` (a conversation's last
 * message), or null. A text read but not judged yet (its chat's history is
 * not loaded) when its history is not on its way either and no earlier
 * message of its device held here is still being read: judged against what
 * the page holds, which is all the list can do. Else its `body`.
 */
export function previewText(s, msg) {
  if (!msg) return null;
  if (msg.e2eWaiting && msg.e2eRead.body != null && !msg.deleted) {
    const h = histState(s, msg.conversation);
    if (!(h.loading && !h.loaded) && !earlierDue(s, msg)) return msg.e2eRead.body;
  }
  return msg.body;
}
