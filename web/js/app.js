// The chat client: one App (exposed as `window.chatd` by main.js), put
// together from layers that each own a part:
//
//   state.js         the state and its updates (state + input -> new state + effects); no DOM, no network
//   frames.js        what each live frame and event does to the state (same rules)
//   protocol.js      the socket's frames, acks and seen, the list and history over HTTP, decrypting
//   outbox.js        our messages until stored and our requests until applied; retry, same cid
//   session.js       login, logout, token refresh, this profile's end-to-end device
//   composer.js      the composer, replies, edits, reactions, deleting
//   render.js        the list, the open chat, status, toasts, the confirm dialog, seen reporting
//   message-view.js  one message's elements
//
// This file holds the App itself: its elements, its reset, the UI wiring,
// navigation, and the conversation helpers the panels (groups.js,
// e2e-panel.js) use. Replies, reactions, edits and deletions are applied
// with events.js; the group info panel is groups.js; end-to-end mode is
// e2e.js, a front over e2e-store.js (the device in IndexedDB),
// e2e-devices.js, e2e-trust.js, e2e-epochs.js, e2e-read.js and e2e-panel.js.

import { api } from './api.js';
import { errorText, errorTitle } from './errors.js';
import { DevicesPanel, E2E } from './e2e.js';
import { GroupPanel, USERNAME_RE, parseUsernames } from './groups.js';
import { icons } from './icons.js';
import { composerMethods } from './composer.js';
import { expireTyping } from './frames.js';
import { messageViewMethods } from './message-view.js';
import { outboxMethods } from './outbox.js';
import { protocolMethods } from './protocol.js';
import { renderMethods } from './render.js';
import { loadSession, sessionMethods } from './session.js';
import {
  addGroup,
  dmPeer,
  histState,
  isDm,
  knownConv,
  newState,
  others,
  provisionalDm,
  status,
  title,
} from './state.js';

export { dmId, isDm } from './state.js';

/** The ids of the page's elements the App uses, by the name it uses. */
const ELEMENTS = {
  loginView: 'login-view',
  loginForm: 'login-form',
  loginError: 'login-error',
  registerButton: 'register-button',
  appView: 'app-view',
  meName: 'me-name',
  meAvatar: 'me-avatar',
  connStatus: 'conn-status',
  connText: 'conn-text',
  connRetry: 'conn-retry',
  logout: 'logout',
  newChatToggle: 'new-chat-toggle',
  newGroupToggle: 'new-group-toggle',
  newChatForm: 'new-chat-form',
  newChatError: 'new-chat-error',
  newGroupForm: 'new-group-form',
  newGroupError: 'new-group-error',
  convList: 'conv-list',
  convEmpty: 'conv-empty',
  chat: 'chat',
  chatEmpty: 'chat-empty',
  chatPane: 'chat-pane',
  back: 'chat-back',
  chatAvatar: 'chat-avatar',
  chatTitle: 'chat-title',
  chatSubtitle: 'chat-subtitle',
  groupInfo: 'group-info',
  e2eInfo: 'e2e-info',
  chatLock: 'chat-lock',
  e2eBanner: 'e2e-banner',
  e2eBannerText: 'e2e-banner-text',
  e2eBannerCheck: 'e2e-banner-check',
  e2eBannerDismiss: 'e2e-banner-dismiss',
  readonly: 'chat-readonly',
  offlineBanner: 'offline-banner',
  messages: 'messages',
  historyStatus: 'history-status',
  messageList: 'message-list',
  jump: 'jump-bottom',
  composer: 'composer',
  input: 'composer-input',
  send: 'composer-send',
  composerNote: 'composer-note',
  composeContext: 'compose-context',
  composeContextIcon: 'compose-context-icon',
  composeContextTitle: 'compose-context-title',
  composeContextSnippet: 'compose-context-snippet',
  composeContextCancel: 'compose-context-cancel',
  confirmDialog: 'confirm-dialog',
  confirmTitle: 'confirm-title',
  confirmText: 'confirm-text',
  confirmOk: 'confirm-ok',
  confirmCancel: 'confirm-cancel',
  toasts: 'toasts',
};

export class App {
  constructor(root = document) {
    this.el = {};
    for (const [name, id] of Object.entries(ELEMENTS)) this.el[name] = root.getElementById(id);
    this.conn = null;
    this.info = null;
    this.renderQueued = false;
    this.groupPanel = new GroupPanel(this, root);
    this.devicesPanel = new DevicesPanel(this, root);
    this.reset();
    this.bindUi();
  }

  // The state (state.js) under the names the rest of the page uses.
  get me() {
    return this.state.me;
  }
  get convs() {
    return this.state.convs;
  }
  get msgs() {
    return this.state.msgs;
  }
  get byId() {
    return this.state.byId;
  }
  get byCid() {
    return this.state.byCid;
  }
  get hist() {
    return this.state.hist;
  }
  get presence() {
    return this.state.presence;
  }
  get typing() {
    return this.state.typing;
  }
  get eids() {
    return this.state.eids;
  }
  get notes() {
    return this.state.notes;
  }

  reset() {
    this.state = newState(null);
    this.token = null;
    // This session's end-to-end state (the keys stay in IndexedDB across sessions).
    this.e2e = new E2E({
      getToken: () => this.token,
      onChange: (ev) => {
        this.scheduleRender();
        if (ev.type === 'trust') this.resumeSealed(); // verified or dismissed: paused sends go
        if (ev.type === 'replayed') this.replayFound(ev.id, ev.verdict); // an earlier copy came to light
      },
    });
    this.deviceFixAt = 0;
    this.outbox = []; // [{cid, conversation, frame, ts, afterSeq, sealed?, body?, replyTo?}]
    this.actions = new Map(); // cid -> {frame, type, id, emoji, on, body}: requests awaiting `applied`
    this.lastTypingSent = new Map();
    this.ackIds = new Set();
    this.ackReceipts = new Set();
    this.ackEvents = new Set();
    this.seenQueue = new Set();
    this.compose = null; // {mode: 'reply' | 'edit', id, conversation}: what the composer is doing
    this.paletteFor = null; // key of the message whose reaction palette is open
    this.flashKey = null; // key of the message highlighted after clicking a quote
    this.openId = null;
    this.readyCount = 0;
    this.unreadMarker = null;
    this.initialScroll = false;
    this.scrollMode = null;
    this.drafts = new Map();
    this.convsLoaded = false;
    this.connState = null;
    this.resetChatDom();
    this.convEls = new Map();
    this.el.convList.replaceChildren();
    this.renderCompose();
    this.groupPanel.close();
    this.devicesPanel.close();
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
      root: this.el.messages,
      threshold: [0, 0.25, 0.5, 1],
    });
    this.el.messageList.replaceChildren();
  }

  start() {
    window.addEventListener('hashchange', () => this.route());
    window.addEventListener('focus', () => this.reportSeen());
    document.addEventListener('visibilitychange', () => this.reportSeen());
    setInterval(() => this.everySecond(), 1000);
    const session = loadSession();
    if (session) this.enterApp(session);
    else this.showLogin();
  }

  everySecond() {
    if (!this.me) return;
    // Typing indicators time out; the retry countdown counts down.
    this.update(expireTyping, Date.now());
    if (this.connState && this.connState.state === 'waiting') this.renderStatus();
  }

  // --- conversations: the helpers of the panels and the layers ---------------------

  /** The conversation `id`; one not known yet is made up, and the list asked for again. */
  ensureConv(id) {
    return this.update(knownConv, id).conv;
  }

  provisionalDm(peer) {
    return this.update(provisionalDm, peer, Date.now()).id;
  }

  title(conv) {
    return title(this.state, conv);
  }

  others(conv) {
    return others(this.state, conv);
  }

  /** pending | failed | sent | delivered | seen — for our own messages. */
  status(msg) {
    return status(this.state, msg);
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

  /** The person switched this one-to-one conversation on: from the next message on. */
  turnOnE2E(id) {
    this.e2e.want(id);
    const conv = this.convs.get(id);
    if (conv) this.prefetchDevices(conv);
    this.scheduleRender();
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
    const groupTitle = form.elements.title.value.trim();
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
      const body = { members, title: groupTitle || null };
      // Without the field the server makes a plain group (what older servers understand).
      if (e2e) body.e2e = true;
      const made = await api('/api/conversations', { method: 'POST', token: this.token, body });
      this.update(addGroup, made, Date.now());
      if (e2e && !made.e2e) this.toast('bad_request', 'The server made the group without end-to-end encryption.');
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
    const st = histState(this.state, id);
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
}

Object.assign(
  App.prototype,
  sessionMethods,
  protocolMethods,
  outboxMethods,
  composerMethods,
  renderMethods,
  messageViewMethods,
);
