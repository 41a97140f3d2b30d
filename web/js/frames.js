// What each live frame and event does to the state (state.js): `sent`,
// `message`, `receipt`, `typing`, `presence`, and the `reaction`, `edited`,
// `deleted` and `members` events (also our own requests once `applied`, and
// our own group changes from their HTTP answer). Pure like state.js: each
// update takes a state and returns {state, fx}, the new state and the
// effects; the state given is never changed.

import { applyDelete, applyEdit, applyMembers, applyReaction } from './events.js';
import { Draft, REFRESH, RENDER, ensureConv, ingest, releaseSealed, settle, withItem } from './state.js';

/** How long someone's `typing` shows. */
export const TYPING_SHOW_MS = 6000;

/** A `sent` frame: our message `cid` is stored. */
export function receiveSent(s, f) {
  const d = new Draft(s);
  d.fx.push({ type: 'unqueue', cid: f.cid });
  const msg = s.byCid.get(f.cid);
  if (!msg) d.fx.push(REFRESH);
  else settle(d, msg, f);
  return d.done();
}

/** A `message` frame (live or from the backlog; ours from another device too). */
export function receiveMessage(s, f, now) {
  const d = new Draft(s);
  const mine = f.from === s.me;
  // Owed messages are acked; our own from another device are never owed.
  if (!mine) d.fx.push({ type: 'ack', queue: 'ids', id: f.id });
  if (ensureConv(d, f.conversation).provisional) {
    d.patchConv(f.conversation, { provisional: false });
    d.fx.push(REFRESH);
  }
  const { msg, fresh } = ingest(d, f, now);
  if (!fresh) return d.done(); // a duplicate: already on screen
  const conv = d.s.convs.get(f.conversation);
  // The list's unread count already covers messages up to its last_seq.
  const counted = f.seq <= (conv.last_seq || 0);
  const patch = { last_seq: Math.max(conv.last_seq || 0, f.seq), last_ts: Math.max(conv.last_ts || 0, f.ts) };
  if (!mine) {
    if (!counted && !msg.seenBy.has(s.me)) patch.unread = (conv.unread || 0) + 1;
    if (d.s.typing.get(f.conversation)?.has(f.from)) d.ownIn('typing', f.conversation).delete(f.from);
  } else d.fx.push({ type: 'scrollBottom', conversation: f.conversation });
  d.patchConv(f.conversation, patch);
  d.fx.push(RENDER);
  return d.done();
}

/** A `receipt` frame: `by` received (or saw) our message `id`. Ticks only go forward. */
export function receiveReceipt(s, f) {
  const d = new Draft(s);
  d.fx.push({ type: 'ack', queue: 'receipts', id: f.rid });
  const msg = s.byId.get(f.id);
  if (!msg) return d.done(); // not loaded here; history will carry delivered_to / seen_by
  const deliveredTo = withItem(msg.deliveredTo, f.by);
  const seenBy = f.status === 'seen' ? withItem(msg.seenBy, f.by) : msg.seenBy;
  if (deliveredTo !== msg.deliveredTo || seenBy !== msg.seenBy) d.putMsg({ ...msg, deliveredTo, seenBy });
  d.fx.push(RENDER);
  return d.done();
}

// --- typing and presence -----------------------------------------------------------

/** A `typing` frame: `from` shows as typing for TYPING_SHOW_MS. */
export function receiveTyping(s, f, now) {
  const d = new Draft(s);
  if (f.from === s.me) return d.done();
  d.ownIn('typing', f.conversation).set(f.from, now + TYPING_SHOW_MS);
  d.fx.push(RENDER);
  return d.done();
}

/** Who is typing in conversation `id` now. */
export function typingNames(s, id, now) {
  const map = s.typing.get(id);
  if (!map) return [];
  return [...map].filter(([, until]) => until > now).map(([u]) => u);
}

/** Forget typing that timed out (drawn again if any did). */
export function expireTyping(s, now) {
  const d = new Draft(s);
  for (const [id, map] of s.typing) {
    for (const [u, until] of map) if (until <= now) d.ownIn('typing', id).delete(u);
  }
  if (d.s !== s) d.fx.push(RENDER);
  return d.done();
}

/** `user` is online or not ({online, last_seen}); someone going offline stops typing. */
function putPresence(d, user, presence) {
  d.own('presence').set(user, presence);
  if (presence.online) return;
  for (const [id, map] of d.s.typing) if (map.has(user)) d.ownIn('typing', id).delete(user);
}

/** A `presence` frame. */
export function receivePresence(s, f) {
  const d = new Draft(s);
  putPresence(d, f.user, { online: f.online, last_seen: f.last_seen });
  d.fx.push(RENDER);
  return d.done();
}

/** What `GET /api/users/<user>` says of `user`'s presence ({online, last_seen}); typing is left alone. */
export function setPresence(s, user, presence) {
  const d = new Draft(s);
  d.own('presence').set(user, presence);
  d.fx.push(RENDER);
  return d.done();
}

// --- events --------------------------------------------------------------------------

/** Is this the first time event `eid` is applied? (It is, from now on.) No eid: always. Answers `first`. */
export function firstTime(s, eid) {
  const d = new Draft(s);
  if (!eid) return d.done({ first: true });
  if (s.eids.has(eid)) return d.done({ first: false });
  d.own('eids').add(eid);
  return d.done({ first: true });
}

/** A reaction, edited, deleted or members event: acked (copies too), applied once. */
export function receiveEvent(s, f, now) {
  const fx = [];
  let state = s;
  if (typeof f.eid === 'string' && f.eid) {
    fx.push({ type: 'ack', queue: 'events', id: f.eid });
    const once = firstTime(s, f.eid);
    if (!once.first) return { state: s, fx };
    state = once.state;
  }
  const r = f.type === 'members' ? applyMembersEvent(state, f, now) : applyEvent(state, f.type, f, now);
  return { state: r.state, fx: fx.concat(r.fx) };
}

/** The reactions `reactions` with the entry of `emoji` copied, so that applyReaction can change them. */
function reactionsToChange(reactions, emoji) {
  const copy = new Map(reactions);
  const r = copy.get(emoji);
  if (r) copy.set(emoji, { count: r.count, users: new Set(r.users), gone: new Set(r.gone) });
  return copy;
}

/**
 * Change a message as event `type` says. A message not held here is left
 * alone: its history, when loaded, already shows the latest state.
 */
export function applyEvent(s, type, f, now) {
  const d = new Draft(s);
  const msg = s.byId.get(f.id);
  if (!msg) return d.done();
  const next = { ...msg }; // events.js changes this copy
  let changed = false;
  if (type === 'reaction') {
    if (msg.deleted || typeof f.emoji !== 'string') return d.done();
    const conv = s.convs.get(msg.conversation);
    const members = conv && conv.members && conv.members.length ? conv.members.length : Infinity;
    next.reactions = reactionsToChange(msg.reactions, f.emoji);
    changed = applyReaction(next.reactions, f.by, f.emoji, f.on !== false, members);
  } else if (type === 'edited' && f.e2e) {
    // End-to-end: the new text is shown once it decrypts (checked as an edit of this message).
    if (msg.deleted || (msg.editedTs && f.ts && f.ts < msg.editedTs)) return d.done();
    next.editedTs = f.ts || now;
    d.fx.push({ type: 'readSealed', id: msg.id, e2e: f.e2e, editOf: msg.id, ts: f.ts || msg.ts });
    changed = true;
  } else if (type === 'edited') {
    changed = applyEdit(next, f.body, f.ts);
  } else if (type === 'deleted') {
    changed = applyDelete(next);
    if (changed) d.fx.push({ type: 'forgetDeleted', msg: next, by: f.by });
  }
  if (!changed) return d.done();
  next.touched = now;
  d.putMsg(next);
  if (type === 'deleted') releaseSealed(d, msg.conversation); // it is read no more: later ones need not wait
  d.fx.push(RENDER);
  return d.done();
}

/**
 * A group changed: its members, admins and title are now the event's; the
 * chat gets a line saying what happened. A group we were added to joins the
 * list; one we are no longer in becomes read-only (and stays until a reload).
 */
export function applyMembersEvent(s, f, now) {
  const d = new Draft(s);
  if (typeof f.conversation !== 'string' || !Array.isArray(f.members)) return d.done();
  let held = s.convs.get(f.conversation);
  if (!held) {
    if (!f.members.includes(s.me)) return d.done(); // added and removed again meanwhile
    ensureConv(d, f.conversation); // and the list is asked for again
    held = d.patchConv(f.conversation, { created: f.ts || now });
  }
  const conv = { ...held }; // events.js changes this copy
  const { changed, wasMember, member, lines } = applyMembers(conv, f, s.me);
  const ts = f.ts || now;
  let tag = f.eid;
  if (!tag) {
    d.set('noteCount', d.s.noteCount + 1);
    tag = `local${d.s.noteCount}`;
  }
  const notes = lines.map((text, i) => ({ note: true, key: `n:${tag}:${i}`, ts, text }));
  d.own('notes').set(conv.id, [...(d.s.notes.get(conv.id) || []), ...notes]);
  if (changed) {
    conv.membersAt = now;
    d.putConv(conv);
    d.fx.push({ type: 'membersChanged', conversation: conv.id });
    const typing = d.s.typing.get(conv.id);
    const gone = typing ? [...typing.keys()].filter((u) => !conv.members.includes(u)) : [];
    if (gone.length) {
      const map = d.ownIn('typing', conv.id);
      for (const u of gone) map.delete(u);
    }
    if (wasMember && !member) leave(d, conv.id, lines[0]);
    else if (!wasMember && member) {
      // (Back) in: its history and the list's counts are to be fetched.
      d.patchConv(conv.id, { leftNote: null });
      d.patchHist(conv.id, { stale: true });
      d.fx.push({ type: 'reload', conversation: conv.id }, REFRESH);
    }
  }
  d.fx.push(RENDER);
  return d.done();
}

/** Step: we are no longer a member of conversation `id`. */
function leave(d, id, why = 'You are no longer a member') {
  if (!d.s.convs.has(id)) return;
  d.patchConv(id, { left: true, leftNote: why });
  releaseSealed(d, id); // no more history comes: what is held is all there is to judge against
  if (d.s.typing.has(id)) d.own('typing').delete(id);
  d.fx.push({ type: 'left', conversation: id }, RENDER);
}

/** Removed, or left: the chat (conversation `id`) stays, read-only, until a reload. */
export function leaveConv(s, id, why) {
  const d = new Draft(s);
  leave(d, id, why);
  return d.done();
}
