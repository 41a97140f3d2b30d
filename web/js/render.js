// Rendering: the conversation list, the open chat (header, messages in
// order with day separators and the "Unread messages" marker, scrolling),
// the connection status, toasts and the confirm dialog. Every change calls
// scheduleRender(), which redraws once per frame; elements are kept by key
// and redrawn only when their signature changed. What one message looks like
// is in message-view.js.
//
// Seen: an IntersectionObserver on the message list says what is on screen;
// reportSeen() marks it seen (state.js markSeen) while the tab is visible and
// focused, when that changes and after each drawing of the chat; its effect
// queues the `seen` frame. An end-to-end message is seen only once its text
// was drawn, and it is drawn only once the replay guard can judge it
// (state.js releaseSealed).
//
// `renderMethods` are mixed into App by app.js (`this` is the App).

import { avatar, dayKey, formatDay, formatLastSeen, formatStamp, h } from './dom.js';
import { errorText, errorTitle } from './errors.js';
import { listNames } from './events.js';
import { typingNames } from './frames.js';
import {
  convMsgs,
  dmPeer,
  firstUnread,
  histState,
  isDm,
  lastMessage,
  markSeen,
  previewText,
  sortedConvs,
  sortedMessages,
  timeline,
  unreadTotal,
} from './state.js';

const TOAST_MS = 8000;
const MAX_TOASTS = 4;

/** The App's rendering methods (`this` is the App). */
export const renderMethods = {
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
  },

  /** Render at once (when focus has to move to something just drawn). */
  renderNow() {
    this.renderQueued = false;
    this.render();
  },

  render() {
    if (!this.me) return;
    this.renderList();
    this.renderChat();
    this.groupPanel.render();
    this.devicesPanel.render();
    this.renderStatus();
    const unread = unreadTotal(this.state);
    document.title = unread ? `(${unread}) chatd` : 'chatd';
  },

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
  },

  // --- the conversation list ------------------------------------------------------

  renderList() {
    const convs = sortedConvs(this.state);
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
  },

  /** The preview line of a conversation: why it is read-only, typing, or its last message (`text`: state.js previewText). */
  convPreview(conv, last, text, typing) {
    const dm = isDm(conv.id);
    if (conv.left) return h('em', { class: 'conv-left' }, conv.leftNote || 'You are no longer a member');
    if (typing.length) return h('span', { class: 'typing' }, dm ? 'typing…' : `${typing.join(', ')} typing…`);
    if (!last) return h('em', null, conv.provisional ? 'New conversation' : 'No messages yet');
    const own = last.from === this.me;
    return [
      own && !last.deleted ? this.tickEl(this.status(last), last) : null,
      !own && !dm ? h('span', { class: 'preview-from' }, `${last.from}: `) : null,
      last.deleted
        ? h('em', null, 'message deleted')
        : text == null
          ? h('em', null, this.sealedText(last) || 'message unavailable')
          : text.replace(/\s+/g, ' '),
    ];
  },

  fillConv(button, conv) {
    const title = this.title(conv);
    const last = lastMessage(this.state, conv.id);
    const text = previewText(this.state, last);
    const typing = typingNames(this.state, conv.id, Date.now());
    const dm = isDm(conv.id);
    const peer = dm ? dmPeer(conv.id, this.me) : null;
    const online = peer && this.presence.get(peer)?.online;
    const stamp = last ? formatStamp(last.ts) : '';
    const e2e = this.isE2E(conv);
    const sig = JSON.stringify([
      title,
      e2e,
      last && [last.key, text, last.deleted, last.ts, last.from === this.me && this.status(last), last.e2eError],
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
    const preview = this.convPreview(conv, last, text, typing);
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
  },

  // --- the open chat ----------------------------------------------------------------

  renderChat() {
    const el = this.el;
    const conv = this.openId && this.convs.get(this.openId);
    document.body.classList.toggle('chat-open', Boolean(conv));
    el.chatEmpty.hidden = Boolean(conv);
    el.chatPane.hidden = !conv;
    if (!conv) return;
    this.renderHeader(conv);
    this.renderE2E(conv);
    // A former member reads what is here, and writes nothing more.
    el.composer.hidden = Boolean(conv.left);
    el.readonly.hidden = !conv.left;
    if (this.compose) this.renderCompose(); // the quoted message may have changed
    this.renderMessages(conv);
    // A message already on screen may have just got its text (an end-to-end
    // one, once judged): seen now, not before it was drawn.
    this.reportSeen();
  },

  /** The chat's header: name, avatar, and typing / presence / members. */
  renderHeader(conv) {
    const el = this.el;
    const dm = isDm(conv.id);
    const title = this.title(conv);
    el.chatTitle.textContent = title;
    el.chatAvatar.replaceChildren(avatar(dm ? dmPeer(conv.id, this.me) : title, dm ? '' : 'group'));
    const typing = typingNames(this.state, conv.id, Date.now());
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
  },

  /** The messages of the open chat, in order, then the scroll position. */
  renderMessages(conv) {
    const el = this.el;
    const box = el.messages;
    const st = histState(this.state, conv.id);
    const fromBottom = box.scrollHeight - box.scrollTop;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const list = sortedMessages(this.state, conv.id);
    if (this.initialScroll && st.loaded && !this.unreadMarker) {
      const first = firstUnread(this.state, list);
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
    const added = this.placeMessages(conv, list);

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
  },

  /**
   * Put the messages, group-change lines, day separators and the unread
   * marker in the list, reusing elements by key. True if a message of
   * someone else was added.
   */
  placeMessages(conv, list) {
    const ol = this.el.messageList;
    let added = false;
    let prevDay = null;
    let i = 0;
    const place = (node) => {
      if (ol.children[i] !== node) ol.insertBefore(node, ol.children[i] || null);
      i += 1;
    };
    const live = new Set();
    for (const msg of timeline(this.state, conv.id, list)) {
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
    return added;
  },

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
  },

  // --- seen ---------------------------------------------------------------------------

  /** Is a person looking at this tab right now? */
  attentive() {
    return document.visibilityState === 'visible' && document.hasFocus();
  },

  onIntersect(entries) {
    for (const e of entries) {
      const key = e.target.dataset.key;
      const enough = e.isIntersecting && (e.intersectionRatio >= 0.5 || e.intersectionRect.height >= 48);
      if (enough) this.visible.add(key);
      else this.visible.delete(key);
    }
    this.reportSeen();
  },

  /** Report `seen` for incoming messages that are on screen in a focused tab. */
  reportSeen() {
    if (!this.openId || !this.attentive()) return;
    for (const key of this.visible) {
      const msg = convMsgs(this.state, this.openId).get(key);
      if (!this.update(markSeen, msg).fx.length) continue; // not news
      const el = this.msgEls.get(key);
      if (el) this.io.unobserve(el);
    }
    const map = convMsgs(this.state, this.openId);
    for (const key of [...this.visible]) if (!map.has(key)) this.visible.delete(key);
  },

  onScroll() {
    const box = this.el.messages;
    if (box.scrollTop < 120 && this.openId) this.loadOlder(this.openId);
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 80) this.el.jump.hidden = true;
  },

  // --- toasts and the confirm dialog -----------------------------------------------

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
      h('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', onclick: () => el.remove() }, '×'),
    );
    this.el.toasts.append(el);
    while (this.el.toasts.children.length > MAX_TOASTS) this.el.toasts.firstElementChild.remove();
    setTimeout(() => el.remove(), TOAST_MS);
  },

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
  },
};
