// What the chat's panels have in common: the group info panel (groups.js)
// and the encryption panel (e2e-panel.js) are each a modal <dialog> of the page
// about the open conversation, opened from the chat header. Opening one
// focuses its close button; the button or Escape (the browser's) closes it;
// while open it is redrawn from the app's state on every render, and closes
// itself if its conversation is gone. A panel extends ConvDialog and draws
// its content in `draw(conv)`.

import { errorText, errorTitle } from './errors.js';

export class ConvDialog {
  /**
   * `ids` names the panel's elements by their id in the page (`this.el`);
   * every panel has `dialog`, its `close` button and `error` (where a
   * failure is said).
   */
  constructor(app, root, ids) {
    this.app = app;
    this.el = {};
    for (const [name, id] of Object.entries(ids)) this.el[name] = root.getElementById(id);
    this.convId = null;
    this.sig = null; // what the content was drawn from (drawn again when it changes)
    this.el.close.addEventListener('click', () => this.close());
    this.el.dialog.addEventListener('close', () => {
      this.convId = null;
    });
  }

  /** The conversation shown (null when closed, or gone). */
  get conv() {
    return this.convId ? this.app.convs.get(this.convId) : null;
  }

  get isOpen() {
    return this.el.dialog.open;
  }

  /** Show the panel of conversation `convId`, drawn afresh, its close button focused. */
  open(convId) {
    this.convId = convId;
    this.sig = null;
    this.el.error.textContent = '';
    if (!this.el.dialog.open) this.el.dialog.showModal();
    this.render();
    this.el.close.focus();
  }

  close() {
    this.convId = null;
    if (this.el.dialog.open) this.el.dialog.close();
  }

  /** Redraw from the state (called on every render of the app): `draw(conv)` while open. */
  render() {
    if (!this.el.dialog.open) return;
    const conv = this.conv;
    if (!conv) {
      this.close();
      return;
    }
    this.draw(conv);
  }

  /** Say why something failed, under the content. */
  showError(err) {
    this.el.error.textContent = `${errorTitle(err.code)}: ${errorText(err.code, err.message)}`;
  }

  /**
   * Redraw the list `box` with `entries` (elements with data-name). The
   * keyboard focus, when it was on a control in the list, goes back to the
   * same control of the same entry; failing that (with `anyButton`) to the
   * entry's first button, or to the close button.
   */
  replaceList(box, entries, { anyButton = false } = {}) {
    const focused = box.contains(document.activeElement) ? document.activeElement : null;
    const again = focused && [focused.closest('[data-name]')?.dataset.name, focused.dataset.testid];
    box.replaceChildren(...entries);
    if (!again) return;
    const entry = [...box.children].find((x) => x.dataset.name === again[0]);
    const button = entry && entry.querySelector(`[data-testid="${again[1]}"]`);
    (button || (anyButton && entry && entry.querySelector('button')) || this.el.close).focus();
  }
}
