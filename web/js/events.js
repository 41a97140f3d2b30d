// Replies, reactions, edits, deletions and group changes: the pure state
// updates (no DOM, no network), used by app.js and tested in the browser on
// their own.
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
  if (original.body == null) {
    // End-to-end: not decrypted (yet), and never any text of it then.
    const sealed = original.sealed && (original.e2eState === 'failed' ? original.e2eError : 'encrypted message');
    return { state: 'ok', from: original.from, text: sealed || 'message unavailable' };
  }
  return { state: 'ok', from: original.from, text: firstLine(original.body) };
}

// --- groups that change ---------------------------------------------------------
//
// A `members` event carries the group as it is after the change (members,
// admins, title), so applying it is replacing those, unless a later change
// (a higher eseq) was applied already. Who may manage a group: its admins,
// or every member of a group made before admins existed (none).

/** "a", "a and b", "a, b and c". */
export function listNames(names) {
  if (names.length < 2) return names.join('');
  return `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]}`;
}

/** May `me` rename the group, add and remove members, make admins (and delete others' messages)? */
export function canManage(conv, me) {
  if (!conv || conv.kind !== 'group' || conv.left || !Array.isArray(conv.admins)) return false;
  if (!(conv.members || []).includes(me)) return false;
  return conv.admins.length === 0 || conv.admins.includes(me);
}

/**
 * The system lines of a `members` event as `me` reads them ("alice added
 * dave", "You left"). With `adminsBefore`, someone who became an admin
 * without being promoted (the last admin left) gets a line too.
 */
export function membersLines(f, me, adminsBefore = null) {
  const name = (u, start = false) => (u === me ? (start ? 'You' : 'you') : u);
  const be = (u) => (u === me ? 'are' : 'is');
  const users = Array.isArray(f.users) ? f.users : [];
  const by = name(f.by, true);
  const whom = listNames(users.map((u) => name(u)));
  const self = users.length === 1 && users[0] === f.by;
  const lines = [];
  switch (f.action) {
    case 'add':
      lines.push(`${by} added ${whom}`);
      break;
    case 'remove':
      lines.push(`${by} removed ${whom}`);
      break;
    case 'leave':
      lines.push(`${name(users[0] || f.by, true)} left`);
      break;
    case 'rename':
      lines.push(f.title ? `${by} renamed the group to “${f.title}”` : `${by} removed the group's name`);
      break;
    case 'promote':
      lines.push(self ? `${by} became an admin` : `${by} made ${whom} ${users.length > 1 ? 'admins' : 'an admin'}`);
      break;
    case 'demote':
      lines.push(self ? `${by} ${be(f.by)} no longer an admin` : `${by} removed ${whom} as admin`);
      break;
    default:
      lines.push(`${by} changed the group`);
  }
  if (Array.isArray(adminsBefore) && f.action !== 'promote') {
    for (const u of f.admins || []) {
      if (!adminsBefore.includes(u)) lines.push(`${name(u, true)} ${be(u)} now an admin`);
    }
  }
  return lines;
}

/**
 * Apply a `members` event to a conversation ({kind, members, admins, title,
 * left, membersEseq, joined}). Returns {changed, wasMember, member, lines}:
 * `changed` false when a later change was applied already (the event still
 * has its lines); `joined` keeps when each added member joined, so that
 * older messages are not counted as owed to them.
 */
export function applyMembers(conv, f, me) {
  const wasMember = !conv.left && (conv.members || []).includes(me);
  if (!Array.isArray(f.members) || (typeof f.eseq === 'number' && conv.membersEseq >= f.eseq)) {
    return { changed: false, wasMember, member: wasMember, lines: membersLines(f, me) };
  }
  const lines = membersLines(f, me, Array.isArray(conv.admins) ? conv.admins : null);
  const member = f.members.includes(me);
  conv.members = [...f.members];
  conv.admins = Array.isArray(f.admins) ? [...f.admins] : [];
  conv.title = f.title ?? null;
  conv.left = !member;
  if (typeof f.eseq === 'number') conv.membersEseq = f.eseq;
  if (f.action === 'add' && f.ts) {
    conv.joined = { ...(conv.joined || {}) };
    for (const u of f.users || []) conv.joined[u] = f.ts;
  }
  return { changed: true, wasMember, member, lines };
}
