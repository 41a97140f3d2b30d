// What one message looks like: the bubble (sender, quote, body or why there
// is none, "edited", time, tick), its action buttons, the reaction palette,
// the reaction chips and the failed note with Retry and Discard; also the
// ticks and locks the list uses, and the lines about group changes.
// User text only ever becomes text nodes (dom.js `h`, `richText`).
//
// `messageViewMethods` are mixed into App by app.js (`this` is the App).

import { formatTime, h, richText } from './dom.js';
import { PALETTE, quoteOf, reactionChips } from './events.js';
import { icons } from './icons.js';
import { TICK_LABELS, actionsFor, isDm, statusDetail } from './state.js';

/** The App's methods that draw a message (`this` is the App). */
export const messageViewMethods = {
  /** The lock of an end-to-end conversation (list, header) or message. */
  lockEl(cls, testid, label = 'End-to-end encrypted') {
    return h('span', { class: `lock ${cls}`, testid, title: label, role: 'img', 'aria-label': label }, icons.lock());
  },

  /** What a sealed message without text shows: "decrypting…" or why it cannot be shown. */
  sealedText(msg) {
    if (!msg.sealed) return null;
    return msg.e2eState === 'failed' ? msg.e2eError : 'decrypting…';
  },

  /** pending 🕓, sent ✓, delivered ✓✓, seen ✓✓ in colour, failed !; drawn as SVG. */
  tickEl(status, msg) {
    const label = TICK_LABELS[status];
    return h(
      'span',
      {
        class: `tick tick-${status}`,
        testid: 'tick',
        'data-status': status,
        title: msg ? statusDetail(this.state, msg) : label,
        'aria-label': label,
        role: 'img',
      },
      icons[status](),
    );
  },

  /** A line about a group change ("alice added dave"), centred in the chat. */
  noteEl(note) {
    let li = this.noteEls.get(note.key);
    if (!li) {
      li = h('li', { class: 'sys-note', testid: 'system-note' }, h('span', null, note.text));
      this.noteEls.set(note.key, li);
    }
    return li;
  },

  fillMessage(li, msg, conv) {
    const own = msg.from === this.me;
    const deleted = Boolean(msg.deleted);
    const status = own && !deleted ? this.status(msg) : null;
    const showFrom = !own && !isDm(conv.id);
    const quote = msg.replyTo ? quoteOf(this.byId.get(msg.replyTo)) : null;
    const chips = reactionChips(msg.reactions, this.me);
    const actions = actionsFor(this.state, msg, conv, Date.now());
    const palette = this.paletteFor === msg.key && actions.includes('react');
    li.className =
      `msg ${own ? 'own' : 'theirs'}${status === 'failed' ? ' failed' : ''}` +
      `${deleted ? ' deleted' : ''}${this.flashKey === msg.key ? ' flash' : ''}`;
    const sig = [
      msg.body,
      status,
      own && status !== 'pending' ? statusDetail(this.state, msg) : '',
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
    const parts = [
      h(
        'div',
        { class: 'bubble' },
        showFrom ? h('div', { class: 'from', testid: 'message-from' }, msg.from) : null,
        quote && !deleted ? this.quoteEl(msg, quote) : null,
        this.bodyEl(msg, deleted),
        this.metaEl(msg, deleted, status),
      ),
      actions.length ? this.actionsEl(msg, actions, palette) : null,
      palette ? this.paletteEl(msg) : null,
      chips.length && !deleted ? this.chipsEl(msg, chips) : null,
      status === 'failed' ? this.failedEl(msg) : null,
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
  },

  /** The body: its text, a tombstone, "Decrypting…", or why it cannot be read. */
  bodyEl(msg, deleted) {
    if (deleted) return h('em', { class: 'body deleted', testid: 'message-deleted' }, 'message deleted');
    if (msg.body == null && msg.sealed) {
      // Never any text of a message that did not pass every check: why, instead.
      return msg.e2eState === 'failed'
        ? h(
            'em',
            { class: 'body undecryptable', testid: 'message-undecryptable', dataset: { reason: msg.e2eReason || '' } },
            msg.e2eError,
          )
        : h('em', { class: 'body decrypting', testid: 'message-decrypting' }, 'Decrypting…');
    }
    if (msg.body == null) {
      return h('em', { class: 'body unavailable', testid: 'message-body' }, 'This message cannot be shown.');
    }
    return h('div', { class: 'body', testid: 'message-body' }, richText(msg.body));
  },

  /** Lock, "edited", time and tick. */
  metaEl(msg, deleted, status) {
    const edited =
      msg.editedTs && !deleted
        ? h(
            'span',
            { class: 'edited', testid: 'message-edited', title: `Edited ${new Date(msg.editedTs).toLocaleString()}` },
            'edited',
          )
        : null;
    return h(
      'div',
      { class: 'meta' },
      msg.sealed && !deleted ? this.lockEl('msg-lock', 'message-lock') : null,
      edited,
      h('time', { datetime: new Date(msg.ts).toISOString(), title: new Date(msg.ts).toLocaleString() }, formatTime(msg.ts)),
      status ? this.tickEl(status, msg) : null,
    );
  },

  /** "Not sent — why", with Retry (same cid) and Discard. */
  failedEl(msg) {
    return h(
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
    );
  },

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
  },

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
  },

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
  },

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
  },
};
