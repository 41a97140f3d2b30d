// The devices and safety-number panel of end-to-end mode (DevicesPanel,
// below): the only part of it with a DOM. What it draws comes from the
// app's E2E (e2e.js: device lists, fingerprints, safety numbers, trust);
// it keeps only what it last drew.

import { ConvDialog } from './dialog.js';
import { avatar, h } from './dom.js';
import { errorText } from './errors.js';
import { icons } from './icons.js';

const dateFmt = new Intl.DateTimeFormat(undefined, { day: 'numeric', month: 'short', year: 'numeric' });

/**
 * The encryption panel of a conversation (a modal <dialog> opened from the
 * chat header, see dialog.js): whether it is end-to-end (and, in a
 * one-to-one chat that is not, the switch), every member's active devices
 * with their fingerprints, the safety number with each contact and "mark
 * as verified", and "remove this device". Everything shown comes from the
 * server's device lists, fetched again on open and on a `devices` frame
 * (`refresh`).
 */
export class DevicesPanel extends ConvDialog {
  constructor(app, root = document) {
    super(app, root, {
      dialog: 'e2e-dialog',
      close: 'e2e-close',
      status: 'e2e-status',
      enable: 'e2e-enable',
      members: 'e2e-members',
      error: 'e2e-error',
      remove: 'e2e-remove-device',
    });
    this.data = null; // [{user, devices, prints, safety, error}] once loaded
    this.version = 0;
    this.el.enable.addEventListener('click', () => this.turnOn());
    this.el.remove.addEventListener('click', () => this.removeDevice());
  }

  open(convId) {
    this.data = null;
    super.open(convId);
    this.refresh();
  }

  /** The people shown: me first, then the others by name. */
  people(conv) {
    const others = this.app.others(conv).filter((u) => u !== this.app.me).sort();
    return [this.app.me, ...others];
  }

  /** Fetch the device lists, fingerprints and safety numbers again, then draw. */
  async refresh() {
    const conv = this.conv;
    const e2e = this.app.e2e;
    if (!conv || !e2e.device) {
      this.render();
      return;
    }
    const version = ++this.version;
    // Every list asked for again once, then the numbers over those lists.
    await e2e.devicesOf(this.app.me, { fresh: true }).catch(() => null);
    const load = async (user) => {
      const entry = { user, devices: [], prints: new Map(), safety: null, error: null };
      try {
        const fresh = user !== this.app.me;
        entry.devices = (await e2e.devicesOf(user, { fresh })).filter((d) => d.removed_ts == null);
        for (const d of entry.devices) entry.prints.set(d.device, await e2e.fingerprint(d));
        if (user !== this.app.me) entry.safety = await e2e.safety(user, { fresh: false });
      } catch (err) {
        entry.error = err.status === 404 ? 'not visible to you' : errorText(err.code, err.message);
      }
      return entry;
    };
    const data = await Promise.all(this.people(conv).map(load));
    if (version !== this.version || this.conv?.id !== conv.id) return; // a newer refresh, or closed
    this.data = data;
    this.sig = null;
    this.render();
  }

  /** Draw the panel of `conv` (while open, on every render of the app; cheap when nothing changed). */
  draw(conv) {
    const app = this.app;
    const e2e = app.e2e;
    const on = app.isE2E(conv);
    const dm = conv.kind === 'dm';
    const el = this.el;
    el.status.dataset.state = on ? 'on' : 'off';
    el.status.textContent = on
      ? 'Messages here are end-to-end encrypted: only the devices listed below can read them. The server sees who writes when, never what.'
      : conv.provisional
        ? 'Not end-to-end encrypted yet. Send a first message to start the conversation; then it can be switched on.'
        : 'Not end-to-end encrypted: the server can read these messages (they are encrypted at rest only).';
    el.enable.hidden = on || !dm || Boolean(conv.left);
    el.enable.disabled = Boolean(conv.provisional) || !e2e.device;
    el.remove.hidden = !e2e.device;
    const trust = this.data ? this.data.map((d) => e2e.trustOf(d.user)) : null;
    const sig = JSON.stringify([this.data && this.data.map((d) => [d.user, d.devices, d.safety, d.error]), trust, e2e.deviceId]);
    if (sig === this.sig) return;
    this.sig = sig;
    const entries = this.data
      ? this.data.map((d) => this.memberEl(d))
      : [h('p', { class: 'muted', testid: 'e2e-loading' }, 'Loading devices…')];
    this.replaceList(el.members, entries);
  }

  memberEl(entry) {
    const app = this.app;
    const e2e = app.e2e;
    const me = entry.user === app.me;
    const trust = e2e.trustOf(entry.user);
    const parts = [
      h(
        'div',
        { class: 'e2e-member-head' },
        avatar(entry.user, 'small'),
        h('strong', { class: 'member-name' }, entry.user, me ? h('span', { class: 'muted' }, ' (you)') : null),
        !me && trust.verified
          ? h('span', { class: 'verified-badge', testid: 'e2e-verified', title: 'You compared the safety number' }, 'verified')
          : null,
      ),
    ];
    if (entry.error) parts.push(h('p', { class: 'form-error' }, `Devices: ${entry.error}`));
    if (!me && entry.safety) parts.push(this.safetyEl(entry, trust));
    parts.push(
      entry.devices.length
        ? h('ul', { class: 'e2e-devices' }, entry.devices.map((d) => this.deviceEl(entry, d)))
        : h('p', { class: 'muted', testid: 'e2e-no-devices' }, me ? 'No devices.' : `${entry.user} has no device for end-to-end messages yet.`),
    );
    return h('section', { class: 'e2e-member', testid: 'e2e-member', dataset: { name: entry.user } }, parts);
  }

  safetyEl(entry, trust) {
    const e2e = this.app.e2e;
    const user = entry.user;
    const changed = trust.changed
      ? h(
          'p',
          { class: 'e2e-changed', testid: 'e2e-changed' },
          trust.blocked
            ? `${user}'s devices changed since you verified them. Compare the new number, then verify again.`
            : `${user}'s devices changed.`,
        )
      : null;
    const verify = h(
      'button',
      {
        type: 'button',
        class: 'small',
        testid: 'e2e-verify',
        'aria-label': `Mark ${user} as verified`,
        // Verified: the devices whose number is on screen.
        onclick: () => this.act(() => e2e.verify(user, entry.devices)),
      },
      trust.verified ? 'Verify again' : 'Mark as verified',
    );
    const dismiss = trust.changed
      ? h(
          'button',
          { type: 'button', class: 'small secondary', testid: 'e2e-dismiss', onclick: () => this.act(() => e2e.dismiss(user)) },
          'Dismiss',
        )
      : null;
    return h(
      'div',
      { class: 'safety' },
      h('span', { class: 'safety-label' }, `Safety number with ${user}`),
      h('code', { class: 'safety-number', testid: 'safety-number', dataset: { user } }, entry.safety),
      h(
        'p',
        { class: 'muted safety-help' },
        `Compare it with the one ${user} sees (in person, or on a call). The same number means nobody is in between.`,
      ),
      changed,
      h('div', { class: 'row' }, trust.verified && !trust.changed ? null : verify, dismiss),
    );
  }

  deviceEl(entry, d) {
    const here = entry.user === this.app.me && d.device === this.app.e2e.deviceId;
    const added = d.created_ts ? `added ${dateFmt.format(new Date(d.created_ts))}` : '';
    return h(
      'li',
      { class: `e2e-device${here ? ' here' : ''}`, testid: 'e2e-device', dataset: { device: d.device } },
      icons.device(),
      h(
        'span',
        { class: 'e2e-device-text' },
        h('span', { class: 'e2e-device-name' }, d.name || 'device', here ? h('strong', null, ' · this device') : null),
        h('code', { class: 'fingerprint', testid: 'device-fingerprint', title: 'SHA-256 of its public keys' }, entry.prints.get(d.device) || ''),
        h('span', { class: 'muted' }, added),
      ),
    );
  }

  async act(fn) {
    this.el.error.textContent = '';
    try {
      await fn();
    } catch (err) {
      this.showError(err);
    }
    this.sig = null;
    this.app.scheduleRender();
  }

  /** Switch a one-to-one conversation to end-to-end (asked first: it is one way). */
  async turnOn() {
    const conv = this.conv;
    if (!conv) return;
    const peer = this.app.others(conv)[0];
    const ok = await this.app.confirm({
      title: 'Turn on end-to-end encryption?',
      text:
        `From your next message on, what you and ${peer} write here is encrypted on your devices and only ` +
        `your and ${peer}'s devices can read it. This cannot be turned off again, and devices added later ` +
        'cannot read what was sent before them.',
      ok: 'Turn on',
    });
    if (!ok || !this.conv) return;
    this.app.turnOnE2E(conv.id);
    this.sig = null;
    this.render();
  }

  /** "Remove this device": its keys are deleted here and it is removed on the server; then log out. */
  async removeDevice() {
    const ok = await this.app.confirm({
      title: 'Remove this device?',
      text:
        'Its keys are deleted from this browser and the others stop encrypting for it: end-to-end messages ' +
        'cannot be read here any more. You are logged out; logging in again makes a new device.',
      ok: 'Remove',
    });
    if (!ok) return;
    try {
      await this.app.e2e.removeThisDevice();
    } catch (err) {
      this.showError(err);
      return;
    }
    this.close();
    this.app.logout({ force: true });
  }
}
