// Signing in and out: the login form, the session in sessionStorage
// (`chatd.session`: user, access token, its expiry, the refresh token), the
// refresh of an expired token, the end of a session (close 4001, HTTP 401),
// and this profile's end-to-end device, loaded and registered before the
// socket's `auth` names it.
//
// `sessionMethods` are mixed into App by app.js (`this` is the App).

import { api } from './api.js';
import { avatar } from './dom.js';
import { errorText, errorTitle } from './errors.js';
import { USERNAME_RE } from './groups.js';
import { OUTBOX_PREFIX } from './outbox.js';
import { newState } from './state.js';

const SESSION_KEY = 'chatd.session';
const DEVICE_WAIT_MS = 2500; // how long the socket waits for the device's registration
const DEVICE_CLAIM_EVERY_MS = 10_000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The session kept in sessionStorage, or null (forgotten when unreadable or
 * expired without a refresh token; `expiredToo` keeps an expired one).
 */
export function loadSession(expiredToo = false) {
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

function saveSession(user, token, expiresIn, refresh) {
  const session = { user, token, expiresAt: Date.now() + expiresIn * 1000, refresh };
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  return session;
}

/** The App's session methods (`this` is the App). */
export const sessionMethods = {
  showLogin(message = '') {
    this.el.appView.hidden = true;
    this.el.loginView.hidden = false;
    this.el.loginError.textContent = message;
    document.title = 'chatd';
    const user = this.el.loginForm.elements.username;
    if (!user.value) user.focus();
    else this.el.loginForm.elements.password.focus();
  },

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
      const session = saveSession(name, token, expires_in, refresh_token || null);
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
  },

  enterApp(session) {
    this.reset();
    this.state = newState(session.user);
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
  },

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
  },

  /**
   * `ready` did not claim our device (its registration was late, failed, or
   * the device was removed elsewhere): register it (or a new one) and
   * connect again so that `auth` names it. At most every 10 s.
   */
  async claimDevice() {
    const e2e = this.e2e;
    if (!e2e.device || Date.now() - this.deviceFixAt < DEVICE_CLAIM_EVERY_MS) return;
    this.deviceFixAt = Date.now();
    try {
      await e2e.register();
    } catch {
      return;
    }
    if (this.e2e === e2e && this.conn) this.conn.restart();
  },

  logout({ force = false } = {}) {
    const unsent = this.outbox.length;
    if (
      unsent &&
      !force &&
      !window.confirm(`${unsent} message(s) are not sent yet and will be lost. Log out anyway?`)
    ) {
      return;
    }
    this.endSession();
    if (this.me) sessionStorage.removeItem(OUTBOX_PREFIX + this.me);
    this.reset();
    if (location.hash) history.replaceState(null, '', location.pathname + location.search);
    this.showLogin();
  },

  /** Stop the socket, revoke the token (every replica refuses it from now on; not waited for), forget it. */
  endSession() {
    if (this.conn) this.conn.stop();
    this.conn = null;
    if (this.token) api('/api/logout', { method: 'POST', token: this.token }).catch(() => {});
    sessionStorage.removeItem(SESSION_KEY);
  },

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
      saveSession(s.user, r.token, r.expires_in, r.refresh_token);
      this.token = r.token;
      if (this.conn) this.conn.stop();
      this.startConnection();
      return true;
    } catch {
      return false;
    } finally {
      this.refreshing = false;
    }
  },

  /** The server said the token is no good (close 4001, HTTP 401): refresh, or back to the login. */
  async sessionEnded(message) {
    // Only an expired token is renewed; a revoked one, a disabled account or
    // a reused refresh token means signing in again.
    if (/expired/.test(message || '') && (await this.refreshSession())) return;
    this.endSession();
    // The outbox stays in sessionStorage: after logging in again it is sent.
    const user = this.me;
    this.reset();
    this.el.loginForm.elements.username.value = user || '';
    this.showLogin(`Signed out: ${errorText('unauthorized', message)} Please log in again.`);
  },
};
