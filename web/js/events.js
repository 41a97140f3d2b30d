// Replies, reactions, edits and deletions: the pure state updates (no DOM,
// no network), used by app.js and tested in the browser on their own.
//
// Reactions of one message are a Map(emoji -> {count, users, gone}):
//   count  how many members reacted with it (what the server says);
//   users  members known to have reacted (from events, and "mine" from history);
//   gone   members known NOT to have reacted (from events).
// History only gives {emoji, count, mine}: in a one-to-one chat that is the
// whole truth (the other reactor can only be the peer), in a group some of
// `count` may be anonymous. Events then say who did what, and are applied as
// set operations, so the same event (or a repeat of the same reaction) never
// counts twice.

/** The reaction palette of the message menu. */
export const PALETTE = ['👍', '❤️', '😂', '😮', '😢', '🎉'];

/** How long after sending a message its sender may edit it (the server's default). */
export const EDIT_WINDOW_MS = 48 * 3600 * 1000;

const QUOTE_MAX = 140;

/** The first non-empty line of a body, shortened for a quote. */
export function firstLine(body) {
  if (body == null) return '';
  const line = body.split('\n').find((l) => l.trim()) || '';
  const trimmed = line.trim();
  return trimmed.length > QUOTE_MAX ? `${trimmed.slice(0, QUOTE_MAX - 1)}…` : trimmed;
}

/**
 * Reactions as history gives them ([{emoji, count, mine}]), for `me`; `peer`
 * is the other member of a one-to-one chat (null in a group).
 */
export function reactionsFromHistory(list, me, peer = null) {
  const map = new Map();
  for (const r of list || []) {
    if (!r || typeof r.emoji !== 'string' || !(r.count > 0)) continue;
    const users = new Set();
    const gone = new Set();
    if (r.mine) users.add(me);
    else gone.add(me);
    if (peer) {
      if (r.count - users.size >= 1) users.add(peer);
      else gone.add(peer);
    }
    map.set(r.emoji, { count: r.count, users, gone });
  }
  return map;
}

/**
 * Apply one reaction event (`by` put `emoji` on, or took it back) to a
 * message's reactions. `members` (optional) caps a count. Returns whether
 * anything changed.
 */
export function applyReaction(reactions, by, emoji, on, members = Infinity) {
  let r = reactions.get(emoji);
  if (on) {
    if (r && r.users.has(by)) return false; // already counted
    if (!r) {
      r = { count: 0, users: new Set(), gone: new Set() };
      reactions.set(emoji, r);
    }
    // Someone not known to have reacted: a new reaction (an event comes after
    // the history that was loaded before it).
    r.users.add(by);
    r.gone.delete(by);
    r.count = Math.max(r.users.size, Math.min(r.count + 1, members));
    return true;
  }
  if (!r || r.gone.has(by)) return false;
  if (r.users.has(by)) {
    r.users.delete(by);
    r.count -= 1;
  } else if (r.count > r.users.size) {
    r.count -= 1; // one of the reactors history did not name
  } else {
    r.gone.add(by);
    return false;
  }
  r.gone.add(by);
  r.count = Math.max(r.count, r.users.size);
  if (r.count <= 0) reactions.delete(emoji);
  return true;
}

/** The chips under a message: [{emoji, count, mine}] in the order they came. */
export function reactionChips(reactions, me) {
  const chips = [];
  for (const [emoji, r] of reactions || []) {
    if (r.count > 0) chips.push({ emoji, count: r.count, mine: r.users.has(me) });
  }
  return chips;
}

/** Apply an edit (body at `ts`); an older edit arriving late changes nothing. */
export function applyEdit(msg, body, ts) {
  if (msg.deleted || typeof body !== 'string') return false;
  if (msg.editedTs && ts && ts < msg.editedTs) return false;
  msg.body = body;
  msg.editedTs = ts || msg.editedTs || Date.now();
  return true;
}

/** Turn a message into a tombstone: no body, no reactions, no receipts. */
export function applyDelete(msg) {
  if (msg.deleted) return false;
  msg.deleted = true;
  msg.body = null;
  msg.reactions = new Map();
  return true;
}

/**
 * What a reply shows of the message it answers: {state, from, text} where
 * state is "ok", "deleted" or "missing" (not loaded here).
 */
export function quoteOf(original) {
  if (!original) return { state: 'missing', from: null, text: 'original message not loaded' };
  if (original.deleted) return { state: 'deleted', from: original.from, text: 'message deleted' };
  if (original.body == null) return { state: 'ok', from: original.from, text: 'message unavailable' };
  return { state: 'ok', from: original.from, text: firstLine(original.body) };
}
