// The composer and what a person does to messages: typing (and `typing`
// frames), sending, the "Replying to …" / "Edit message" bar, reactions
// from the palette and the chips, deleting (asked first), jumping to a
// quoted message.
//
// `composerMethods` are mixed into App by app.js (`this` is the App).

import { listNames, quoteOf } from './events.js';
import { icons } from './icons.js';

/** The longest body the server takes. */
export const MAX_BODY = 4000;
const TYPING_SEND_EVERY_MS = 3000;
const FLASH_MS = 1600; // how long a message quoted and clicked stays highlighted

/** The App's composer methods (`this` is the App). */
export const composerMethods = {
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
  },

  /** Say under the composer why what was typed did not go (it stays there). */
  composerRefusal(text) {
    const note = this.el.composerNote;
    note.hidden = false;
    note.className = 'composer-note over';
    note.textContent = text;
  },

  /** Keep the draft; tell the others we are typing (at most every 3 s). */
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
  },

  autosize() {
    const input = this.el.input;
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  },

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
  },

  // --- replies and edits ------------------------------------------------------------

  startReply(msg) {
    this.setCompose({ mode: 'reply', id: msg.id, conversation: msg.conversation }, { keepText: true });
    this.el.input.focus();
  },

  startEdit(msg, text = (this.byId.get(msg.id) || msg).body) {
    this.setCompose({ mode: 'edit', id: msg.id, conversation: msg.conversation });
    this.el.input.value = text;
    this.autosize();
    this.updateComposerNote();
    this.el.input.focus();
    this.el.input.setSelectionRange(text.length, text.length);
  },

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
  },

  submitEdit(body) {
    const msg = this.byId.get(this.compose.id);
    this.setCompose(null);
    if (!msg || msg.deleted || body === msg.body) return;
    const conv = this.convs.get(msg.conversation);
    if (this.isE2E(conv)) this.requestSealedEdit(msg, body);
    else this.request('edit', msg, { body });
  },

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
  },

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
  },

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
  },

  // --- reactions, deleting, quotes ------------------------------------------------------

  toggleReaction(msg, emoji) {
    const r = (this.byId.get(msg.id) || msg).reactions.get(emoji); // as it is now
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
  },

  togglePalette(key) {
    this.paletteFor = key && this.paletteFor !== key ? key : null;
    this.renderNow();
    const li = key && this.msgEls.get(key);
    if (this.paletteFor && li) li.querySelector('.palette button')?.focus();
  },

  /** Ask first, then delete for everyone (an admin may delete others' messages). */
  async confirmDelete(msg) {
    const own = msg.from === this.me;
    const ok = await this.confirm({
      title: own ? 'Delete this message?' : `Delete ${msg.from}'s message?`,
      text: 'It is deleted for everyone in the conversation.',
      ok: 'Delete',
    });
    const now = this.byId.get(msg.id) || msg; // as it is after the question
    if (ok && now.id && !now.deleted) this.request('delete', now, {});
  },

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
  },
};
