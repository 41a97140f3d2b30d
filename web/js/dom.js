// Tiny DOM helpers. User data only ever goes in as text nodes or attributes.

/**
 * h('div', {class: 'x', testid: 'y', onclick: fn}, 'text', child)
 * Strings become text nodes: never parsed as HTML.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [key, value] of Object.entries(props)) {
      if (value == null || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key === 'text') el.textContent = value;
      else if (key === 'testid') el.setAttribute('data-testid', value);
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else if (key.startsWith('on') && typeof value === 'function') {
        el.addEventListener(key.slice(2), value);
      } else el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child == null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.append(child);
    else el.append(document.createTextNode(String(child)));
  }
}

const URL_RE = /\bhttps?:\/\/[^\s<>"']+[^\s<>"'.,;:!?)\]}]/g;

/** Text with http(s) links made clickable; everything stays a text node. */
export function richText(text) {
  const frag = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(URL_RE)) {
    if (match.index > last) frag.append(document.createTextNode(text.slice(last, match.index)));
    const a = document.createElement('a');
    a.href = match[0];
    a.textContent = match[0];
    a.target = '_blank';
    a.rel = 'noopener noreferrer';
    frag.append(a);
    last = match.index + match[0].length;
  }
  if (last < text.length) frag.append(document.createTextNode(text.slice(last)));
  return frag;
}

/** A random id usable as a cid; works outside secure contexts too. */
export function randomId(prefix = '') {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dateFmt = new Intl.DateTimeFormat(undefined, { day: 'numeric', month: 'short' });
const yearFmt = new Intl.DateTimeFormat(undefined, { day: 'numeric', month: 'short', year: 'numeric' });
const weekdayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long' });

function startOfDay(ts) {
  const d = new Date(ts);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

export function formatTime(ts) {
  return timeFmt.format(new Date(ts));
}

/** "Today", "Yesterday", a weekday this week, else a date. */
export function formatDay(ts, now = Date.now()) {
  const days = Math.round((startOfDay(now) - startOfDay(ts)) / 86_400_000);
  if (days === 0) return 'Today';
  if (days === 1) return 'Yesterday';
  if (days > 1 && days < 7) return weekdayFmt.format(new Date(ts));
  const d = new Date(ts);
  return d.getFullYear() === new Date(now).getFullYear() ? dateFmt.format(d) : yearFmt.format(d);
}

/** Short stamp for the conversation list: time today, else the day. */
export function formatStamp(ts, now = Date.now()) {
  return startOfDay(ts) === startOfDay(now) ? formatTime(ts) : formatDay(ts, now);
}

export function formatLastSeen(ts, now = Date.now()) {
  if (!ts) return 'offline';
  if (now - ts < 60_000) return 'last seen just now';
  const day = formatDay(ts, now);
  const when = day === 'Today' ? 'today' : day === 'Yesterday' ? 'yesterday' : day;
  return `last seen ${when} at ${formatTime(ts)}`;
}

export function dayKey(ts) {
  const d = new Date(ts);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}

/** A stable, readable colour per name (white text on it passes WCAG AA). */
export function avatarColor(name) {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  const hues = [210, 260, 330, 15, 140, 180, 290, 30, 100, 235];
  return `hsl(${hues[hash % hues.length]} 55% 32%)`;
}

export function initials(name) {
  const parts = name.replace(/[_.\-]+/g, ' ').trim().split(/\s+/);
  const first = parts[0] || '?';
  const second = parts[1] || '';
  return (first[0] + (second[0] || first[1] || '')).toUpperCase();
}

export function avatar(name, extraClass = '') {
  const el = h('span', { class: `avatar ${extraClass}`.trim(), 'aria-hidden': 'true' }, initials(name));
  el.style.background = avatarColor(name);
  return el;
}
