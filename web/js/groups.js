// The group info panel (a modal <dialog> opened from the chat header, see
// dialog.js): the group's name (admins rename it), its members with an
// "admin" badge, and for admins adding members, removing one, making or
// unmaking admins; for every member "Leave group". Each change is one HTTP
// request; the app applies its answer like the `members` event it also
// becomes (`App.groupChanged`).

import { api } from './api.js';
import { ConvDialog } from './dialog.js';
import { avatar, h } from './dom.js';
import { canManage } from './events.js';

export const USERNAME_RE = /^[a-z0-9_.-]{3,32}$/;

/** Usernames typed into a field ("bob, carol dave"): {names, bad} (the first invalid one). */
export function parseUsernames(text, me) {
  const names = [
    ...new Set(
      text
        .split(/[\s,;]+/)
        .map((m) => m.trim().toLowerCase())
        .filter((m) => m && m !== me),
    ),
  ];
  return { names, bad: names.find((m) => !USERNAME_RE.test(m)) || null };
}

export class GroupPanel extends ConvDialog {
  constructor(app, root = document) {
    super(app, root, {
      dialog: 'group-dialog',
      close: 'group-close',
      name: 'group-name',
      renameForm: 'group-rename-form',
      count: 'group-members-heading',
      members: 'group-members',
      addForm: 'group-add-form',
      error: 'group-error',
      leftNote: 'group-left-note',
      leave: 'group-leave',
    });
    this.busy = false;
    this.shownTitle = undefined;
    const el = this.el;
    el.renameForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.rename();
    });
    el.addForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.add();
    });
    el.leave.addEventListener('click', () => this.leave());
  }

  open(convId) {
    this.shownTitle = undefined;
    this.el.addForm.reset();
    super.open(convId);
  }

  /** Draw the group `conv` (while open, on every render of the app). */
  draw(conv) {
    const el = this.el;
    const me = this.app.me;
    const manage = canManage(conv, me);
    const title = el.renameForm.elements.title;
    // The name field follows renames, unless it is being edited.
    if (conv.title !== this.shownTitle && document.activeElement !== title) {
      title.value = conv.title || '';
      this.shownTitle = conv.title;
    }
    el.name.textContent = this.app.title(conv);
    el.name.hidden = manage;
    el.renameForm.hidden = !manage;
    el.addForm.hidden = !manage;
    el.leave.hidden = Boolean(conv.left);
    el.leftNote.hidden = !conv.left;
    // While a change is on its way the others wait (buttons stay enabled, so
    // the keyboard focus stays where it was).
    if (this.busy) el.dialog.setAttribute('aria-busy', 'true');
    else el.dialog.removeAttribute('aria-busy');
    const members = conv.members || [];
    const admins = conv.admins || [];
    const sig = JSON.stringify([members, admins, manage]);
    if (sig === this.sig) return;
    this.sig = sig;
    el.count.textContent = `${members.length} member${members.length === 1 ? '' : 's'}`;
    const entries = members.map((name) => this.memberEl(name, admins, manage));
    this.replaceList(el.members, entries, { anyButton: true });
  }

  memberEl(name, admins, manage) {
    const me = this.app.me;
    const admin = admins.includes(name);
    const button = (testid, label, text, run, cls = 'secondary') =>
      h(
        'button',
        { type: 'button', class: `small ${cls}`, testid, 'aria-label': label, onclick: run },
        text,
      );
    const controls = [];
    if (manage) {
      if (!admin) {
        controls.push(button('member-promote', `Make ${name} an admin`, 'Make admin', () => this.promote(name)));
      } else if (admins.length > 1) {
        controls.push(button('member-demote', `Remove ${name} as admin`, 'Remove admin', () => this.demote(name)));
      }
      if (name !== me) {
        const run = () => this.remove(name);
        controls.push(button('member-remove', `Remove ${name} from the group`, 'Remove', run, 'ghost danger-text'));
      }
    }
    return h(
      'li',
      { class: 'member', testid: 'group-member', dataset: { name, admin: String(admin) } },
      avatar(name, 'small'),
      h(
        'span',
        { class: 'member-name', testid: 'member-name' },
        name,
        name === me ? h('span', { class: 'muted' }, ' (you)') : null,
      ),
      admin ? h('span', { class: 'admin-badge', testid: 'admin-badge' }, 'admin') : null,
      controls.length ? h('span', { class: 'member-actions' }, controls) : null,
    );
  }

  // --- the changes -----------------------------------------------------------------

  /** One change: the request, then its answer applied as the `members` event it is. */
  async change(method, path, body, action, users) {
    const conv = this.conv;
    if (!conv || this.busy) return false;
    const app = this.app;
    const id = conv.id;
    this.busy = true;
    this.el.error.textContent = '';
    this.render();
    try {
      const answer = await api(`/api/conversations/${encodeURIComponent(id)}${path}`, {
        method,
        body,
        token: app.token,
      });
      app.groupChanged(answer, action, users);
      return true;
    } catch (err) {
      if (err.status === 401) app.sessionEnded(err.message);
      else if (this.convId === id) this.showError(err);
      return false;
    } finally {
      this.busy = false;
      this.render();
    }
  }

  async rename() {
    const conv = this.conv;
    const input = this.el.renameForm.elements.title;
    const title = input.value.trim();
    if (!conv || title === (conv.title || '')) return;
    if (await this.change('PATCH', '', { title: title || null }, 'rename', [])) {
      this.shownTitle = undefined;
      input.blur();
    }
  }

  async add() {
    const input = this.el.addForm.elements.members;
    const { names, bad } = parseUsernames(input.value, this.app.me);
    const conv = this.conv;
    const fresh = conv ? names.filter((n) => !(conv.members || []).includes(n)) : [];
    const error = this.el.error;
    if (bad) error.textContent = `“${bad}” is not a valid username.`;
    else if (!fresh.length) error.textContent = names.length ? 'Already members.' : 'Enter a username to add.';
    else if (await this.change('POST', '/members', { members: fresh }, 'add', fresh)) input.value = '';
  }

  async remove(name) {
    const ok = await this.app.confirm({
      title: `Remove ${name}?`,
      text: `${name} will no longer get this group's messages or read its history.`,
      ok: 'Remove',
    });
    if (ok) await this.change('DELETE', `/members/${encodeURIComponent(name)}`, undefined, 'remove', [name]);
  }

  promote(name) {
    return this.change('POST', '/admins', { members: [name] }, 'promote', [name]);
  }

  demote(name) {
    return this.change('DELETE', `/admins/${encodeURIComponent(name)}`, undefined, 'demote', [name]);
  }

  async leave() {
    const me = this.app.me;
    const ok = await this.app.confirm({
      title: 'Leave this group?',
      text: 'You will no longer get its messages or read its history. An admin can add you again.',
      ok: 'Leave',
    });
    if (ok && (await this.change('DELETE', `/members/${encodeURIComponent(me)}`, undefined, 'leave', [me]))) {
      this.close();
    }
  }
}
