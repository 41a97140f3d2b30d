// The chat client: state, wire protocol handling and rendering.
//
// State lives in plain Maps; every change calls scheduleRender(), which
// redraws the conversation list and the open chat once per frame. Messages
// are keyed "c:<cid>" while they are only ours (optimistic) and "m:<id>"
// when they came from the server; byId and byCid find either.

import { api } from './api.js';
import { Connection } from './connection.js';
import {
  avatar,
  dayKey,
  formatDay,
  formatLastSeen,
  formatStamp,
  formatTime,
  h,
  randomId,
  richText,
} from './dom.js';
import { errorText, errorTitle } from './errors.js';
import { icons } from './icons.js';
import { resolveWsUrl } from './wsurl.js';

const SESSION_KEY = 'chatd.session';
const OUTBOX_PREFIX = 'chatd.outbox.';
const PAGE = 50;
const MAX_BODY = 4000;
const TYPING_SEND_EVERY_MS = 3000;
const TYPING_SHOW_MS = 6000;
const MAX_IDS = 500; // per ack/seen frame (the server takes up to 1000)
const USERNAME_RE = /^[a-z0-9_.-]{3,32}$/;

// pending 🕓, sent ✓, delivered ✓✓, seen ✓✓ in colour; drawn as SVG.
const TICKS = {
  pending: { label: 'Sending…' },
  sent: { label: 'Sent' },
  delivered: { label: 'Delivered' },
  seen: { label: 'Seen' },
  failed: { label: 'Not sent' },
};

export const isDm = (id) => id.startsWith('dm:');
export const dmId = (a, b) => (a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`);

function dmPeer(id, me) {
  const [, a, b] = id.split(':');
  return a === me ? b : a;
}

function bySeq(a, b) {
  // Stored messages in seq order; our unsent ones after them, in the order typed.
  if (a.seq != null && b.seq != null) return a.seq - b.seq;
  if (a.seq != null) return -1;
  if (b.seq != null) return 1;
  return a.order - b.order;
}

function chunks(list, size) {
  const out = [];
  for (let i = 0; i < list.length; i += size) out.push(list.slice(i, i + size));
  return out;
}

export class App {
  constructor(root = document) {
    const $ = (id) => root.getElementById(id);
    this.el = {
      loginView: $('login-view'),
      loginForm: $('login-form'),
      loginError: $('login-error'),
      registerButton: $('register-button'),
      appView: $('app-view'),
      meName: $('me-name'),
      meAvatar: $('me-avatar'),
      connStatus: $('conn-status'),
      connText: $('conn-text'),
      connRetry: $('conn-retry'),
      logout: $('logout'),
      newChatToggle: $('new-chat-toggle'),
      newGroupToggle: $('new-group-toggle'),
      newChatForm: $('new-chat-form'),
      newChatError: $('new-chat-error'),
      newGroupForm: $('new-group-form'),
      newGroupError: $('new-group-error'),
      convList: $('conv-list'),
      convEmpty: $('conv-empty'),
      chat: $('chat'),
      chatEmpty: $('chat-empty'),
      chatPane: $('chat-pane'),
      back: $('chat-back'),
      chatAvatar: $('chat-avatar'),
      chatTitle: $('chat-title'),
      chatSubtitle: $('chat-subtitle'),
      offlineBanner: $('offline-banner'),
      messages: $('messages'),
      historyStatus: $('history-status'),
      messageList: $('message-list'),
      jump: $('jump-bottom'),
      composer: $('composer'),
      input: $('composer-input'),
      send: $('composer-send'),
      composerNote: $('composer-note'),
      toasts: $('toasts'),
    };
    this.conn = null;
    this.info = null;
    this.renderQueued = false;
    this.reset();
    this.bindUi();
  }

  reset() {
    this.me = null;
    this.token = null;
    this.convs = new Map(); // id -> {id, kind, title, members, last_seq, last_ts, unread, provisional}
    this.msgs = new Map(); // conversation -> Map(key -> msg)
    this.byId = new Map();
    this.byCid = new Map();
    this.hist = new Map(); // conversation -> {loaded, loading, complete, oldest, stale}
    this.outbox = []; // [{cid, conversation, frame}]
    this.presence = new Map(); // user -> {online, last_seen}
    this.typing = new Map(); // conversation -> Map(user -> expiresAt)
    this.lastTypingSent = new Map();
    this.ackIds = new Set();
    this.ackReceipts = new Set();
    this.seenQueue = new Set();
    this.openId = null;
    this.order = 0;
    this.readyCount = 0;
    this.unreadMarker = null;
    this.initialScroll = false;
    this.scrollMode = null;
    this.drafts = new Map();
    this.convsLoaded = false;
    this.connState = null;
    this.resetChatDom();
    this.convEls = new Map();
    if (this.el) this.el.convList.replaceChildren();
    clearTimeout(this.flushTimer);
    clearTimeout(this.convRefreshTimer);
    clearTimeout(this.settleTimer);
    this.flushTimer = 0;
    this.convRefreshTimer = 0;
    this.settleTimer = 0;
    this.lastSeenFlush = 0;
  }

  resetChatDom() {
    this.msgEls = new Map();
    this.msgSigs = new WeakMap();
    this.sepEls = new Map();
    this.visible = new Set();
    this.unreadEl = null;
    if (this.io) this.io.disconnect();
    this.io = new IntersectionObserver((entries) => this.onIntersect(entries), {
      root: this.el ? this.el.messages : null,
      threshold: [0, 0.25, 0.5, 1],
    });
    if (this.el) this.el.messageList.replaceChildren();
  }

  // --- start, session -------------------------------------------------------------

  start() {
    window.addEventListener('hashchange', () => this.route());
    window.addEventListener('focus', () => this.reportSeen());
    document.addEventListener('visibilitychange', () => this.reportSeen());
    setInterval(() => this.everySecond(), 1000);
    const session = loadSession();
    if (session) this.enterApp(session);
    else this.showLogin();
  }

  showLogin(message = '') {
    this.el.appView.hidden = true;
    this.el.loginView.hidden = false;
    this.el.loginError.textContent = message;
    document.title = 'chatd';
    const user = this.el.loginForm.elements.username;
    if (!user.value) user.focus();
    else this.el.loginForm.elements.password.focus();
  }

  async submitLogin(mode) {
    const form = this.el.loginForm;
    const username = form.elements.username.value.trim().toLowerCase();
    const password = form.elements.password.value;
    const error = this.el.loginError;
    error.textContent = '';
    if (!USERNAME_RE.test(username)) {
      error.textContent = 'A username is 3–32 characters: letters, digits, _ . -';
      return;
    }
    if (password.length < 8) {
      error.textContent = 'The password needs at least 8 characters.';
      return;
    }
    const buttons = form.querySelectorAll('button');
    buttons.forEach((b) => (b.disabled = true));
    form.setAttribute('aria-busy', 'true');
    try {
      let name = username;
      if (mode === 'register') {
        const made = await api('/api/register', { method: 'POST', body: { username, password } });
        name = made.username;
      }
      const { token, expires_in, refresh_token } = await api('/api/login', {
        method: 'POST',
        body: { username: name, password },
      });
      const session = {
        user: name,
        token,
        expiresAt: Date.now() + expires_in * 1000,
        refresh: refresh_token || null,
      };
      sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
      form.elements.password.value = '';
      this.enterApp(session);
    } catch (err) {
      if (err.status === 401) error.textContent = 'Wrong username or password.';
      else if (err.status === 409) error.textContent = `The name “${username}” is already taken.`;
      else error.textContent = `${errorTitle(err.code)}: ${errorText(err.code, err.message)}`;
    } finally {
      buttons.forEach((b) => (b.disabled = false));
      form.removeAttribute('aria-busy');
    }
  }

  enterApp(session) {
    this.reset();
    this.me = session.user;
    this.token = session.token;
    this.el.loginView.hidden = true;
    this.el.appView.hidden = false;
    this.el.meName.textContent = this.me;
    this.el.meAvatar.replaceChildren(avatar(this.me));
    this.restoreOutbox();
    this.startConnection();
    this.loadConversations();
    this.route();
    this.scheduleRender();
  }

  logout() {
    const unsent = this.outbox.length;
    if (unsent && !window.confirm(`${unsent} message(s) are not sent yet and will be lost. Log out anyway?`)) {
      return;
    }
    if (this.conn) this.conn.stop();
    this.conn = null;
    // Revoke the token on the server (every replica refuses it from now on);
    // logging out here does not wait for it.
    if (this.token) api('/api/logout', { method: 'POST', token: this.token }).catch(() => {});
    sessionStorage.removeItem(SESSION_KEY);
    if (this.me) sessionStorage.removeItem(OUTBOX_PREFIX + this.me);
    this.reset();
    if (location.hash) history.replaceState(null, '', location.pathname + location.search);
    this.showLogin();
  }

  startConnection() {
    this.conn = new Connection({
      token: this.token,
      resolveUrl: () => this.wsUrl(),
      onFrame: (f) => this.onFrame(f),
      onStatus: (s) => this.onStatus(s),
      onUnauthorized: (msg) => this.sessionEnded(msg),
    });
    this.conn.start();
  }

  /**
   * The access token expired (or was refused): trade the refresh token for a
   * new one and carry on, without asking for the password. True if it worked.
   * A refresh token works once; the server ends the session if one is reused.
   */
  async refreshSession() {
    const s = loadSession(true);
    if (!s || !s.refresh || this.refreshing) return false;
    this.refreshing = true;
    try {
      const r = await api('/api/refresh', { method: 'POST', body: { refresh_token: s.refresh } });
      const session = {
        user: s.user,
        token: r.token,
        expiresAt: Date.now() + r.expires_in * 1000,
        refresh: r.refresh_token,
      };
      sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
      this.token = r.token;
      if (this.conn) this.conn.stop();
      this.startConnection();
      return true;
    } catch {
      return false;
    } finally {
      this.refreshing = false;
    }
  }

  /** The server said the token is no good (close 4001, HTTP 401): refresh, or back to the login. */
  async sessionEnded(message) {
    // Only an expired token is renewed; a revoked one, a disabled account or
    // a reused refresh token means signing in again.
    if (/expired/.test(message || '') && (await this.refreshSession())) return;
    if (this.conn) this.conn.stop();
    this.conn = null;
    // Revoke the token on the server (every replica refuses it from now on);
    // logging out here does not wait for it.
    if (this.token) api('/api/logout', { method: 'POST', token: this.token }).catch(() => {});
    sessionStorage.removeItem(SESSION_KEY);
    // The outbox stays in sessionStorage: after logging in again it is sent.
    const user = this.me;
    this.reset();
    this.el.loginForm.elements.username.value = user || '';
    this.showLogin(`Signed out: ${errorText('unauthorized', message)} Please log in again.`);
  }

  async wsUrl() {
    if (!this.info) this.info = await api('/api/info');
    return resolveWsUrl(this.info, window.location);
  }

  // --- UI wiring ------------------------------------------------------------------

  bindUi() {
    const el = this.el;
    el.loginForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.submitLogin('login');
    });
    el.registerButton.addEventListener('click', () => this.submitLogin('register'));
    el.logout.addEventListener('click', () => this.logout());
    el.connRetry.addEventListener('click', () => this.conn && this.conn.reconnectNow());
    el.newChatToggle.addEventListener('click', () => this.toggleForm(el.newChatForm));
    el.newGroupToggle.addEventListener('click', () => this.toggleForm(el.newGroupForm));
    el.newChatForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.startDm();
    });
    el.newGroupForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.createGroup();
    });
    for (const form of [el.newChatForm, el.newGroupForm]) {
      form.querySelector('[data-cancel]').addEventListener('click', () => (form.hidden = true));
    }
    el.back.addEventListener('click', () => {
      // Pop the entry opening the chat pushed, so the browser's back button
      // and this one agree; otherwise (opened from a link) go to the list.
      if (this.cameFromList) {
        this.cameFromList = false;
        history.back();
      } else this.navigate(null);
    });
    el.composer.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.sendFromComposer();
    });
    el.input.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        this.sendFromComposer();
      }
    });
    el.input.addEventListener('input', () => {
      this.autosize();
      this.updateComposerNote();
      this.sendTyping();
    });
    el.messages.addEventListener('scroll', () => this.onScroll(), { passive: true });
    el.jump.addEventListener('click', () => {
      el.messages.scrollTop = el.messages.scrollHeight;
    });
  }

  toggleForm(form) {
    const show = form.hidden;
    this.el.newChatForm.hidden = true;
    this.el.newGroupForm.hidden = true;
    form.hidden = !show;
    if (show) {
      form.querySelector('.form-error').textContent = '';
      form.querySelector('input').focus();
    }
  }

  // --- navigation -----------------------------------------------------------------

  navigate(id) {
    const hash = id ? `#c=${encodeURIComponent(id)}` : '';
    if (location.hash !== hash) {
      if (hash) {
        this.cameFromList = !location.hash;
        location.hash = hash;
      } else history.pushState(null, '', location.pathname + location.search);
    }
    this.route();
  }

  route() {
    if (!this.me) return;
    const match = /^#c=(.+)$/.exec(location.hash);
    let id = null;
    if (match) {
      try {
        id = decodeURIComponent(match[1]);
      } catch {
        id = null;
      }
    }
    if (id && !this.convs.has(id) && isDm(id) && this.convsLoaded) {
      const [, a, b] = id.split(':');
      if (a === this.me || b === this.me) this.provisionalDm(a === this.me ? b : a);
    }
    if (id && !this.convs.has(id)) id = this.convsLoaded ? null : id;
    if (id) this.open(id);
    else this.close();
  }

  open(id) {
    if (!this.convs.has(id)) return;
    if (this.openId !== id) {
      this.openId = id;
      this.resetChatDom();
      this.unreadMarker = null;
      this.initialScroll = true;
      this.el.input.value = this.drafts.get(id) || '';
      this.autosize();
      this.updateComposerNote();
      const conv = this.convs.get(id);
      if (isDm(id) && !conv.provisional) this.loadPresence(dmPeer(id, this.me));
      if (window.matchMedia('(min-width: 721px)').matches) this.el.input.focus();
    }
    const st = this.histState(id);
    if (!st.loaded || st.stale) this.loadLatest(id, { refresh: st.loaded });
    this.scheduleRender();
  }

  close() {
    if (this.openId === null) return;
    this.openId = null;
    this.resetChatDom();
    this.scheduleRender();
  }

  // --- conversations --------------------------------------------------------------

  ensureConv(id) {
    let conv = this.convs.get(id);
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
      this.convs.set(id, conv);
      this.refreshConversationsSoon(); // learn its title and members
    }
    return conv;
  }

  convMsgs(id) {
    let map = this.msgs.get(id);
    if (!map) {
      map = new Map();
      this.msgs.set(id, map);
    }
    return map;
  }

  histState(id) {
    let st = this.hist.get(id);
    if (!st) {
      st = { loaded: false, loading: false, complete: false, oldest: null, stale: false };
      this.hist.set(id, st);
    }
    return st;
  }

  title(conv) {
    if (isDm(conv.id)) return dmPeer(conv.id, this.me);
    if (conv.title) return conv.title;
    const others = (conv.members || []).filter((m) => m !== this.me);
    return others.length ? others.join(', ') : 'Group';
  }

  others(conv) {
    if (isDm(conv.id)) return [dmPeer(conv.id, this.me)];
    return (conv.members || []).filter((m) => m !== this.me);
  }

  /**
   * Our own stored messages that are probably the server's copy of a message
   * still pending here (its `sent` has not arrived: lost with a dropped
   * socket, or history/the list was quicker). Same body, stored after the
   * pending one was typed, never confirmed by a `sent`: shown once, as the
   * pending one, until `sent` settles it (same id: merged; other id: both).
   */
  shadowed(id) {
    const all = [...this.convMsgs(id).values()];
    const pending = all.filter((m) => m.state === 'pending').sort(bySeq);
    const hidden = new Set();
    if (!pending.length) return hidden;
    const stored = all.filter((m) => m.from === this.me && m.id && !m.cid).sort(bySeq);
    for (const p of pending) {
      const twin = stored.find(
        (m) => !hidden.has(m.key) && m.body === p.body && m.seq > (p.afterSeq || 0),
      );
      if (twin) hidden.add(twin.key);
    }
    return hidden;
  }

  sortedMessages(id) {
    const hidden = this.shadowed(id);
    return [...this.convMsgs(id).values()].filter((m) => !hidden.has(m.key)).sort(bySeq);
  }

  lastMessage(id) {
    const hidden = this.shadowed(id);
    let last = null;
    for (const m of this.convMsgs(id).values()) {
      if (!hidden.has(m.key) && (!last || bySeq(last, m) < 0)) last = m;
    }
    return last;
  }

  maxSeq(id) {
    let max = this.convs.get(id)?.last_seq || 0;
    for (const m of this.convMsgs(id).values()) if (m.seq != null && m.seq > max) max = m.seq;
    return max;
  }

  activity(conv) {
    const last = this.lastMessage(conv.id);
    return Math.max(conv.last_ts || 0, last ? last.ts : 0, conv.created || 0);
  }

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
    for (const c of data.conversations) {
      const conv = this.convs.get(c.id) || { created: 0 };
      if (conv.provisional) this.histState(c.id).stale = true; // it has a history now
      const lastSeq = c.last_seq || 0;
      // Messages that arrived live after the server counted: add them.
      let newer = 0;
      for (const m of this.convMsgs(c.id).values()) {
        if (m.seq > lastSeq && m.from !== this.me && !m.seenBy.has(this.me)) newer += 1;
      }
      Object.assign(conv, {
        id: c.id,
        kind: c.kind || (isDm(c.id) ? 'dm' : 'group'),
        title: c.title ?? null,
        members: c.members || [],
        last_seq: Math.max(lastSeq, conv.last_seq || 0),
        last_ts: Math.max(c.last_ts || 0, conv.last_ts || 0),
        unread: (c.unread || 0) + newer,
        provisional: false,
      });
      this.convs.set(c.id, conv);
      if (c.last_message) this.ingest({ ...c.last_message, conversation: c.id });
    }
    // Who is online: ask for the peers of the most recent one-to-one chats
    // once; `presence` frames keep it current after that.
    const peers = data.conversations
      .filter((c) => isDm(c.id))
      .map((c) => dmPeer(c.id, this.me))
      .filter((u) => !this.presence.has(u))
      .slice(0, 30);
    for (const peer of peers) this.loadPresence(peer);
    const first = !this.convsLoaded;
    this.convsLoaded = true;
    if (first) this.route();
    if (this.openId) {
      const st = this.histState(this.openId);
      if (!st.loaded || st.stale) this.loadLatest(this.openId, { refresh: st.loaded });
    }
    this.scheduleRender();
  }

  refreshConversationsSoon() {
    if (this.convRefreshTimer) return;
    this.convRefreshTimer = setTimeout(() => {
      this.convRefreshTimer = 0;
      this.loadConversations();
    }, 250);
  }

  provisionalDm(peer) {
    const id = dmId(this.me, peer);
    if (!this.convs.has(id)) {
      this.convs.set(id, {
        id,
        kind: 'dm',
        title: null,
        members: [this.me, peer].sort(),
        last_seq: 0,
        last_ts: 0,
        unread: 0,
        provisional: true, // the server creates it with the first message
        created: Date.now(),
      });
    }
    return id;
  }

  startDm() {
    const form = this.el.newChatForm;
    const error = form.querySelector('.form-error');
    const name = form.elements.username.value.trim().toLowerCase();
    if (!USERNAME_RE.test(name)) {
      error.textContent = 'Enter a username (3–32 characters: letters, digits, _ . -).';
      return;
    }
    if (name === this.me) {
      error.textContent = 'That is you. Pick someone else.';
      return;
    }
    form.reset();
    form.hidden = true;
    this.navigate(this.provisionalDm(name));
  }

  async createGroup() {
    const form = this.el.newGroupForm;
    const error = form.querySelector('.form-error');
    const title = form.elements.title.value.trim();
    const members = form.elements.members.value
      .split(/[\s,;]+/)
      .map((m) => m.trim().toLowerCase())
      .filter((m) => m && m !== this.me);
    error.textContent = '';
    const bad = members.find((m) => !USERNAME_RE.test(m));
    if (bad) {
      error.textContent = `“${bad}” is not a valid username.`;
      return;
    }
    if (!members.length) {
      error.textContent = 'Add at least one other member.';
      return;
    }
    const button = form.querySelector('button[type=submit]');
    button.disabled = true;
    try {
      const made = await api('/api/conversations', {
        method: 'POST',
        token: this.token,
        body: { members: [...new Set(members)], title: title || null },
      });
      this.convs.set(made.id, {
        id: made.id,
        kind: made.kind || 'group',
        title: made.title ?? null,
        members: made.members,
        last_seq: 0,
        last_ts: 0,
        unread: 0,
        provisional: false,
        created: Date.now(),
      });
      this.histState(made.id).loaded = true;
      this.histState(made.id).complete = true;
      form.reset();
      form.hidden = true;
      this.navigate(made.id);
    } catch (err) {
      if (err.status === 401) this.sessionEnded(err.message);
      else error.textContent = `${errorTitle(err.code)}: ${errorText(err.code, err.message)}`;
    } finally {
      button.disabled = false;
    }
  }

  async loadPresence(user) {
    try {
      const token = this.token;
      const info = await api(`/api/users/${encodeURIComponent(user)}`, { token });
      if (token !== this.token) return;
      this.presence.set(info.username, { online: info.online, last_seen: info.last_seen });
      this.scheduleRender();
    } catch (err) {
      if (err.status === 401) this.sessionEnded(err.message);
      // 404: nothing shared yet; the header just shows no presence.
    }
  }

  // --- history --------------------------------------------------------------------

  async loadLatest(id, { refresh = false } = {}) {
    const st = this.histState(id);
    const conv = this.convs.get(id);
    if (st.loading) return;
    if (conv && conv.provisional) {
      st.loaded = st.complete = true;
      this.scheduleRender();
      return;
    }
    st.loading = true;
    st.stale = false;
    this.scheduleRender();
    const token = this.token;
    try {
      const data = await api(
        `/api/conversations/${encodeURIComponent(id)}/messages?limit=${PAGE}`,
        { token },
      );
      if (token !== this.token) return; // logged out meanwhile
      const page = data.messages;
      if (refresh && page.length) {
        // After a reconnect: if messages were missed between what we hold and
        // this page (acked by another device meanwhile), drop the older part
        // so the view has no hole; scrolling up loads it again.
        let maxHeld = 0;
        for (const m of this.convMsgs(id).values()) if (m.seq != null) maxHeld = Math.max(maxHeld, m.seq);
        if (page[0].seq > maxHeld + 1) {
          for (const [key, m] of this.convMsgs(id)) {
            if (m.seq != null && m.seq < page[0].seq) {
              this.convMsgs(id).delete(key);
              this.byId.delete(m.id);
            }
          }
          st.oldest = page[0].seq;
          st.complete = page[0].seq === 1;
        }
      }
      for (const m of page) this.ingest({ ...m, conversation: m.conversation || id });
      if (!st.loaded) {
        st.oldest = page.length ? page[0].seq : null;
        st.complete = page.length < PAGE || (page.length > 0 && page[0].seq === 1);
      }
      st.loaded = true;
    } catch (err) {
      if (err.status === 404) st.loaded = st.complete = true;
      else this.apiFailed(err);
    } finally {
      st.loading = false;
      this.scheduleRender();
    }
  }

  async loadOlder(id) {
    const st = this.histState(id);
    if (!st.loaded || st.complete || st.loading || st.oldest == null) return;
    st.loading = true;
    this.scheduleRender();
    const token = this.token;
    try {
      const data = await api(
        `/api/conversations/${encodeURIComponent(id)}/messages?before=${st.oldest}&limit=${PAGE}`,
        { token },
      );
      if (token !== this.token) return;
      const page = data.messages;
      for (const m of page) this.ingest({ ...m, conversation: m.conversation || id });
      if (page.length) st.oldest = page[0].seq;
      st.complete = page.length < PAGE || page[0].seq === 1;
      if (this.openId === id) this.scrollMode = 'keep';
    } catch (err) {
      this.apiFailed(err);
    } finally {
      st.loading = false;
      this.scheduleRender();
    }
  }

  /** Take a server message (history, live frame, list summary); merges by id. */
  ingest(m) {
    let msg = this.byId.get(m.id);
    let fresh = false;
    if (!msg) {
      fresh = true;
      msg = {
        key: `m:${m.id}`,
        id: m.id,
        cid: null,
        conversation: m.conversation,
        seq: m.seq,
        from: m.from,
        body: m.body,
        ts: m.ts,
        deliveredTo: new Set(),
        seenBy: new Set(),
        state: 'stored',
        error: null,
        order: ++this.order,
      };
      this.byId.set(m.id, msg);
      this.convMsgs(m.conversation).set(msg.key, msg);
    }
    for (const u of m.delivered_to || []) msg.deliveredTo.add(u);
    for (const u of m.seen_by || []) {
      msg.seenBy.add(u);
      msg.deliveredTo.add(u);
    }
    return { msg, fresh };
  }

  /** pending | failed | sent | delivered | seen — for our own messages. */
  status(msg) {
    if (msg.state === 'pending' || msg.state === 'failed') return msg.state;
    const conv = this.convs.get(msg.conversation);
    const others = conv ? this.others(conv) : [];
    if (!others.length) return 'sent';
    if (others.every((u) => msg.seenBy.has(u))) return 'seen';
    if (others.every((u) => msg.deliveredTo.has(u) || msg.seenBy.has(u))) return 'delivered';
    return 'sent';
  }

  statusDetail(msg) {
    const status = this.status(msg);
    if (status === 'failed') return `Not sent: ${msg.error ? msg.error.message : ''}`;
    const conv = this.convs.get(msg.conversation);
    if (!conv || isDm(conv.id) || status === 'pending') return TICKS[status].label;
    const seen = [...msg.seenBy].filter((u) => u !== this.me);
    const delivered = [...msg.deliveredTo].filter((u) => u !== this.me && !msg.seenBy.has(u));
    const parts = [TICKS[status].label];
    if (seen.length) parts.push(`seen by ${seen.join(', ')}`);
    if (delivered.length) parts.push(`delivered to ${delivered.join(', ')}`);
    return parts.join(' · ');
  }

  // --- sending --------------------------------------------------------------------

  sendFromComposer() {
    const body = this.el.input.value;
    if (!body.trim() || !this.openId) return;
    if (body.length > MAX_BODY) {
      this.updateComposerNote();
      return;
    }
    this.send(this.openId, body);
    this.el.input.value = '';
    this.drafts.delete(this.openId);
    this.autosize();
    this.updateComposerNote();
    this.el.input.focus();
  }

  frameFor(conv, cid, body) {
    const frame = { type: 'send', cid, body };
    if (conv.provisional) frame.to = dmPeer(conv.id, this.me);
    else frame.conversation = conv.id;
    return frame;
  }

  send(convId, body) {
    const conv = this.convs.get(convId);
    const cid = randomId('w');
    const afterSeq = this.maxSeq(convId);
    const msg = {
      afterSeq,
      key: `c:${cid}`,
      id: null,
      cid,
      conversation: convId,
      seq: null,
      from: this.me,
      body,
      ts: Date.now(),
      deliveredTo: new Set(),
      seenBy: new Set(),
      state: 'pending',
      error: null,
      order: ++this.order,
    };
    this.convMsgs(convId).set(msg.key, msg);
    this.byCid.set(cid, msg);
    const item = {
      cid,
      conversation: convId,
      frame: this.frameFor(conv, cid, body),
      ts: msg.ts,
      afterSeq,
    };
    this.outbox.push(item);
    this.saveOutbox();
    if (this.conn) this.conn.send(item.frame);
    if (convId === this.openId) this.scrollMode = 'bottom';
    this.scheduleRender();
  }

  /** Send a failed message again, with the same cid: it can never be stored twice. */
  retry(msg) {
    const conv = this.convs.get(msg.conversation);
    if (!conv || msg.state !== 'failed') return;
    msg.state = 'pending';
    msg.error = null;
    const item = {
      cid: msg.cid,
      conversation: msg.conversation,
      frame: this.frameFor(conv, msg.cid, msg.body),
      ts: msg.ts,
      afterSeq: msg.afterSeq,
    };
    this.outbox.push(item);
    this.saveOutbox();
    if (this.conn) this.conn.send(item.frame);
    this.scheduleRender();
  }

  discard(msg) {
    if (msg.state !== 'failed') return;
    this.convMsgs(msg.conversation).delete(msg.key);
    this.byCid.delete(msg.cid);
    this.scheduleRender();
  }

  removeFromOutbox(cid) {
    const before = this.outbox.length;
    this.outbox = this.outbox.filter((i) => i.cid !== cid);
    if (this.outbox.length !== before) this.saveOutbox();
  }

  saveOutbox() {
    if (!this.me) return;
    const key = OUTBOX_PREFIX + this.me;
    if (this.outbox.length) sessionStorage.setItem(key, JSON.stringify(this.outbox));
    else sessionStorage.removeItem(key);
  }

  restoreOutbox() {
    let items = [];
    try {
      items = JSON.parse(sessionStorage.getItem(OUTBOX_PREFIX + this.me) || '[]');
    } catch {
      items = [];
    }
    for (const item of items) {
      if (!item || !item.cid || !item.frame) continue;
      if (isDm(item.conversation)) this.provisionalDm(dmPeer(item.conversation, this.me));
      else this.ensureConv(item.conversation);
      const msg = {
        afterSeq: item.afterSeq || 0,
        key: `c:${item.cid}`,
        id: null,
        cid: item.cid,
        conversation: item.conversation,
        seq: null,
        from: this.me,
        body: item.frame.body,
        ts: item.ts || Date.now(),
        deliveredTo: new Set(),
        seenBy: new Set(),
        state: 'pending',
        error: null,
        order: ++this.order,
      };
      this.convMsgs(item.conversation).set(msg.key, msg);
      this.byCid.set(item.cid, msg);
      this.outbox.push(item);
    }
  }

  /** After `ready`: everything not yet confirmed goes again, same cid (no doubles). */
  resendOutbox() {
    const items = [...this.outbox];
    // Pace a long queue a little so the server's rate limit is not hit.
    items.forEach((item, i) => {
      const send = () => {
        if (this.outbox.includes(item) && this.conn) this.conn.send(item.frame);
      };
      if (i < 40) send();
      else setTimeout(send, (i - 39) * 60);
    });
  }

  sendTyping() {
    const id = this.openId;
    if (id) this.drafts.set(id, this.el.input.value);
    const conv = id && this.convs.get(id);
    if (!conv || conv.provisional || !this.el.input.value.trim() || !this.conn) return;
    const now = Date.now();
    if (now - (this.lastTypingSent.get(id) || 0) < TYPING_SEND_EVERY_MS) return;
    if (this.conn.send({ type: 'typing', conversation: id })) this.lastTypingSent.set(id, now);
  }

  // --- acks and seen --------------------------------------------------------------

  flushSoon() {
    if (!this.flushTimer) this.flushTimer = setTimeout(() => this.flush(), 30);
  }

  flush() {
    this.flushTimer = 0;
    if (!this.conn || !this.conn.ready) return; // kept; sent after the next `ready`
    const ids = [...this.ackIds];
    const receipts = [...this.ackReceipts];
    const n = Math.max(Math.ceil(ids.length / MAX_IDS), Math.ceil(receipts.length / MAX_IDS));
    for (let i = 0; i < n; i++) {
      const frame = { type: 'ack' };
      const someIds = ids.slice(i * MAX_IDS, (i + 1) * MAX_IDS);
      const someRids = receipts.slice(i * MAX_IDS, (i + 1) * MAX_IDS);
      if (someIds.length) frame.ids = someIds;
      if (someRids.length) frame.receipts = someRids;
      if (!this.conn.send(frame)) return;
      someIds.forEach((x) => this.ackIds.delete(x));
      someRids.forEach((x) => this.ackReceipts.delete(x));
    }
    for (const part of chunks([...this.seenQueue], MAX_IDS)) {
      if (!this.conn.send({ type: 'seen', ids: part })) return;
      part.forEach((x) => this.seenQueue.delete(x));
      this.lastSeenFlush = Date.now();
    }
  }

  /** Is a person looking at this tab right now? */
  attentive() {
    return document.visibilityState === 'visible' && document.hasFocus();
  }

  onIntersect(entries) {
    for (const e of entries) {
      const key = e.target.dataset.key;
      const enough =
        e.isIntersecting && (e.intersectionRatio >= 0.5 || e.intersectionRect.height >= 48);
      if (enough) this.visible.add(key);
      else this.visible.delete(key);
    }
    this.reportSeen();
  }

  /** Report `seen` for incoming messages that are on screen in a focused tab. */
  reportSeen() {
    if (!this.openId || !this.attentive()) return;
    const conv = this.convs.get(this.openId);
    const map = this.convMsgs(this.openId);
    let any = false;
    for (const key of this.visible) {
      const msg = map.get(key);
      if (!msg || !msg.id || msg.from === this.me || msg.seenBy.has(this.me)) continue;
      msg.seenBy.add(this.me);
      msg.deliveredTo.add(this.me);
      this.seenQueue.add(msg.id);
      if (conv) conv.unread = Math.max(0, (conv.unread || 0) - 1);
      const el = this.msgEls.get(key);
      if (el) this.io.unobserve(el);
      any = true;
    }
    for (const key of [...this.visible]) if (!map.has(key)) this.visible.delete(key);
    if (any) {
      this.flushSoon();
      this.scheduleRender();
    }
  }

  // --- frames ---------------------------------------------------------------------

  onStatus(s) {
    this.connState = s;
    if (s.state === 'waiting') this.info = null; // ask /api/info again next time
    this.renderStatus();
  }

  onFrame(f) {
    switch (f.type) {
      case 'ready':
        return this.onReady(f);
      case 'sent':
        return this.onSent(f);
      case 'message':
        return this.onMessage(f);
      case 'receipt':
        return this.onReceipt(f);
      case 'typing':
        return this.onTyping(f);
      case 'presence':
        return this.onPresence(f);
      case 'error':
        return this.onError(f);
      default:
        return undefined; // frames this client does not know are ignored
    }
  }

  onReady() {
    this.readyCount += 1;
    this.resendOutbox();
    this.flush();
    if (!this.convsLoaded) this.loadConversations(); // the first try failed
    if (this.readyCount > 1) {
      // Back after a drop: the backlog brings what is owed; refresh the rest
      // (receipts seen elsewhere, presence, the list's counts).
      this.loadConversations();
      for (const [id, st] of this.hist) {
        if (!st.loaded) continue;
        if (id === this.openId) this.loadLatest(id, { refresh: true });
        else st.stale = true;
      }
      if (this.openId && isDm(this.openId)) this.loadPresence(dmPeer(this.openId, this.me));
    }
    this.renderStatus();
  }

  onSent(f) {
    this.removeFromOutbox(f.cid);
    const msg = this.byCid.get(f.cid);
    if (!msg) {
      this.refreshConversationsSoon();
      return;
    }
    const existing = this.byId.get(f.id);
    if (existing && existing !== msg) {
      // It already reached us another way (history): one copy only.
      this.convMsgs(msg.conversation).delete(msg.key);
      existing.cid = f.cid;
      this.byCid.set(f.cid, existing);
      this.scheduleRender();
      return;
    }
    if (msg.conversation !== f.conversation) {
      this.convMsgs(msg.conversation).delete(msg.key);
      msg.conversation = f.conversation;
      this.convMsgs(f.conversation).set(msg.key, msg);
    }
    const conv = this.ensureConv(f.conversation);
    if (conv.provisional) {
      conv.provisional = false;
      this.refreshConversationsSoon();
      this.loadPresence(dmPeer(conv.id, this.me));
    }
    Object.assign(msg, { id: f.id, seq: f.seq, ts: f.ts, state: 'stored', error: null });
    this.byId.set(f.id, msg);
    conv.last_seq = Math.max(conv.last_seq || 0, f.seq);
    conv.last_ts = Math.max(conv.last_ts || 0, f.ts);
    this.scheduleRender();
  }

  onMessage(f) {
    const mine = f.from === this.me;
    // Owed messages are acked; our own from another device are never owed.
    if (!mine) {
      this.ackIds.add(f.id);
      this.flushSoon();
    }
    const conv = this.ensureConv(f.conversation);
    if (conv.provisional) {
      conv.provisional = false;
      this.refreshConversationsSoon();
    }
    const { msg, fresh } = this.ingest(f);
    if (!fresh) return; // a duplicate: already on screen
    // The list's unread count already covers messages up to its last_seq.
    const counted = f.seq <= (conv.last_seq || 0);
    conv.last_seq = Math.max(conv.last_seq || 0, f.seq);
    conv.last_ts = Math.max(conv.last_ts || 0, f.ts);
    if (!mine) {
      if (!counted && !msg.seenBy.has(this.me)) conv.unread = (conv.unread || 0) + 1;
      const typing = this.typing.get(f.conversation);
      if (typing) typing.delete(f.from);
    }
    if (f.conversation === this.openId && mine) this.scrollMode = 'bottom';
    this.scheduleRender();
  }

  onReceipt(f) {
    this.ackReceipts.add(f.rid);
    this.flushSoon();
    const msg = this.byId.get(f.id);
    if (!msg) return; // not loaded here; history will carry delivered_to / seen_by
    msg.deliveredTo.add(f.by);
    if (f.status === 'seen') msg.seenBy.add(f.by);
    this.scheduleRender();
  }

  onTyping(f) {
    if (f.from === this.me) return;
    let map = this.typing.get(f.conversation);
    if (!map) {
      map = new Map();
      this.typing.set(f.conversation, map);
    }
    map.set(f.from, Date.now() + TYPING_SHOW_MS);
    this.scheduleRender();
  }

  typingNames(id) {
    const map = this.typing.get(id);
    if (!map) return [];
    const now = Date.now();
    return [...map].filter(([, until]) => until > now).map(([u]) => u);
  }

  onPresence(f) {
    this.presence.set(f.user, { online: f.online, last_seen: f.last_seen });
    if (!f.online) {
      for (const map of this.typing.values()) map.delete(f.user);
    }
    this.scheduleRender();
  }

  onError(f) {
    if (f.cid) {
      this.removeFromOutbox(f.cid);
      const msg = this.byCid.get(f.cid);
      if (msg && msg.state !== 'stored') {
        msg.state = 'failed';
        msg.error = { code: f.code, message: errorText(f.code, f.message) };
        this.scheduleRender();
      }
    }
    // An unauthorized during auth is followed by close 4001, which logs out.
    if (f.code === 'unauthorized' && this.conn && !this.conn.ready) return;
    this.toast(f.code, f.message);
  }

  apiFailed(err) {
    if (err.status === 401) this.sessionEnded(err.message);
    else this.toast(err.code, err.message);
  }

  // --- periodic -------------------------------------------------------------------

  everySecond() {
    if (!this.me) return;
    // Typing indicators time out; the retry countdown counts down.
    const now = Date.now();
    let changed = false;
    for (const map of this.typing.values()) {
      for (const [u, until] of map) {
        if (until <= now) {
          map.delete(u);
          changed = true;
        }
      }
    }
    if (changed) this.scheduleRender();
    if (this.connState && this.connState.state === 'waiting') this.renderStatus();
  }

  onScroll() {
    const box = this.el.messages;
    if (box.scrollTop < 120 && this.openId) this.loadOlder(this.openId);
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 80) this.el.jump.hidden = true;
  }

  // --- toasts ---------------------------------------------------------------------

  toast(code, message) {
    const text = errorText(code, message);
    for (const t of this.el.toasts.children) {
      if (t.dataset.code === code && t.dataset.text === text) return; // already showing
    }
    const el = h(
      'div',
      { class: `toast toast-${code}`, role: 'alert', testid: 'toast', dataset: { code, text } },
      h('div', { class: 'toast-body' }, h('strong', null, errorTitle(code)), h('span', null, text)),
      h('code', { class: 'toast-code' }, code),
      h(
        'button',
        { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', onclick: () => el.remove() },
        '×',
      ),
    );
    this.el.toasts.append(el);
    while (this.el.toasts.children.length > 4) this.el.toasts.firstElementChild.remove();
    setTimeout(() => el.remove(), 8000);
  }

  // --- rendering ------------------------------------------------------------------

  scheduleRender() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    const run = () => {
      if (!this.renderQueued) return;
      this.renderQueued = false;
      this.render();
    };
    requestAnimationFrame(run);
    setTimeout(run, 100); // background tabs get no animation frames
  }

  render() {
    if (!this.me) return;
    this.renderList();
    this.renderChat();
    this.renderStatus();
    const unread = [...this.convs.values()].reduce((n, c) => n + (c.unread || 0), 0);
    document.title = unread ? `(${unread}) chatd` : 'chatd';
  }

  renderStatus() {
    const s = this.connState || { state: 'connecting' };
    const el = this.el.connStatus;
    el.dataset.state = s.state;
    let text;
    if (s.state === 'ready') text = 'Online';
    else if (s.state === 'waiting') {
      const secs = Math.max(0, Math.ceil(((this.conn && this.conn.retryAt) - Date.now()) / 1000));
      text = `Offline · retrying in ${secs}s`;
    } else if (s.state === 'stopped') text = 'Signed out';
    else text = 'Connecting…';
    this.el.connText.textContent = text;
    this.el.connRetry.hidden = s.state !== 'waiting';
    const pending = this.outbox.length;
    const banner = this.el.offlineBanner;
    banner.hidden = s.state === 'ready' || !this.openId;
    banner.textContent =
      s.state === 'waiting'
        ? `Connection lost. ${pending ? `${pending} unsent — they go out when you are back online.` : 'Reconnecting…'}`
        : 'Connecting…';
  }

  renderList() {
    const convs = [...this.convs.values()].sort((a, b) => this.activity(b) - this.activity(a));
    const ul = this.el.convList;
    this.el.convEmpty.hidden = convs.length > 0;
    convs.forEach((conv, i) => {
      let li = this.convEls.get(conv.id);
      if (!li) {
        const button = h('button', {
          type: 'button',
          class: 'conv',
          testid: 'conv-item',
          dataset: { convId: conv.id },
          onclick: () => {
            this.el.newChatForm.hidden = true;
            this.el.newGroupForm.hidden = true;
            this.navigate(conv.id);
          },
        });
        li = h('li', null, button);
        this.convEls.set(conv.id, li);
      }
      this.fillConv(li.firstChild, conv);
      if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
    });
    while (ul.children.length > convs.length) ul.lastElementChild.remove();
    for (const id of [...this.convEls.keys()]) if (!this.convs.has(id)) this.convEls.delete(id);
  }

  fillConv(button, conv) {
    const title = this.title(conv);
    const last = this.lastMessage(conv.id);
    const typing = this.typingNames(conv.id);
    const dm = isDm(conv.id);
    const peer = dm ? dmPeer(conv.id, this.me) : null;
    const online = peer && this.presence.get(peer)?.online;
    let preview;
    if (typing.length) {
      preview = h('span', { class: 'typing' }, dm ? 'typing…' : `${typing.join(', ')} typing…`);
    } else if (last) {
      const own = last.from === this.me;
      const status = own ? this.status(last) : null;
      preview = [
        own ? this.tickEl(status, last) : null,
        !own && !dm ? h('span', { class: 'preview-from' }, `${last.from}: `) : null,
        last.body == null ? h('em', null, 'message unavailable') : last.body.replace(/\s+/g, ' '),
      ];
    } else preview = h('em', null, conv.provisional ? 'New conversation' : 'No messages yet');
    const stamp = last ? formatStamp(last.ts) : '';
    const sig = JSON.stringify([
      title,
      last && [last.key, last.body, last.ts, last.from === this.me && this.status(last)],
      typing,
      online,
      conv.unread,
      conv.id === this.openId,
      stamp,
      conv.provisional,
    ]);
    if (button.dataset.sig === sig) return;
    button.dataset.sig = sig;
    button.classList.toggle('active', conv.id === this.openId);
    if (conv.id === this.openId) button.setAttribute('aria-current', 'true');
    else button.removeAttribute('aria-current');
    button.replaceChildren(
      h(
        'span',
        { class: 'avatar-wrap' },
        avatar(dm ? peer : title, dm ? '' : 'group'),
        online ? h('span', { class: 'online-dot', title: 'online', testid: 'online-dot' }) : null,
      ),
      h(
        'span',
        { class: 'conv-main' },
        h(
          'span',
          { class: 'conv-top' },
          h('span', { class: 'conv-title', testid: 'conv-title' }, title),
          h('span', { class: 'conv-time' }, stamp),
        ),
        h(
          'span',
          { class: 'conv-bottom' },
          h('span', { class: 'conv-preview', testid: 'conv-preview' }, preview),
          conv.unread > 0
            ? h(
                'span',
                { class: 'badge', testid: 'conv-unread', 'aria-label': `${conv.unread} unread` },
                String(conv.unread),
              )
            : null,
        ),
      ),
    );
  }

  tickEl(status, msg) {
    const t = TICKS[status];
    return h(
      'span',
      {
        class: `tick tick-${status}`,
        testid: 'tick',
        'data-status': status,
        title: msg ? this.statusDetail(msg) : t.label,
        'aria-label': t.label,
        role: 'img',
      },
      icons[status](),
    );
  }

  renderChat() {
    const el = this.el;
    const conv = this.openId && this.convs.get(this.openId);
    document.body.classList.toggle('chat-open', Boolean(conv));
    el.chatEmpty.hidden = Boolean(conv);
    el.chatPane.hidden = !conv;
    if (!conv) return;

    // Header.
    const dm = isDm(conv.id);
    const title = this.title(conv);
    el.chatTitle.textContent = title;
    el.chatAvatar.replaceChildren(avatar(dm ? dmPeer(conv.id, this.me) : title, dm ? '' : 'group'));
    const typing = this.typingNames(conv.id);
    let subtitle = '';
    let state = '';
    if (typing.length) {
      subtitle = dm ? 'typing…' : `${typing.join(', ')} ${typing.length > 1 ? 'are' : 'is'} typing…`;
      state = 'typing';
    } else if (dm) {
      const p = this.presence.get(dmPeer(conv.id, this.me));
      if (conv.provisional) subtitle = 'new conversation';
      else if (p && p.online) {
        subtitle = 'online';
        state = 'online';
      } else if (p) {
        subtitle = formatLastSeen(p.last_seen);
        state = 'offline';
      }
    } else {
      subtitle = (conv.members || []).map((m) => (m === this.me ? 'you' : m)).join(', ');
    }
    el.chatSubtitle.textContent = subtitle;
    el.chatSubtitle.dataset.state = state;

    // Messages.
    const box = el.messages;
    const st = this.histState(conv.id);
    const fromBottom = box.scrollHeight - box.scrollTop;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const list = this.sortedMessages(conv.id);
    if (this.initialScroll && st.loaded && !this.unreadMarker) {
      const first = list.find((m) => m.id && m.from !== this.me && !m.seenBy.has(this.me));
      this.unreadMarker = first ? first.key : '';
    }
    el.historyStatus.textContent = st.loading
      ? 'Loading…'
      : st.loaded && st.complete
        ? list.length
          ? 'This is the start of the conversation.'
          : 'No messages yet. Say hello!'
        : '';
    const ol = el.messageList;
    let added = false;
    let prevDay = null;
    let i = 0;
    const place = (node) => {
      if (ol.children[i] !== node) ol.insertBefore(node, ol.children[i] || null);
      i += 1;
    };
    const live = new Set();
    for (const msg of list) {
      const day = dayKey(msg.ts);
      if (day !== prevDay) {
        prevDay = day;
        let sep = this.sepEls.get(day);
        if (!sep) {
          sep = h('li', { class: 'day-sep', role: 'separator' }, h('span', null, formatDay(msg.ts)));
          this.sepEls.set(day, sep);
        }
        place(sep);
      }
      if (this.unreadMarker && msg.key === this.unreadMarker) {
        if (!this.unreadEl) {
          this.unreadEl = h('li', { class: 'unread-sep', testid: 'unread-sep' }, h('span', null, 'Unread messages'));
        }
        place(this.unreadEl);
      }
      let li = this.msgEls.get(msg.key);
      if (!li) {
        li = h('li', { testid: 'message', dataset: { key: msg.key } });
        this.msgEls.set(msg.key, li);
        if (msg.from !== this.me) added = true;
      }
      this.fillMessage(li, msg, conv);
      live.add(msg.key);
      place(li);
    }
    while (ol.children.length > i) ol.lastElementChild.remove();
    for (const [key, li] of this.msgEls) {
      if (!live.has(key)) {
        this.io.unobserve(li);
        this.msgEls.delete(key);
        this.visible.delete(key);
      }
    }

    // Scroll: first open → first unread (or the end); own send → the end;
    // older page → keep the view still; otherwise follow only if at the end.
    if (this.initialScroll && st.loaded) {
      this.initialScroll = false;
      const marker = this.unreadMarker && this.msgEls.get(this.unreadMarker);
      if (marker && this.unreadEl) this.unreadEl.scrollIntoView({ block: 'start' });
      else box.scrollTop = box.scrollHeight;
    } else if (this.scrollMode === 'bottom' || (atBottom && this.scrollMode !== 'keep')) {
      box.scrollTop = box.scrollHeight;
    } else if (this.scrollMode === 'keep') {
      box.scrollTop = box.scrollHeight - fromBottom;
    } else if (added) {
      el.jump.hidden = false;
    }
    this.scrollMode = null;
    if (box.scrollTop < 120 && st.loaded && !st.complete && !st.loading) this.loadOlder(conv.id);
  }

  fillMessage(li, msg, conv) {
    const own = msg.from === this.me;
    const status = own ? this.status(msg) : null;
    const showFrom = !own && !isDm(conv.id);
    const sig = [
      msg.body,
      status,
      own && status !== 'pending' ? this.statusDetail(msg) : '',
      msg.ts,
      msg.error && msg.error.message,
      showFrom,
      msg.id,
    ].join('\u0001');
    if (this.msgSigs.get(li) === sig) return;
    this.msgSigs.set(li, sig);
    li.className = `msg ${own ? 'own' : 'theirs'}${status === 'failed' ? ' failed' : ''}`;
    li.dataset.key = msg.key;
    if (msg.id) li.dataset.id = msg.id;
    if (msg.seq != null) li.dataset.seq = String(msg.seq);
    li.dataset.from = msg.from;
    if (status) li.dataset.status = status;
    else delete li.dataset.status;
    const body =
      msg.body == null
        ? h('em', { class: 'body unavailable', testid: 'message-body' }, 'This message cannot be shown.')
        : h('div', { class: 'body', testid: 'message-body' }, richText(msg.body));
    const meta = h(
      'div',
      { class: 'meta' },
      h('time', { datetime: new Date(msg.ts).toISOString(), title: new Date(msg.ts).toLocaleString() }, formatTime(msg.ts)),
      own ? this.tickEl(status, msg) : null,
    );
    const failed =
      status === 'failed'
        ? h(
            'div',
            { class: 'failed-note', testid: 'message-failed', role: 'alert' },
            h('span', null, `Not sent — ${msg.error ? msg.error.message : 'unknown error'}`),
            h(
              'span',
              { class: 'failed-actions' },
              h('button', { type: 'button', testid: 'message-retry', onclick: () => this.retry(msg) }, 'Retry'),
              h(
                'button',
                { type: 'button', class: 'secondary', testid: 'message-discard', onclick: () => this.discard(msg) },
                'Discard',
              ),
            ),
          )
        : null;
    li.replaceChildren(
      h(
        'div',
        { class: 'bubble' },
        showFrom ? h('div', { class: 'from', testid: 'message-from' }, msg.from) : null,
        body,
        meta,
      ),
    );
    if (failed) li.append(failed);
    if (!own && msg.id && !msg.seenBy.has(this.me)) this.io.observe(li);
    else this.io.unobserve(li);
  }

  // --- composer -------------------------------------------------------------------

  autosize() {
    const input = this.el.input;
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  updateComposerNote() {
    const n = this.el.input.value.length;
    const note = this.el.composerNote;
    if (n > MAX_BODY) {
      note.hidden = false;
      note.className = 'composer-note over';
      note.textContent = `Too long: ${n.toLocaleString()} / ${MAX_BODY.toLocaleString()} characters`;
    } else if (n > MAX_BODY - 500) {
      note.hidden = false;
      note.className = 'composer-note';
      note.textContent = `${n.toLocaleString()} / ${MAX_BODY.toLocaleString()}`;
    } else {
      note.hidden = true;
      note.textContent = '';
    }
  }
}

function loadSession(expiredToo = false) {
  try {
    const s = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
    // An expired access token is fine while there is a refresh token.
    const fresh = !s || !s.expiresAt || s.expiresAt > Date.now() || s.refresh || expiredToo;
    if (s && s.user && s.token && fresh) return s;
  } catch {
    /* unreadable: log in again */
  }
  sessionStorage.removeItem(SESSION_KEY);
  return null;
}
