// The chat's state and its updates: conversations, messages (merged by id,
// ordered by seq), ticks, unread counts, the list and history merged in.
// What each live frame and event does is in frames.js. No DOM, no network,
// no timers, no clock (the time comes in as `now`), so it runs under Node
// (`node --test web/test/`).
//
// Like the updates of events.js, a function here changes the state it is
// given in place and returns what should happen next as a list of effects
// (or pushes them onto the `fx` list it is given); the page carries them out
// (`run` in protocol.js):
//
//   {type: 'render'}                          redraw (once per frame)
//   {type: 'refreshConversations'}            ask for the conversation list again, soon
//   {type: 'loadPresence', user}              ask whether `user` is online
//   {type: 'ack', queue, id}                  ack `id`: queue is 'ids' | 'receipts' | 'events'
//   {type: 'unqueue', cid}                    the message `cid` leaves the outbox (stored)
//   {type: 'readSealed', msg, e2e, editOf, ts} decrypt an end-to-end body (or edit) into `msg`
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

// --- conversations ---------------------------------------------------------------

/** The conversation `id`, made up (and the list asked for, effect) when unknown. */
export function ensureConv(s, id, fx) {
  let conv = s.convs.get(id);
  if (!conv) {
    const dm = isDm(id);
    conv = {
      id,
      kind: dm ? 'dm' : 'group',
      title: null,
      members: dm ? id.split(':').slice(1) : [],
      last_seq: 0,
      last_ts: 0,
      unread: 0,
      provisional: false,
    };
    s.convs.set(id, conv);
    fx.push(REFRESH); // learn its title and members
  }
  return conv;
}

/** A one-to-one chat with `peer` that the server does not have yet (the first message makes it). */
export function provisionalDm(s, peer, now) {
  const id = dmId(s.me, peer);
  if (!s.convs.has(id)) {
    s.convs.set(id, {
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
  return id;
}

/** A group we just made (the answer of `POST /api/conversations`): in the list, its history empty. */
export function addGroup(s, made, now) {
  s.convs.set(made.id, {
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
  const st = histState(s, made.id);
  st.loaded = st.complete = true;
}

/** The messages of conversation `id` (Map key -> msg). */
export function convMsgs(s, id) {
  let map = s.msgs.get(id);
  if (!map) {
    map = new Map();
    s.msgs.set(id, map);
  }
  return map;
}

/** How much of conversation `id`'s history is here. */
export function histState(s, id) {
  let st = s.hist.get(id);
  if (!st) {
    st = { loaded: false, loading: false, complete: false, oldest: null, stale: false };
    s.hist.set(id, st);
  }
  return st;
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
  const fx = [];
  for (const c of list) {
    const conv = s.convs.get(c.id) || { created: 0 };
    if (conv.provisional) histState(s, c.id).stale = true; // it has a history now
    const lastSeq = c.last_seq || 0;
    // Messages that arrived live after the server counted: add them.
    let newer = 0;
    for (const m of convMsgs(s, c.id).values()) {
      if (m.seq > lastSeq && !m.deleted && m.from !== s.me && !m.seenBy.has(s.me)) newer += 1;
    }
    Object.assign(conv, {
      id: c.id,
      kind: c.kind || (isDm(c.id) ? 'dm' : 'group'),
      last_seq: Math.max(lastSeq, conv.last_seq || 0),
      last_ts: Math.max(c.last_ts || 0, conv.last_ts || 0),
      unread: (c.unread || 0) + newer,
      provisional: false,
      // The switch is one way: a copy of the list older than it says nothing.
      e2e: Boolean(c.e2e || conv.e2e),
    });
    // A `members` event applied since the list was asked for is newer.
    if (!(conv.membersAt >= started)) {
      Object.assign(conv, { title: c.title ?? null, members: c.members || [], admins: c.admins || [], left: false });
    }
    s.convs.set(c.id, conv);
    if (c.last_message) ingest(s, { ...c.last_message, conversation: c.id }, started, fx);
  }
  // Who is online: ask for the peers of the most recent one-to-one chats
  // once; `presence` frames keep it current after that.
  const peers = list
    .filter((c) => isDm(c.id))
    .map((c) => dmPeer(c.id, s.me))
    .filter((u) => !s.presence.has(u))
    .slice(0, 30);
  for (const user of peers) fx.push({ type: 'loadPresence', user });
  return fx;
}

// --- messages --------------------------------------------------------------------

function blankMessage(s) {
  return {
    replyTo: null,
    editedTs: null,
    deleted: false,
    reactions: new Map(),
    touched: 0,
    deliveredTo: new Set(),
    seenBy: new Set(),
    error: null,
    order: ++s.order,
  };
}

/** A message of ours, not yet stored (sent now, or restored from the outbox): pending. */
export function localMessage(s, { cid, conversation, body, ts, afterSeq, replyTo, sealed = false }) {
  const msg = Object.assign(blankMessage(s), {
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
  });
  convMsgs(s, conversation).set(msg.key, msg);
  s.byCid.set(cid, msg);
  return msg;
}

/**
 * Take a server message (history, live frame, list summary); merges by id.
 * History names our own messages' `cid`: a pending copy with that cid is
 * the same message, settled here (no `sent` needed any more). `asOf` is
 * when the snapshot was asked for: state that events changed since then is
 * newer than the snapshot and kept. Returns {msg, fresh}; effects go to `fx`.
 */
export function ingest(s, m, asOf, fx) {
  let msg = s.byId.get(m.id);
  if (m.cid && m.from === s.me) {
    const pending = s.byCid.get(m.cid);
    if (pending && pending !== msg && !pending.id) {
      settle(s, pending, m, fx);
      msg = s.byId.get(m.id);
    }
  }
  let fresh = false;
  if (!msg) {
    fresh = true;
    msg = Object.assign(blankMessage(s), {
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
    });
    s.byId.set(m.id, msg);
    convMsgs(s, m.conversation).set(msg.key, msg);
  }
  if (m.cid && !msg.cid) msg.cid = m.cid;
  if (m.reply_to && !msg.replyTo) msg.replyTo = m.reply_to;
  if (m.e2e) {
    const conv = s.convs.get(m.conversation);
    if (conv) conv.e2e = true; // the first end-to-end message is the switch
  }
  if (m.deleted) applyDelete(msg);
  else if (!msg.deleted && (fresh || msg.touched < asOf)) {
    // The snapshot is newer than whatever events told us: it wins.
    if (m.body !== undefined && (m.edited_ts || 0) >= (msg.editedTs || 0)) {
      msg.body = m.body;
      msg.editedTs = m.edited_ts || null;
    } else if (m.e2e && (m.edited_ts || 0) >= (msg.editedTs || 0)) {
      // An edited message carries its latest edit: {t: "edit", id}.
      msg.editedTs = m.edited_ts || null;
      fx.push({ type: 'readSealed', msg, e2e: m.e2e, editOf: m.edited_ts ? m.id : null, ts: m.edited_ts || m.ts });
    }
    if (Array.isArray(m.reactions)) {
      msg.reactions = reactionsFromHistory(m.reactions, s.me, dmPeerOf(s, m.conversation));
    }
  }
  for (const u of m.delivered_to || []) msg.deliveredTo.add(u);
  for (const u of m.seen_by || []) {
    msg.seenBy.add(u);
    msg.deliveredTo.add(u);
  }
  return { msg, fresh };
}

/**
 * Our message `msg` (pending or failed) is stored as `f` {id, conversation,
 * seq, ts}: from its `sent`, or from history naming its cid.
 */
export function settle(s, msg, f, fx) {
  fx.push({ type: 'unqueue', cid: msg.cid });
  const existing = s.byId.get(f.id);
  if (existing && existing !== msg) {
    // It already reached us another way (history): one copy only.
    convMsgs(s, msg.conversation).delete(msg.key);
    existing.cid = msg.cid;
    s.byCid.set(msg.cid, existing);
    fx.push(RENDER);
    return;
  }
  if (msg.conversation !== f.conversation) {
    convMsgs(s, msg.conversation).delete(msg.key);
    msg.conversation = f.conversation;
    convMsgs(s, f.conversation).set(msg.key, msg);
  }
  const conv = ensureConv(s, f.conversation, fx);
  if (conv.provisional) {
    conv.provisional = false;
    fx.push(REFRESH, { type: 'loadPresence', user: dmPeer(conv.id, s.me) });
  }
  Object.assign(msg, { id: f.id, seq: f.seq, ts: f.ts, state: 'stored', error: null });
  if (msg.sealed) conv.e2e = true; // our first end-to-end message was the switch
  s.byId.set(f.id, msg);
  conv.last_seq = Math.max(conv.last_seq || 0, f.seq);
  conv.last_ts = Math.max(conv.last_ts || 0, f.ts);
  fx.push(RENDER);
}

/**
 * A page of history (`GET …/messages?limit=…`, asked for at `asOf`): the
 * newest `pageSize` messages. After a reconnect (`refresh`), if messages were
 * missed between what we hold and this page (acked by another device
 * meanwhile), the older part is dropped so the view has no hole; scrolling
 * up loads it again.
 */
export function mergeLatest(s, id, page, { refresh = false, asOf, pageSize }) {
  const fx = [];
  const st = histState(s, id);
  const held = convMsgs(s, id);
  if (refresh && page.length) {
    let maxHeld = 0;
    for (const m of held.values()) if (m.seq != null) maxHeld = Math.max(maxHeld, m.seq);
    if (page[0].seq > maxHeld + 1) {
      for (const [key, m] of held) {
        if (m.seq != null && m.seq < page[0].seq) {
          held.delete(key);
          s.byId.delete(m.id);
        }
      }
      st.oldest = page[0].seq;
      st.complete = page[0].seq === 1;
    }
  }
  for (const m of page) ingest(s, { ...m, conversation: m.conversation || id }, asOf, fx);
  if (!st.loaded) {
    st.oldest = page.length ? page[0].seq : null;
    st.complete = page.length < pageSize || (page.length > 0 && page[0].seq === 1);
  }
  st.loaded = true;
  return fx;
}

/** An older page of history (`before=<oldest seq>`). */
export function mergeOlder(s, id, page, { asOf, pageSize }) {
  const fx = [];
  const st = histState(s, id);
  for (const m of page) ingest(s, { ...m, conversation: m.conversation || id }, asOf, fx);
  if (page.length) st.oldest = page[0].seq;
  st.complete = page.length < pageSize || page[0].seq === 1;
  return fx;
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
 * We saw an incoming message (it was on screen): true if that is news, to
 * be reported with `seen`. End-to-end, seen means its text was shown.
 */
export function markSeen(s, msg) {
  if (!msg || !msg.id || msg.deleted || msg.from === s.me || msg.seenBy.has(s.me)) return false;
  if (msg.sealed && msg.e2eState !== 'ok') return false;
  msg.seenBy.add(s.me);
  msg.deliveredTo.add(s.me);
  const conv = s.convs.get(msg.conversation);
  if (conv) conv.unread = Math.max(0, (conv.unread || 0) - 1);
  return true;
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

/** An `error` naming our message `cid`: it shows "Not sent" with why. True if it changed. */
export function markFailed(s, cid, code, message) {
  const msg = s.byCid.get(cid);
  if (!msg || msg.state === 'stored') return false;
  msg.state = 'failed';
  msg.error = { code, message: errorText(code, message) };
  return true;
}

/**
 * Retry a failed message (same cid): pending again. A reply to a message
 * deleted meanwhile goes as a plain message; `sealed` when the chat is
 * end-to-end now. False if it had not failed.
 */
export function retryMessage(s, msg, sealed) {
  if (msg.state !== 'failed') return false;
  msg.state = 'pending';
  msg.error = null;
  const original = msg.replyTo && s.byId.get(msg.replyTo);
  if (original && original.deleted) msg.replyTo = null;
  if (sealed) Object.assign(msg, { sealed: true, e2eState: 'ok' });
  return true;
}

/** Drop a failed message (Discard). False if it had not failed. */
export function discardMessage(s, msg) {
  if (msg.state !== 'failed') return false;
  convMsgs(s, msg.conversation).delete(msg.key);
  s.byCid.delete(msg.cid);
  return true;
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
