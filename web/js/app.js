// The chat client: state, wire protocol handling and rendering.
//
// State lives in plain Maps; every change calls scheduleRender(), which
// redraws the conversation list and the open chat once per frame. Messages
// are keyed "c:<cid>" while they are only ours (optimistic) and "m:<id>"
// when they came from the server; byId and byCid find either.
//
// Replies, reactions, edits and deletions: `send` may carry `reply_to`;
// `react`, `edit` and `delete` requests wait in `actions` (by cid) for their
// `applied` (then they change the message) or `error` (a toast); the
// `reaction`, `edited` and `deleted` events of other members and of our other
// devices are acked, deduplicated by eid and applied with the pure updates of
// events.js.
//
// Groups that change: `members` events are acked and deduplicated the same
// way; they replace a group's members, admins and title (applyMembers), add
// a system line to the chat ("alice added dave"), and when we are no longer a
// member the chat becomes read-only (until a reload drops it from the list).
// The group info panel (groups.js) makes the changes over HTTP.
//
// End-to-end conversations (e2e.js does the keys, epochs and checks): after
// login this profile's device is loaded (or made) and registered before the
// socket's `auth` names it. In an end-to-end conversation a message or an
// edit is encrypted when it is about to go out (`prepare`), so an outbox item
// keeps its plaintext and is sealed again, same cid, when the server answers
// `e2e_stale` (a new epoch) or `e2e_required` (switched elsewhere). What
// arrives with `e2e` is decrypted (`readSealed`): until then, and when it
// fails, the message shows a placeholder and never text, and `seen` is sent
// only for what was shown. The encryption panel (DevicesPanel) shows devices
// and safety numbers; a banner says when a contact's devices changed.

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
import {
  EDIT_WINDOW_MS,
  PALETTE,
  listNames,
  applyDelete,
  applyEdit,
  applyMembers,
  applyReaction,
  canManage,
  quoteOf,
  reactionChips,
  reactionsFromHistory,
} from './events.js';
import { DevicesPanel, E2E, E2EError, placeholderText } from './e2e.js';
import { GroupPanel, USERNAME_RE, parseUsernames } from './groups.js';
import { icons } from './icons.js';
import { resolveWsUrl } from './wsurl.js';

const SESSION_KEY = 'chatd.session';
const OUTBOX_PREFIX = 'chatd.outbox.';
const PAGE = 50;
const MAX_BODY = 4000;
const TYPING_SEND_EVERY_MS = 3000;
const TYPING_SHOW_MS = 6000;
const MAX_IDS = 500; // per ack/seen frame (the server takes up to 1000)
const FLASH_MS = 1600; // how long a message quoted and clicked stays highlighted
const EVENT_OF = { react: 'reaction', edit: 'edited', delete: 'deleted' }; // request -> its event
const DEVICE_WAIT_MS = 2500; // how long the socket waits for the device's registration
const SEAL_TRIES = 3; // e2e_stale / e2e_required answers one message may get before it fails
const DECRYPT_RETRY_MS = 3000; // a message that could not be decrypted for now (network) is tried again

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

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
      groupInfo: $('group-info'),
      e2eInfo: $('e2e-info'),
      chatLock: $('chat-lock'),
      e2eBanner: $('e2e-banner'),
      e2eBannerText: $('e2e-banner-text'),
      e2eBannerCheck: $('e2e-banner-check'),
      e2eBannerDismiss: $('e2e-banner-dismiss'),
      readonly: $('chat-readonly'),
      offlineBanner: $('offline-banner'),
      messages: $('messages'),
      historyStatus: $('history-status'),
      messageList: $('message-list'),
      jump: $('jump-bottom'),
      composer: $('composer'),
      input: $('composer-input'),
      send: $('composer-send'),
      composerNote: $('composer-note'),
      composeContext: $('compose-context'),
      composeContextIcon: $('compose-context-icon'),
      composeContextTitle: $('compose-context-title'),
      composeContextSnippet: $('compose-context-snippet'),
      composeContextCancel: $('compose-context-cancel'),
      confirmDialog: $('confirm-dialog'),
      confirmTitle: $('confirm-title'),
      confirmText: $('confirm-text'),
      confirmOk: $('confirm-ok'),
      confirmCancel: $('confirm-cancel'),
      toasts: $('toasts'),
    };
    this.conn = null;
    this.info = null;
    this.renderQueued = false;
    this.groupPanel = new GroupPanel(this, root);
    this.devicesPanel = new DevicesPanel(this, root);
    this.reset();
    this.bindUi();
  }

  reset() {
    this.me = null;
    this.token = null;
    // This session's end-to-end state (the keys stay in IndexedDB across sessions).
    this.e2e = new E2E({
      getToken: () => this.token,
      onChange: (ev) => {
        this.scheduleRender();
        if (ev.type === 'trust') this.resumeSealed(); // verified or dismissed: paused sends go
        const msg = ev.type === 'replayed' && this.byId.get(ev.id);
        if (msg && msg.sealed) this.showOpened(msg, ev.verdict); // an earlier copy came to light
      },
    });
    this.deviceFixAt = 0;
    // id -> {id, kind, title, members, admins, last_seq, last_ts, unread, provisional,
    //        left, leftNote, membersEseq, membersAt, joined}
    this.convs = new Map();
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
    this.ackEvents = new Set();
    this.seenQueue = new Set();
    this.actions = new Map(); // cid -> {frame, type, id, emoji, on, body}: requests awaiting `applied`
    this.eids = new Set(); // events applied (or answered by `applied`): each counts once
    this.notes = new Map(); // conversation -> [{key, ts, text}]: group changes shown in the chat
    this.compose = null; // {mode: 'reply' | 'edit', id, conversation}: what the composer is doing
    this.paletteFor = null; // key of the message whose reaction palette is open
    this.flashKey = null; // key of the message highlighted after clicking a quote
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
    if (this.el) {
      this.el.convList.replaceChildren();
      this.renderCompose();
      this.groupPanel.close();
      this.devicesPanel.close();
    }
    clearTimeout(this.flushTimer);
    clearTimeout(this.convRefreshTimer);
    clearTimeout(this.settleTimer);
    clearTimeout(this.flashTimer);
    this.flushTimer = 0;
    this.convRefreshTimer = 0;
    this.settleTimer = 0;
    this.lastSeenFlush = 0;
  }

  resetChatDom() {
    this.msgEls = new Map();
    this.noteEls = new Map();
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
    const token = this.token;
    // The socket's `auth` names this profile's device: it waits (a moment)
    // for the device to be loaded and registered.
    this.setupDevice().then(() => {
      if (this.token === token && !this.conn) this.startConnection();
    });
    this.loadConversations();
    this.route();
    this.scheduleRender();
  }

  /**
   * Load (or make) this profile's end-to-end device and register it; waits
   * for the registration DEVICE_WAIT_MS at most (it carries on behind).
   * Never throws: without a device the chat works, end-to-end does not.
   */
  async setupDevice() {
    const e2e = this.e2e;
    try {
      await e2e.load(this.me);
    } catch {
      return; // e2e.failure says why; the panel shows it
    }
    const open = this.openId && this.convs.get(this.openId);
    if (this.isE2E(open)) this.prefetchDevices(open); // opened before the device was there
    const registered = e2e.register().then(
      () => {
        e2e.failure = null;
        if (this.e2e !== e2e) return;
        // Messages that waited for the device go now.
        if (this.conn && this.conn.ready) this.resendOutbox();
        this.scheduleRender();
      },
      (err) => {
        if (this.e2e !== e2e) return;
        e2e.failure = `this device could not be registered: ${errorText(err.code, err.message)}`;
        this.scheduleRender();
      },
    );
    await Promise.race([registered, sleep(DEVICE_WAIT_MS)]);
  }

  /**
   * `ready` did not claim our device (its registration was late, failed, or
   * the device was removed elsewhere): register it (or a new one) and
   * connect again so that `auth` names it. At most every 10 s.
   */
  async claimDevice() {
    const e2e = this.e2e;
    if (!e2e.device || Date.now() - this.deviceFixAt < 10_000) return;
    this.deviceFixAt = Date.now();
    try {
      await e2e.register();
    } catch {
      return;
    }
    if (this.e2e === e2e && this.conn) this.conn.restart();
  }

  /** The person switched this one-to-one conversation on: from the next message on. */
  turnOnE2E(id) {
    this.e2e.want(id);
    const conv = this.convs.get(id);
    if (conv) this.prefetchDevices(conv);
    this.scheduleRender();
  }

  /** Is this conversation end-to-end (on the server, or switched on here)? */
  isE2E(conv) {
    return Boolean(conv && (conv.e2e || this.e2e.isWanted(conv.id)));
  }

  /** Fetch the members' device lists (trust on first use starts here). */
  prefetchDevices(conv) {
    if (!this.e2e.device || conv.provisional) return;
    for (const u of conv.members || []) this.e2e.devicesOf(u).catch(() => {});
  }

  logout({ force = false } = {}) {
    const unsent = this.outbox.length;
    if (
      unsent &&
      !force &&
      !window.confirm(`${unsent} message(s) are not sent yet and will be lost. Log out anyway?`)
    ) {
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
      authFields: () => (this.e2e.deviceId ? { device: this.e2e.deviceId } : {}),
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
      } else if (ev.key === 'Escape' && this.compose) {
        ev.preventDefault();
        this.setCompose(null);
      }
    });
    el.groupInfo.append(icons.info());
    el.groupInfo.addEventListener('click', () => this.openId && this.groupPanel.open(this.openId));
    el.e2eInfo.append(icons.shield());
    el.e2eInfo.addEventListener('click', () => this.openId && this.devicesPanel.open(this.openId));
    el.chatLock.append(icons.lock());
    el.e2eBannerCheck.addEventListener('click', () => this.openId && this.devicesPanel.open(this.openId));
    el.e2eBannerDismiss.addEventListener('click', () => {
      const conv = this.openId && this.convs.get(this.openId);
      for (const u of conv ? this.changedContacts(conv) : []) this.e2e.dismiss(u);
    });
    el.composeContextCancel.addEventListener('click', () => {
      this.setCompose(null);
      el.input.focus();
    });
    // A click anywhere else closes an open reaction palette.
    document.addEventListener('click', (ev) => {
      if (this.paletteFor && !ev.target.closest('.palette, [data-action=react]')) this.togglePalette(null);
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
      this.groupPanel.close();
      this.devicesPanel.close();
      this.compose = null; // a reply or an edit belongs to the chat it started in
      this.paletteFor = null;
      this.renderCompose();
      this.resetChatDom();
      this.unreadMarker = null;
      this.initialScroll = true;
      this.el.input.value = this.drafts.get(id) || '';
      this.autosize();
      this.updateComposerNote();
      const conv = this.convs.get(id);
      if (isDm(id) && !conv.provisional) this.loadPresence(dmPeer(id, this.me));
      if (this.isE2E(conv)) this.prefetchDevices(conv);
      if (window.matchMedia('(min-width: 721px)').matches) this.el.input.focus();
    }
    const st = this.histState(id);
    if (!st.loaded || st.stale) this.loadLatest(id, { refresh: st.loaded });
    this.scheduleRender();
  }

  close() {
    if (this.openId === null) return;
    this.openId = null;
    this.groupPanel.close();
    this.devicesPanel.close();
    this.compose = null;
    this.paletteFor = null;
    this.renderCompose();
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
        if (m.seq > lastSeq && !m.deleted && m.from !== this.me && !m.seenBy.has(this.me)) newer += 1;
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
        Object.assign(conv, {
          title: c.title ?? null,
          members: c.members || [],
          admins: c.admins || [],
          left: false,
        });
      }
      this.convs.set(c.id, conv);
      if (c.last_message) this.ingest({ ...c.last_message, conversation: c.id }, started);
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
    const { names: members, bad } = parseUsernames(form.elements.members.value, this.me);
    const e2e = form.elements.e2e.checked;
    error.textContent = '';
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
        // Without the field the server makes a plain group (what older servers understand).
        body: e2e ? { members, title: title || null, e2e: true } : { members, title: title || null },
      });
      this.convs.set(made.id, {
        id: made.id,
        kind: made.kind || 'group',
        title: made.title ?? null,
        members: made.members,
        admins: made.admins || [this.me],
        last_seq: 0,
        last_ts: 0,
        unread: 0,
        provisional: false,
        created: Date.now(),
        e2e: Boolean(made.e2e),
      });
      if (e2e && !made.e2e) this.toast('bad_request', 'The server made the group without end-to-end encryption.');
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
    if (st.loading || (conv && conv.left)) return; // no history for a former member
    if (conv && conv.provisional) {
      st.loaded = st.complete = true;
      this.scheduleRender();
      return;
    }
    st.loading = true;
    st.stale = false;
    this.scheduleRender();
    const token = this.token;
    const asOf = Date.now();
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
      for (const m of page) this.ingest({ ...m, conversation: m.conversation || id }, asOf);
      if (!st.loaded) {
        st.oldest = page.length ? page[0].seq : null;
        st.complete = page.length < PAGE || (page.length > 0 && page[0].seq === 1);
      }
      st.loaded = true;
    } catch (err) {
      if (err.status === 404) st.loaded = st.complete = true;
      else if (err.status === 403 && conv && conv.kind === 'group') this.noLongerMember(conv);
      else this.apiFailed(err);
    } finally {
      st.loading = false;
      this.scheduleRender();
    }
  }

  async loadOlder(id) {
    const st = this.histState(id);
    if (!st.loaded || st.complete || st.loading || st.oldest == null) return;
    if (this.convs.get(id)?.left) return;
    st.loading = true;
    this.scheduleRender();
    const token = this.token;
    const asOf = Date.now();
    try {
      const data = await api(
        `/api/conversations/${encodeURIComponent(id)}/messages?before=${st.oldest}&limit=${PAGE}`,
        { token },
      );
      if (token !== this.token) return;
      const page = data.messages;
      for (const m of page) this.ingest({ ...m, conversation: m.conversation || id }, asOf);
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

  /**
   * Take a server message (history, live frame, list summary); merges by id.
   * History names our own messages' `cid`: a pending copy with that cid is
   * the same message, settled here (no `sent` needed any more). `asOf` is
   * when the snapshot was asked for: state that events changed since then is
   * newer than the snapshot and kept.
   */
  ingest(m, asOf = Date.now()) {
    let msg = this.byId.get(m.id);
    if (m.cid && m.from === this.me) {
      const pending = this.byCid.get(m.cid);
      if (pending && pending !== msg && !pending.id) {
        this.settle(pending, m);
        msg = this.byId.get(m.id);
      }
    }
    let fresh = false;
    if (!msg) {
      fresh = true;
      msg = {
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
        deleted: false,
        reactions: new Map(),
        touched: 0,
        deliveredTo: new Set(),
        seenBy: new Set(),
        state: 'stored',
        error: null,
        order: ++this.order,
      };
      this.byId.set(m.id, msg);
      this.convMsgs(m.conversation).set(msg.key, msg);
    }
    if (m.cid && !msg.cid) msg.cid = m.cid;
    if (m.reply_to && !msg.replyTo) msg.replyTo = m.reply_to;
    if (m.e2e) {
      const conv = this.convs.get(m.conversation);
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
        this.readSealed(msg, m.e2e, { editOf: m.edited_ts ? m.id : null, ts: m.edited_ts || m.ts });
      }
      if (Array.isArray(m.reactions)) {
        msg.reactions = reactionsFromHistory(m.reactions, this.me, this.dmPeerOf(m.conversation));
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
   * Decrypt a message's `e2e` object (or, with `editOf`, an edit's) into
   * `msg.body`. Until it is done the message shows "decrypting", and when it
   * fails a placeholder saying why (`e2eError`), never text. `ts` is when
   * the content was made (for "sent before this device was added").
   */
  readSealed(msg, e2e, { editOf = null, ts = msg.ts } = {}) {
    const input = { id: msg.id, conversation: msg.conversation, from: msg.from, seq: msg.seq, ts, e2e };
    msg.sealed = true;
    const same = msg.e2eInput && this.e2e.cacheKey(msg.e2eInput) === this.e2e.cacheKey(input);
    if (same) return; // this version is read already, or being read
    msg.e2eInput = input;
    const known = this.e2e.peek(input);
    if (known) {
      this.showOpened(msg, known);
      return;
    }
    if (msg.body == null) msg.e2eState = 'pending';
    this.e2e.open(input, { editOf }).then((result) => {
      if (msg.e2eInput !== input || msg.deleted) return; // a newer version came meanwhile
      const r = this.e2e.peek(input) || result; // taken back meanwhile (a replay) wins
      if (r.retry) {
        // Not tried (the network): once more in a moment.
        setTimeout(() => {
          if (msg.e2eInput !== input || this.byId.get(msg.id) !== msg) return; // replaced, or logged out
          msg.e2eInput = null;
          this.readSealed(msg, e2e, { editOf, ts });
        }, DECRYPT_RETRY_MS);
        return;
      }
      this.showOpened(msg, r);
      this.scheduleRender();
      this.reportSeen(); // shown now: it may be seen
    });
  }

  showOpened(msg, r) {
    if (r.body != null) Object.assign(msg, { body: r.body, e2eState: 'ok', e2eError: null, e2eReason: null });
    else {
      const reason = r.unavailable ? 'unavailable' : r.before ? 'before' : r.reason;
      Object.assign(msg, { body: null, e2eState: 'failed', e2eError: placeholderText(r), e2eReason: reason });
    }
  }

  /** The other member of a one-to-one chat; null for a group. */
  dmPeerOf(id) {
    return isDm(id) ? dmPeer(id, this.me) : null;
  }

  /**
   * Who a message of ours was for: the other members, less those seen
   * joining after it (they cannot read it).
   */
  recipients(msg) {
    const conv = this.convs.get(msg.conversation);
    if (!conv) return [];
    const joined = conv.joined || {};
    return this.others(conv).filter((u) => !(joined[u] > msg.ts));
  }

  /** pending | failed | sent | delivered | seen — for our own messages. */
  status(msg) {
    if (msg.state === 'pending' || msg.state === 'failed') return msg.state;
    const others = this.recipients(msg);
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
    const conv = this.openId && this.convs.get(this.openId);
    if (!body.trim() || !conv || conv.left) return;
    if (body.length > MAX_BODY) {
      this.updateComposerNote();
      return;
    }
    if (this.isE2E(conv)) {
      const paused = this.pausedBy(conv);
      if (paused.length) {
        this.composerRefusal(
          `Not sent: ${listNames(paused)}'s devices changed since you verified them. Check the new safety number first.`,
        );
        return;
      }
      if (!this.e2e.device) {
        this.composerRefusal(`Not sent: ${this.e2e.failure || 'end-to-end encryption is not ready on this device'}.`);
        return;
      }
    }
    if (this.compose && this.compose.mode === 'edit') {
      this.submitEdit(body);
      return;
    }
    const replyTo = this.compose && this.compose.mode === 'reply' ? this.compose.id : null;
    this.send(this.openId, body, replyTo);
    this.compose = null;
    this.renderCompose();
    this.el.input.value = '';
    this.drafts.delete(this.openId);
    this.autosize();
    this.updateComposerNote();
    this.el.input.focus();
  }

  frameFor(conv, cid, body, replyTo = null) {
    const frame = { type: 'send', cid, body };
    if (conv.provisional) frame.to = dmPeer(conv.id, this.me);
    else frame.conversation = conv.id;
    if (replyTo) frame.reply_to = replyTo;
    return frame;
  }

  /** Say under the composer why what was typed did not go (it stays there). */
  composerRefusal(text) {
    const note = this.el.composerNote;
    note.hidden = false;
    note.className = 'composer-note over';
    note.textContent = text;
  }

  /** A message of ours, not yet stored (sent now, or restored from the outbox). */
  localMessage({ cid, conversation, body, ts, afterSeq, replyTo, sealed = false }) {
    const msg = {
      afterSeq,
      key: `c:${cid}`,
      id: null,
      cid,
      conversation,
      seq: null,
      from: this.me,
      body,
      ts,
      replyTo: replyTo || null,
      editedTs: null,
      deleted: false,
      reactions: new Map(),
      touched: 0,
      deliveredTo: new Set(),
      seenBy: new Set(),
      state: 'pending',
      error: null,
      order: ++this.order,
      // End-to-end: the text is ours (typed here), sealed when it goes out.
      sealed,
      e2eState: sealed ? 'ok' : null,
    };
    this.convMsgs(conversation).set(msg.key, msg);
    this.byCid.set(cid, msg);
    return msg;
  }

  send(convId, body, replyTo = null) {
    const conv = this.convs.get(convId);
    const cid = randomId('w');
    const afterSeq = this.maxSeq(convId);
    const sealed = this.isE2E(conv);
    const msg = this.localMessage({ cid, conversation: convId, body, ts: Date.now(), afterSeq, replyTo, sealed });
    const item = this.outboxItem(conv, msg);
    this.outbox.push(item);
    this.saveOutbox();
    this.dispatch(item);
    if (convId === this.openId) this.scrollMode = 'bottom';
    this.scheduleRender();
  }

  /**
   * The outbox entry of a message of ours: its `send` frame, or (end-to-end)
   * its plaintext, sealed into a frame when it goes out (`prepare`).
   */
  outboxItem(conv, msg) {
    const item = { cid: msg.cid, conversation: msg.conversation, frame: null, ts: msg.ts, afterSeq: msg.afterSeq };
    if (msg.sealed) Object.assign(item, { sealed: true, body: msg.body, replyTo: msg.replyTo });
    else item.frame = this.frameFor(conv, msg.cid, msg.body, msg.replyTo);
    return item;
  }

  /** Send an outbox item: a plain one as it is, an end-to-end one once sealed. */
  dispatch(item) {
    if (item.sealed && !item.frame) this.prepare(item);
    else if (this.conn) this.conn.send(item.frame);
  }

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
      item.frame = { type: 'send', cid: item.cid, conversation: conv.id, e2e };
      if (item.replyTo) item.frame.reply_to = item.replyTo;
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
  }

  /** One of our messages will not go: it shows "Not sent" with why, and Retry. */
  sendFailed(cid, code, message) {
    this.removeFromOutbox(cid);
    const msg = this.byCid.get(cid);
    if (msg && msg.state !== 'stored') {
      msg.state = 'failed';
      msg.error = { code, message: errorText(code, message) };
      this.scheduleRender();
    }
  }

  /** Sending was paused (a contact to check) or waited for the device: go on. */
  resumeSealed() {
    for (const item of this.outbox) if (item.sealed && !item.frame) this.prepare(item);
    for (const [cid, action] of this.actions) if (action.sealed && !action.frame) this.prepareEdit(cid, action);
  }

  /** Contacts in an end-to-end conversation whose devices changed since last checked. */
  changedContacts(conv) {
    if (!this.isE2E(conv) || conv.left) return [];
    return this.others(conv).filter((u) => this.e2e.trustOf(u).changed);
  }

  /** Contacts the person had verified whose devices changed since: sending to them waits. */
  pausedBy(conv) {
    if (!this.isE2E(conv)) return [];
    return this.others(conv).filter((u) => this.e2e.trustOf(u).blocked);
  }

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
    target.sealTries = (target.sealTries || 0) + 1;
    if (target.sealTries > SEAL_TRIES) return false;
    if (f.reason === 'e2e_required') conv.e2e = true;
    else this.e2e.markStale(conv.id);
    if (item) {
      if (!item.sealed) {
        Object.assign(item, { sealed: true, body: item.frame.body, replyTo: item.frame.reply_to || null });
        const msg = this.byCid.get(item.cid);
        if (msg) Object.assign(msg, { sealed: true, e2eState: 'ok' });
      }
      item.frame = null;
      this.saveOutbox();
      this.prepare(item);
    } else {
      Object.assign(action, { sealed: true, frame: null });
      this.prepareEdit(f.cid, action);
    }
    this.scheduleRender();
    return true;
  }

  /** Send a failed message again, with the same cid: it can never be stored twice. */
  retry(msg) {
    const conv = this.convs.get(msg.conversation);
    if (!conv || msg.state !== 'failed') return;
    msg.state = 'pending';
    msg.error = null;
    // The message it answered was deleted meanwhile: send it as a plain message.
    const original = msg.replyTo && this.byId.get(msg.replyTo);
    if (original && original.deleted) msg.replyTo = null;
    if (this.isE2E(conv)) Object.assign(msg, { sealed: true, e2eState: 'ok' });
    const item = this.outboxItem(conv, msg);
    this.outbox.push(item);
    this.saveOutbox();
    this.dispatch(item);
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
    // What is kept: the frame, or (end-to-end, not sealed yet) the text; never the working flags.
    const items = this.outbox.map(({ cid, conversation, frame, ts, afterSeq, sealed, body, replyTo }) => ({
      cid,
      conversation,
      frame,
      ts,
      afterSeq,
      sealed,
      body,
      replyTo,
    }));
    if (items.length) sessionStorage.setItem(key, JSON.stringify(items));
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
      if (!item || !item.cid || !(item.frame || (item.sealed && typeof item.body === 'string'))) continue;
      if (isDm(item.conversation)) this.provisionalDm(dmPeer(item.conversation, this.me));
      else this.ensureConv(item.conversation);
      this.localMessage({
        cid: item.cid,
        conversation: item.conversation,
        body: item.sealed ? item.body : item.frame.body,
        ts: item.ts || Date.now(),
        afterSeq: item.afterSeq || 0,
        replyTo: item.sealed ? item.replyTo : item.frame.reply_to,
        sealed: Boolean(item.sealed),
      });
      this.outbox.push(item);
    }
  }

  /** After `ready`: everything not yet confirmed goes again, same cid (no doubles). */
  resendOutbox() {
    const items = [...this.outbox];
    // Pace a long queue a little so the server's rate limit is not hit.
    items.forEach((item, i) => {
      const send = () => {
        if (this.outbox.includes(item)) this.dispatch(item);
      };
      if (i < 40) send();
      else setTimeout(send, (i - 39) * 60);
    });
  }

  sendTyping() {
    const id = this.openId;
    // While editing, the composer holds the message being edited, not a draft.
    if (this.compose && this.compose.mode === 'edit') return;
    if (id) this.drafts.set(id, this.el.input.value);
    const conv = id && this.convs.get(id);
    if (!conv || conv.provisional || conv.left || !this.el.input.value.trim() || !this.conn) return;
    const now = Date.now();
    if (now - (this.lastTypingSent.get(id) || 0) < TYPING_SEND_EVERY_MS) return;
    if (this.conn.send({ type: 'typing', conversation: id })) this.lastTypingSent.set(id, now);
  }

  // --- replies, reactions, edits, deletions -----------------------------------------

  /**
   * What a person may do with a message here: reply, react, edit, delete
   * (their own; a group's admins others' too). Nothing once no longer a member.
   */
  actionsFor(msg, conv) {
    if (!msg.id || msg.deleted || !conv || conv.provisional || conv.left) return [];
    const acts = ['reply', 'react'];
    if (msg.from === this.me) {
      // The server's edit window is 48 h by default; it has the last word.
      if (msg.body != null && Date.now() - msg.ts < EDIT_WINDOW_MS) acts.push('edit');
      acts.push('delete');
    } else if (canManage(conv, this.me)) acts.push('delete');
    return acts;
  }

  /** Send a react/edit/delete request; it waits in `actions` for its answer. */
  request(type, msg, fields) {
    const cid = randomId('a');
    const frame = { type, cid, id: msg.id, ...fields };
    this.actions.set(cid, { frame, type, id: msg.id, conversation: msg.conversation, ...fields });
    if (this.conn) this.conn.send(frame); // else after the next `ready`
    return cid;
  }

  toggleReaction(msg, emoji) {
    const r = msg.reactions.get(emoji);
    const on = !(r && r.users.has(this.me));
    const keyboard = this.paletteFor === msg.key && document.activeElement?.matches(':focus-visible');
    this.paletteFor = null;
    this.request('react', msg, { emoji, on });
    if (!keyboard) {
      this.scheduleRender();
      return;
    }
    // Picked from the palette with the keyboard: back to the React button.
    this.renderNow();
    this.msgEls.get(msg.key)?.querySelector('[data-action=react]')?.focus();
  }

  /** Our own request is stored: apply it as the event it became. */
  onApplied(f) {
    const action = this.actions.get(f.cid);
    this.actions.delete(f.cid);
    if (!action || (f.eid && this.eids.has(f.eid))) return;
    if (f.eid) this.eids.add(f.eid);
    this.applyEvent(EVENT_OF[action.type], { ...action, id: f.id || action.id, by: this.me, ts: f.ts });
  }

  /** A reaction, edited, deleted or members event: ack it (copies too), apply it once. */
  onEvent(f) {
    if (typeof f.eid === 'string' && f.eid) {
      this.ackEvents.add(f.eid);
      this.flushSoon();
      if (this.eids.has(f.eid)) return;
      this.eids.add(f.eid);
    }
    if (f.type === 'members') this.applyMembersEvent(f);
    else this.applyEvent(f.type, f);
  }

  /**
   * Our own change of a group is stored (the HTTP answer: the group after
   * it, with the eid of the `members` event it became): apply it as that
   * event, once, whichever of the two comes first.
   */
  groupChanged(answer, action, users) {
    if (answer.eid) {
      if (this.eids.has(answer.eid)) return;
      this.eids.add(answer.eid);
    }
    this.applyMembersEvent({
      type: 'members',
      eid: answer.eid,
      conversation: answer.id,
      eseq: answer.eseq,
      by: this.me,
      ts: Date.now(),
      action,
      users,
      members: answer.members,
      admins: answer.admins,
      title: answer.title,
    });
  }

  /**
   * A group changed: its members, admins and title are now the event's; the
   * chat gets a line saying what happened. A group we were added to joins the
   * list; one we are no longer in becomes read-only (and stays until a reload).
   */
  applyMembersEvent(f) {
    if (typeof f.conversation !== 'string' || !Array.isArray(f.members)) return;
    let conv = this.convs.get(f.conversation);
    if (!conv) {
      if (!f.members.includes(this.me)) return; // added and removed again meanwhile
      conv = this.ensureConv(f.conversation); // and the list is asked for again
      conv.created = f.ts || Date.now();
    }
    const { changed, wasMember, member, lines } = applyMembers(conv, f, this.me);
    const notes = this.notes.get(conv.id) || [];
    const ts = f.ts || Date.now();
    lines.forEach((text, i) => notes.push({ note: true, key: `n:${f.eid || randomId()}:${i}`, ts, text }));
    this.notes.set(conv.id, notes);
    if (changed) {
      conv.membersAt = Date.now();
      // New members' devices (the next epoch goes to them too) in the panel.
      if (this.devicesPanel.isOpen && this.devicesPanel.convId === conv.id) this.devicesPanel.refresh();
      const typing = this.typing.get(conv.id);
      for (const u of typing ? [...typing.keys()] : []) if (!conv.members.includes(u)) typing.delete(u);
      if (wasMember && !member) this.noLongerMember(conv, lines[0]);
      else if (!wasMember && member) {
        // (Back) in: its history and the list's counts are to be fetched.
        conv.leftNote = null;
        this.histState(conv.id).stale = true;
        if (this.openId === conv.id) this.loadLatest(conv.id, { refresh: true });
        this.refreshConversationsSoon();
      }
    }
    this.scheduleRender();
  }

  /** Removed, or left: the chat stays on screen, read-only, until a reload. */
  noLongerMember(conv, why = 'You are no longer a member') {
    conv.left = true;
    conv.leftNote = why;
    this.typing.delete(conv.id);
    if (this.openId === conv.id) {
      this.paletteFor = null;
      if (this.compose) this.setCompose(null);
    }
    this.scheduleRender();
  }

  /**
   * Change a message as event `type` says. A message not held here is left
   * alone: its history, when loaded, already shows the latest state.
   */
  applyEvent(type, f) {
    const msg = this.byId.get(f.id);
    if (!msg) return;
    let changed = false;
    if (type === 'reaction') {
      if (msg.deleted || typeof f.emoji !== 'string') return;
      const conv = this.convs.get(msg.conversation);
      const members = conv && conv.members && conv.members.length ? conv.members.length : Infinity;
      changed = applyReaction(msg.reactions, f.by, f.emoji, f.on !== false, members);
    } else if (type === 'edited' && f.e2e) {
      // End-to-end: the new text is shown once it decrypts (checked as an edit of this message).
      if (msg.deleted || (msg.editedTs && f.ts && f.ts < msg.editedTs)) return;
      msg.editedTs = f.ts || Date.now();
      this.readSealed(msg, f.e2e, { editOf: msg.id, ts: f.ts || msg.ts });
      changed = true;
    } else if (type === 'edited') {
      changed = applyEdit(msg, f.body, f.ts);
    } else if (type === 'deleted') {
      changed = applyDelete(msg);
      if (changed) this.forgetDeleted(msg, f.by);
    }
    if (!changed) return;
    msg.touched = Date.now();
    this.scheduleRender();
  }

  /** A message was deleted (by `by`): the composer and the palette let go of it. */
  forgetDeleted(msg, by) {
    if (this.paletteFor === msg.key) this.paletteFor = null;
    if (!this.compose || this.compose.id !== msg.id) return;
    const editing = this.compose.mode === 'edit';
    this.setCompose(null, { keepText: !editing }); // a reply being written stays, as a plain message
    if (by !== this.me) {
      const what = editing ? 'editing' : 'replying to';
      this.toast('not_found', `The message you were ${what} was deleted.`);
    }
  }

  /**
   * A request was refused (the toast says why). An edit that may work when
   * tried again (not a forbidden or vanished message) comes back to the composer.
   */
  actionFailed(cid, code) {
    const action = this.actions.get(cid);
    this.actions.delete(cid);
    if (action.type !== 'edit' || code === 'forbidden' || code === 'not_found') return;
    const msg = this.byId.get(action.id);
    if (msg && !msg.deleted && msg.conversation === this.openId && !this.compose && !this.el.input.value) {
      this.startEdit(msg, action.body);
    }
  }

  startReply(msg) {
    this.setCompose({ mode: 'reply', id: msg.id, conversation: msg.conversation }, { keepText: true });
    this.el.input.focus();
  }

  startEdit(msg, text = msg.body) {
    this.setCompose({ mode: 'edit', id: msg.id, conversation: msg.conversation });
    this.el.input.value = text;
    this.autosize();
    this.updateComposerNote();
    this.el.input.focus();
    this.el.input.setSelectionRange(text.length, text.length);
  }

  /**
   * Set what the composer does (null: write a new message). Leaving an edit
   * puts the draft back in the composer, unless `keepText`.
   */
  setCompose(compose, { keepText = false } = {}) {
    const wasEditing = this.compose && this.compose.mode === 'edit';
    this.compose = compose;
    if (wasEditing && !keepText) {
      this.el.input.value = (this.openId && this.drafts.get(this.openId)) || '';
      this.autosize();
      this.updateComposerNote();
    }
    this.renderCompose();
  }

  submitEdit(body) {
    const msg = this.byId.get(this.compose.id);
    this.setCompose(null);
    if (!msg || msg.deleted || body === msg.body) return;
    const conv = this.convs.get(msg.conversation);
    if (this.isE2E(conv)) this.requestSealedEdit(msg, body);
    else this.request('edit', msg, { body });
  }

  /** An edit in an end-to-end conversation: {t: "edit", id, body} sealed, then sent. */
  requestSealedEdit(msg, body) {
    const cid = randomId('a');
    const action = { frame: null, type: 'edit', id: msg.id, body, sealed: true, conversation: msg.conversation };
    this.actions.set(cid, action);
    this.prepareEdit(cid, action);
    return cid;
  }

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
  }

  /**
   * Ask in the page (a modal <dialog>; window.confirm is not used): resolves
   * true when the person confirms, false on Cancel or Escape.
   */
  confirm({ title, text, ok }) {
    const el = this.el;
    const dialog = el.confirmDialog;
    if (dialog.open) return Promise.resolve(false);
    el.confirmTitle.textContent = title;
    el.confirmText.textContent = text;
    el.confirmOk.textContent = ok;
    return new Promise((resolve) => {
      const done = (value) => {
        el.confirmOk.onclick = el.confirmCancel.onclick = dialog.onclose = null;
        if (dialog.open) dialog.close();
        resolve(value);
      };
      el.confirmOk.onclick = () => done(true);
      el.confirmCancel.onclick = () => done(false);
      dialog.onclose = () => done(false); // Escape
      dialog.showModal();
      el.confirmCancel.focus();
    });
  }

  /** Ask first, then delete for everyone (an admin may delete others' messages). */
  async confirmDelete(msg) {
    const own = msg.from === this.me;
    const ok = await this.confirm({
      title: own ? 'Delete this message?' : `Delete ${msg.from}'s message?`,
      text: 'It is deleted for everyone in the conversation.',
      ok: 'Delete',
    });
    if (ok && msg.id && !msg.deleted) this.request('delete', msg, {});
  }

  togglePalette(key) {
    this.paletteFor = key && this.paletteFor !== key ? key : null;
    this.renderNow();
    const li = key && this.msgEls.get(key);
    if (this.paletteFor && li) li.querySelector('.palette button')?.focus();
  }

  /** Scroll to a message quoted by a reply, and highlight it for a moment. */
  jumpTo(id) {
    const msg = this.byId.get(id);
    const li = msg && this.msgEls.get(msg.key);
    if (!li) return;
    li.scrollIntoView({ block: 'center' });
    li.focus({ preventScroll: true });
    this.flashKey = msg.key;
    this.renderNow();
    clearTimeout(this.flashTimer);
    this.flashTimer = setTimeout(() => {
      this.flashKey = null;
      this.scheduleRender();
    }, FLASH_MS);
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
      if (!msg || !msg.id || msg.deleted || msg.from === this.me || msg.seenBy.has(this.me)) continue;
      // End-to-end: seen means its text was shown (not a placeholder).
      if (msg.sealed && msg.e2eState !== 'ok') continue;
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
      case 'applied':
        return this.onApplied(f);
      case 'reaction':
      case 'edited':
      case 'deleted':
      case 'members':
        return this.onEvent(f);
      case 'devices':
        return this.onDevices(f);
      case 'error':
        return this.onError(f);
      default:
        return undefined; // frames this client does not know are ignored
    }
  }

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
    this.settle(msg, f);
  }

  /**
   * Our message `msg` (pending or failed) is stored as `f` {id, conversation,
   * seq, ts}: from its `sent`, or from history naming its cid.
   */
  settle(msg, f) {
    this.removeFromOutbox(msg.cid);
    const existing = this.byId.get(f.id);
    if (existing && existing !== msg) {
      // It already reached us another way (history): one copy only.
      this.convMsgs(msg.conversation).delete(msg.key);
      existing.cid = msg.cid;
      this.byCid.set(msg.cid, existing);
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
    if (msg.sealed) conv.e2e = true; // our first end-to-end message was the switch
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
  }

  onPresence(f) {
    this.presence.set(f.user, { online: f.online, last_seen: f.last_seen });
    if (!f.online) {
      for (const map of this.typing.values()) map.delete(f.user);
    }
    this.scheduleRender();
  }

  onError(f) {
    // An end-to-end refusal of ours is no error to show: sealed again and resent.
    if (f.cid && (f.reason === 'e2e_stale' || f.reason === 'e2e_required') && this.sealAgain(f)) return;
    if (f.cid && this.actions.has(f.cid)) this.actionFailed(f.cid, f.code);
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

  /** Render at once (when focus has to move to something just drawn). */
  renderNow() {
    this.renderQueued = false;
    this.render();
  }

  render() {
    if (!this.me) return;
    this.renderList();
    this.renderChat();
    this.groupPanel.render();
    this.devicesPanel.render();
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
    if (conv.left) {
      preview = h('em', { class: 'conv-left' }, conv.leftNote || 'You are no longer a member');
    } else if (typing.length) {
      preview = h('span', { class: 'typing' }, dm ? 'typing…' : `${typing.join(', ')} typing…`);
    } else if (last) {
      const own = last.from === this.me;
      const status = own ? this.status(last) : null;
      preview = [
        own && !last.deleted ? this.tickEl(status, last) : null,
        !own && !dm ? h('span', { class: 'preview-from' }, `${last.from}: `) : null,
        last.deleted
          ? h('em', null, 'message deleted')
          : last.body == null
            ? h('em', null, this.sealedText(last) || 'message unavailable')
            : last.body.replace(/\s+/g, ' '),
      ];
    } else preview = h('em', null, conv.provisional ? 'New conversation' : 'No messages yet');
    const stamp = last ? formatStamp(last.ts) : '';
    const e2e = this.isE2E(conv);
    const sig = JSON.stringify([
      title,
      e2e,
      last && [last.key, last.body, last.deleted, last.ts, last.from === this.me && this.status(last), last.e2eError],
      typing,
      online,
      conv.unread,
      conv.id === this.openId,
      stamp,
      conv.provisional,
      conv.left && conv.leftNote,
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
          e2e ? this.lockEl('conv-lock', 'conv-lock') : null,
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

  /** The lock of an end-to-end conversation (list, header) or message. */
  lockEl(cls, testid, label = 'End-to-end encrypted') {
    return h('span', { class: `lock ${cls}`, testid, title: label, role: 'img', 'aria-label': label }, icons.lock());
  }

  /** What a sealed message without text shows: "decrypting…" or why it cannot be shown. */
  sealedText(msg) {
    if (!msg.sealed) return null;
    return msg.e2eState === 'failed' ? msg.e2eError : 'decrypting…';
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
    el.groupInfo.hidden = dm;
    this.renderE2E(conv);
    // A former member reads what is here, and writes nothing more.
    el.composer.hidden = Boolean(conv.left);
    el.readonly.hidden = !conv.left;
    if (this.compose) this.renderCompose(); // the quoted message may have changed

    // Messages.
    const box = el.messages;
    const st = this.histState(conv.id);
    const fromBottom = box.scrollHeight - box.scrollTop;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const list = this.sortedMessages(conv.id);
    if (this.initialScroll && st.loaded && !this.unreadMarker) {
      const first = list.find((m) => m.id && !m.deleted && m.from !== this.me && !m.seenBy.has(this.me));
      this.unreadMarker = first ? first.key : '';
    }
    el.historyStatus.textContent = st.loading
      ? 'Loading…'
      : st.loaded && st.complete
        ? list.length
          ? 'This is the start of the conversation.'
          : conv.left
            ? ''
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
    for (const msg of this.timeline(conv.id, list)) {
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
      if (msg.note) {
        place(this.noteEl(msg));
        continue;
      }
      let li = this.msgEls.get(msg.key);
      if (!li) {
        li = h('li', { testid: 'message', tabindex: '-1', dataset: { key: msg.key } });
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

  /** The header's lock, the composer's placeholder and the banner about changed devices. */
  renderE2E(conv) {
    const el = this.el;
    const on = this.isE2E(conv);
    el.chatLock.hidden = !on;
    el.chatLock.dataset.state = conv.e2e ? 'on' : 'next';
    const label = conv.e2e
      ? "End-to-end encrypted: only the members' devices can read these messages"
      : 'End-to-end encryption is on from your next message';
    el.chatLock.title = label;
    el.chatLock.setAttribute('aria-label', label);
    if (!this.compose) {
      const placeholder = on ? 'Write an encrypted message' : 'Write a message';
      if (el.input.placeholder !== placeholder) el.input.placeholder = placeholder;
    }
    const changed = this.changedContacts(conv);
    el.e2eBanner.hidden = !changed.length;
    if (!changed.length) return;
    const paused = this.pausedBy(conv);
    el.e2eBanner.dataset.paused = String(paused.length > 0);
    el.e2eBannerText.textContent = paused.length
      ? `${listNames(paused)}'s devices changed since you verified them. Sending is paused until you check the new safety number.`
      : `${listNames(changed)}'s devices changed. Check the safety number if it matters who reads this.`;
  }

  /** The messages and the lines about group changes, in order (a line before the first message after it). */
  timeline(id, list) {
    const notes = [...(this.notes.get(id) || [])].sort((a, b) => a.ts - b.ts);
    if (!notes.length) return list;
    const out = [];
    let n = 0;
    for (const msg of list) {
      while (n < notes.length && msg.ts > notes[n].ts) out.push(notes[n++]);
      out.push(msg);
    }
    return out.concat(notes.slice(n));
  }

  /** A line about a group change ("alice added dave"), centred in the chat. */
  noteEl(note) {
    let li = this.noteEls.get(note.key);
    if (!li) {
      li = h('li', { class: 'sys-note', testid: 'system-note' }, h('span', null, note.text));
      this.noteEls.set(note.key, li);
    }
    return li;
  }

  fillMessage(li, msg, conv) {
    const own = msg.from === this.me;
    const deleted = Boolean(msg.deleted);
    const status = own && !deleted ? this.status(msg) : null;
    const showFrom = !own && !isDm(conv.id);
    const quote = msg.replyTo ? quoteOf(this.byId.get(msg.replyTo)) : null;
    const chips = reactionChips(msg.reactions, this.me);
    const actions = this.actionsFor(msg, conv);
    const palette = this.paletteFor === msg.key && actions.includes('react');
    li.className =
      `msg ${own ? 'own' : 'theirs'}${status === 'failed' ? ' failed' : ''}` +
      `${deleted ? ' deleted' : ''}${this.flashKey === msg.key ? ' flash' : ''}`;
    const sig = [
      msg.body,
      status,
      own && status !== 'pending' ? this.statusDetail(msg) : '',
      msg.ts,
      msg.error && msg.error.message,
      showFrom,
      msg.id,
      deleted,
      msg.editedTs,
      msg.sealed,
      msg.e2eError,
      JSON.stringify([quote, chips, actions, palette]),
    ].join('\u0001');
    if (this.msgSigs.get(li) === sig) return;
    this.msgSigs.set(li, sig);
    li.dataset.key = msg.key;
    if (msg.id) li.dataset.id = msg.id;
    if (msg.seq != null) li.dataset.seq = String(msg.seq);
    li.dataset.from = msg.from;
    if (status) li.dataset.status = status;
    else delete li.dataset.status;
    if (deleted) li.dataset.deleted = 'true';
    else delete li.dataset.deleted;
    if (msg.sealed) li.dataset.e2e = 'true';
    else delete li.dataset.e2e;
    let body;
    if (deleted) body = h('em', { class: 'body deleted', testid: 'message-deleted' }, 'message deleted');
    else if (msg.body == null && msg.sealed) {
      // Never any text of a message that did not pass every check: why, instead.
      body =
        msg.e2eState === 'failed'
          ? h(
              'em',
              { class: 'body undecryptable', testid: 'message-undecryptable', dataset: { reason: msg.e2eReason || '' } },
              msg.e2eError,
            )
          : h('em', { class: 'body decrypting', testid: 'message-decrypting' }, 'Decrypting…');
    } else if (msg.body == null) {
      body = h('em', { class: 'body unavailable', testid: 'message-body' }, 'This message cannot be shown.');
    } else body = h('div', { class: 'body', testid: 'message-body' }, richText(msg.body));
    const edited =
      msg.editedTs && !deleted
        ? h(
            'span',
            { class: 'edited', testid: 'message-edited', title: `Edited ${new Date(msg.editedTs).toLocaleString()}` },
            'edited',
          )
        : null;
    const meta = h(
      'div',
      { class: 'meta' },
      msg.sealed && !deleted ? this.lockEl('msg-lock', 'message-lock') : null,
      edited,
      h('time', { datetime: new Date(msg.ts).toISOString(), title: new Date(msg.ts).toLocaleString() }, formatTime(msg.ts)),
      status ? this.tickEl(status, msg) : null,
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
    const parts = [
      h(
        'div',
        { class: 'bubble' },
        showFrom ? h('div', { class: 'from', testid: 'message-from' }, msg.from) : null,
        quote && !deleted ? this.quoteEl(msg, quote) : null,
        body,
        meta,
      ),
      actions.length ? this.actionsEl(msg, actions, palette) : null,
      palette ? this.paletteEl(msg) : null,
      chips.length && !deleted ? this.chipsEl(msg, chips) : null,
      failed,
    ];
    // Redrawn under the keyboard: the focus stays on the same control.
    const active = li.contains(document.activeElement) && li !== document.activeElement ? document.activeElement : null;
    const testid = active && active.getAttribute('data-testid');
    li.replaceChildren(...parts.filter(Boolean));
    if (testid) {
      const emoji = active.dataset.emoji ? `[data-emoji="${CSS.escape(active.dataset.emoji)}"]` : '';
      const again = li.querySelector(`[data-testid="${testid}"]${emoji}`);
      if (again) again.focus({ preventScroll: true });
    }
    if (!own && msg.id && !deleted && !msg.seenBy.has(this.me)) this.io.observe(li);
    else this.io.unobserve(li);
  }

  /** The quote of the message a reply answers; a button to it when it is here. */
  quoteEl(msg, quote) {
    const from = quote.from === this.me ? 'You' : quote.from;
    const parts = [
      from ? h('span', { class: 'quote-from', testid: 'quote-from' }, from) : null,
      h('span', { class: 'quote-text', testid: 'quote-text' }, quote.text),
    ];
    const props = { class: `quote quote-${quote.state}`, testid: 'message-quote', dataset: { state: quote.state } };
    if (quote.state !== 'ok') return h('div', props, parts); // nothing to show there
    return h(
      'button',
      {
        ...props,
        type: 'button',
        'aria-label': `In reply to ${from}: ${quote.text}. Show the message.`,
        onclick: () => this.jumpTo(msg.replyTo),
      },
      parts,
    );
  }

  /** The message's action buttons (shown on hover or focus). */
  actionsEl(msg, actions, paletteOpen) {
    const spec = {
      reply: { icon: icons.reply, label: 'Reply', run: () => this.startReply(msg) },
      react: { icon: icons.react, label: 'React', run: () => this.togglePalette(msg.key) },
      edit: { icon: icons.edit, label: 'Edit', run: () => this.startEdit(msg) },
      delete: { icon: icons.trash, label: 'Delete', run: () => this.confirmDelete(msg) },
    };
    return h(
      'div',
      { class: 'msg-actions', role: 'toolbar', 'aria-label': 'Message actions', testid: 'message-actions' },
      actions.map((a) =>
        h(
          'button',
          {
            type: 'button',
            class: `icon-button action-${a}`,
            testid: `message-${a}`,
            title: spec[a].label,
            'aria-label': spec[a].label,
            'aria-expanded': a === 'react' ? String(paletteOpen) : null,
            dataset: { action: a },
            onclick: spec[a].run,
          },
          spec[a].icon(),
        ),
      ),
    );
  }

  /** The reaction palette: a fixed handful of emoji. */
  paletteEl(msg) {
    const mine = (emoji) => Boolean(msg.reactions.get(emoji)?.users.has(this.me));
    return h(
      'div',
      {
        class: 'palette',
        role: 'group',
        'aria-label': 'Pick a reaction',
        testid: 'reaction-palette',
        onkeydown: (ev) => {
          if (ev.key === 'Escape') {
            ev.stopPropagation();
            this.togglePalette(null);
            this.msgEls.get(msg.key)?.querySelector('[data-action=react]')?.focus();
          }
        },
      },
      PALETTE.map((emoji) =>
        h(
          'button',
          {
            type: 'button',
            class: `palette-option${mine(emoji) ? ' mine' : ''}`,
            testid: 'react-option',
            'aria-label': mine(emoji) ? `Take back ${emoji}` : `React with ${emoji}`,
            'aria-pressed': String(mine(emoji)),
            dataset: { emoji },
            onclick: () => this.toggleReaction(msg, emoji),
          },
          emoji,
        ),
      ),
    );
  }

  /** Reactions under the message: `emoji count`; ours highlighted; a click toggles ours. */
  chipsEl(msg, chips) {
    return h(
      'div',
      { class: 'reactions', testid: 'reactions' },
      chips.map((c) =>
        h(
          'button',
          {
            type: 'button',
            class: `chip${c.mine ? ' mine' : ''}`,
            testid: 'reaction',
            'aria-pressed': String(c.mine),
            'aria-label': `${c.emoji} ${c.count}${c.mine ? ', you included' : ''}`,
            dataset: { emoji: c.emoji, mine: String(c.mine) },
            onclick: () => this.toggleReaction(msg, c.emoji),
          },
          h('span', { class: 'chip-emoji', 'aria-hidden': 'true' }, c.emoji),
          h('span', { class: 'chip-count', testid: 'reaction-count', 'aria-hidden': 'true' }, String(c.count)),
        ),
      ),
    );
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

  /** The bar above the composer: "Replying to …" or "Edit message", with a cancel button. */
  renderCompose() {
    const c = this.compose;
    const el = this.el;
    const editing = Boolean(c && c.mode === 'edit');
    el.input.placeholder = !c ? 'Write a message' : editing ? 'Edit the message' : 'Write a reply';
    el.send.textContent = editing ? 'Save' : 'Send';
    el.send.setAttribute('aria-label', editing ? 'Save the edit' : 'Send');
    el.composeContext.hidden = !c;
    if (!c) {
      delete el.composeContext.dataset.mode;
      return;
    }
    const quote = quoteOf(this.byId.get(c.id));
    const who = quote.from === this.me ? 'yourself' : quote.from;
    el.composeContext.dataset.mode = c.mode;
    if (el.composeContextIcon.dataset.mode !== c.mode) {
      el.composeContextIcon.dataset.mode = c.mode;
      el.composeContextIcon.replaceChildren(editing ? icons.edit() : icons.reply());
    }
    el.composeContextTitle.textContent = editing ? 'Edit message' : `Replying to ${who}`;
    el.composeContextSnippet.textContent = quote.text;
    el.composeContextCancel.setAttribute('aria-label', editing ? 'Cancel editing' : 'Cancel reply');
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
