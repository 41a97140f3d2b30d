// What each live frame and event does to the state (state.js): `sent`,
// `message`, `receipt`, `typing`, `presence`, and the `reaction`, `edited`,
// `deleted` and `members` events (also our own requests once `applied`, and
// our own group changes from their HTTP answer). Pure like state.js: the
// state changes in place, the effects are returned.

import { applyDelete, applyEdit, applyMembers, applyReaction } from './events.js';
import { REFRESH, RENDER, ensureConv, histState, ingest, settle } from './state.js';

/** How long someone's `typing` shows. */
export const TYPING_SHOW_MS = 6000;

/** A `sent` frame: our message `cid` is stored. */
export function receiveSent(s, f) {
  const fx = [{ type: 'unqueue', cid: f.cid }];
  const msg = s.byCid.get(f.cid);
  if (!msg) fx.push(REFRESH);
  else settle(s, msg, f, fx);
  return fx;
}

/** A `message` frame (live or from the backlog; ours from another device too). */
export function receiveMessage(s, f, now) {
  const fx = [];
  const mine = f.from === s.me;
  // Owed messages are acked; our own from another device are never owed.
  if (!mine) fx.push({ type: 'ack', queue: 'ids', id: f.id });
  const conv = ensureConv(s, f.conversation, fx);
  if (conv.provisional) {
    conv.provisional = false;
    fx.push(REFRESH);
  }
  const { msg, fresh } = ingest(s, f, now, fx);
  if (!fresh) return fx; // a duplicate: already on screen
  // The list's unread count already covers messages up to its last_seq.
  const counted = f.seq <= (conv.last_seq || 0);
  conv.last_seq = Math.max(conv.last_seq || 0, f.seq);
  conv.last_ts = Math.max(conv.last_ts || 0, f.ts);
  if (!mine) {
    if (!counted && !msg.seenBy.has(s.me)) conv.unread = (conv.unread || 0) + 1;
    const typing = s.typing.get(f.conversation);
    if (typing) typing.delete(f.from);
  } else fx.push({ type: 'scrollBottom', conversation: f.conversation });
  fx.push(RENDER);
  return fx;
}

/** A `receipt` frame: `by` received (or saw) our message `id`. Ticks only go forward. */
export function receiveReceipt(s, f) {
  const fx = [{ type: 'ack', queue: 'receipts', id: f.rid }];
  const msg = s.byId.get(f.id);
  if (!msg) return fx; // not loaded here; history will carry delivered_to / seen_by
  msg.deliveredTo.add(f.by);
  if (f.status === 'seen') msg.seenBy.add(f.by);
  fx.push(RENDER);
  return fx;
}

// --- typing and presence -----------------------------------------------------------

/** A `typing` frame: `from` shows as typing for TYPING_SHOW_MS. */
export function receiveTyping(s, f, now) {
  if (f.from === s.me) return [];
  let map = s.typing.get(f.conversation);
  if (!map) {
    map = new Map();
    s.typing.set(f.conversation, map);
  }
  map.set(f.from, now + TYPING_SHOW_MS);
  return [RENDER];
}

/** Who is typing in conversation `id` now. */
export function typingNames(s, id, now) {
  const map = s.typing.get(id);
  if (!map) return [];
  return [...map].filter(([, until]) => until > now).map(([u]) => u);
}

/** Forget typing that timed out; true if any did. */
export function expireTyping(s, now) {
  let changed = false;
  for (const map of s.typing.values()) {
    for (const [u, until] of map) {
      if (until <= now) {
        map.delete(u);
        changed = true;
      }
    }
  }
  return changed;
}

/** A `presence` frame; someone going offline stops typing. */
export function receivePresence(s, f) {
  s.presence.set(f.user, { online: f.online, last_seen: f.last_seen });
  if (!f.online) for (const map of s.typing.values()) map.delete(f.user);
  return [RENDER];
}

// --- events --------------------------------------------------------------------------

/** Is this the first time event `eid` is applied? (It is, from now on.) No eid: always. */
export function firstTime(s, eid) {
  if (!eid) return true;
  if (s.eids.has(eid)) return false;
  s.eids.add(eid);
  return true;
}

/** A reaction, edited, deleted or members event: acked (copies too), applied once. */
export function receiveEvent(s, f, now) {
  const fx = [];
  if (typeof f.eid === 'string' && f.eid) {
    fx.push({ type: 'ack', queue: 'events', id: f.eid });
    if (!firstTime(s, f.eid)) return fx;
  }
  if (f.type === 'members') return fx.concat(applyMembersEvent(s, f, now));
  return fx.concat(applyEvent(s, f.type, f, now));
}

/**
 * Change a message as event `type` says. A message not held here is left
 * alone: its history, when loaded, already shows the latest state.
 */
export function applyEvent(s, type, f, now) {
  const fx = [];
  const msg = s.byId.get(f.id);
  if (!msg) return fx;
  let changed = false;
  if (type === 'reaction') {
    if (msg.deleted || typeof f.emoji !== 'string') return fx;
    const conv = s.convs.get(msg.conversation);
    const members = conv && conv.members && conv.members.length ? conv.members.length : Infinity;
    changed = applyReaction(msg.reactions, f.by, f.emoji, f.on !== false, members);
  } else if (type === 'edited' && f.e2e) {
    // End-to-end: the new text is shown once it decrypts (checked as an edit of this message).
    if (msg.deleted || (msg.editedTs && f.ts && f.ts < msg.editedTs)) return fx;
    msg.editedTs = f.ts || now;
    fx.push({ type: 'readSealed', msg, e2e: f.e2e, editOf: msg.id, ts: f.ts || msg.ts });
    changed = true;
  } else if (type === 'edited') {
    changed = applyEdit(msg, f.body, f.ts);
  } else if (type === 'deleted') {
    changed = applyDelete(msg);
    if (changed) fx.push({ type: 'forgetDeleted', msg, by: f.by });
  }
  if (!changed) return fx;
  msg.touched = now;
  fx.push(RENDER);
  return fx;
}

/**
 * A group changed: its members, admins and title are now the event's; the
 * chat gets a line saying what happened. A group we were added to joins the
 * list; one we are no longer in becomes read-only (and stays until a reload).
 */
export function applyMembersEvent(s, f, now) {
  const fx = [];
  if (typeof f.conversation !== 'string' || !Array.isArray(f.members)) return fx;
  let conv = s.convs.get(f.conversation);
  if (!conv) {
    if (!f.members.includes(s.me)) return fx; // added and removed again meanwhile
    conv = ensureConv(s, f.conversation, fx); // and the list is asked for again
    conv.created = f.ts || now;
  }
  const { changed, wasMember, member, lines } = applyMembers(conv, f, s.me);
  const notes = s.notes.get(conv.id) || [];
  const ts = f.ts || now;
  const tag = f.eid || `local${++s.noteCount}`;
  lines.forEach((text, i) => notes.push({ note: true, key: `n:${tag}:${i}`, ts, text }));
  s.notes.set(conv.id, notes);
  if (changed) {
    conv.membersAt = now;
    fx.push({ type: 'membersChanged', conversation: conv.id });
    const typing = s.typing.get(conv.id);
    for (const u of typing ? [...typing.keys()] : []) if (!conv.members.includes(u)) typing.delete(u);
    if (wasMember && !member) fx.push(...leaveConv(s, conv, lines[0]));
    else if (!wasMember && member) {
      // (Back) in: its history and the list's counts are to be fetched.
      conv.leftNote = null;
      histState(s, conv.id).stale = true;
      fx.push({ type: 'reload', conversation: conv.id }, REFRESH);
    }
  }
  fx.push(RENDER);
  return fx;
}

/** Removed, or left: the chat stays, read-only, until a reload. */
export function leaveConv(s, conv, why = 'You are no longer a member') {
  conv.left = true;
  conv.leftNote = why;
  s.typing.delete(conv.id);
  return [{ type: 'left', conversation: conv.id }, RENDER];
}
