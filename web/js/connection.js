// One WebSocket to chatd, kept alive: auth first, ping while idle, reconnect
// with exponential backoff (and jitter) after any drop, except close code
// 4001 (unauthorized), which ends the session.

const PING_EVERY_MS = 25_000;
const PONG_TIMEOUT_MS = 10_000;
const READY_TIMEOUT_MS = 15_000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 20_000;

export const CLOSE_UNAUTHORIZED = 4001;

/**
 * Events (all via the callbacks passed in):
 *  onStatus({state, retryInMs?, attempt?})  state: connecting | authenticating | ready | waiting | stopped
 *  onFrame(frame)                           every server frame after auth, including `ready`
 *  onUnauthorized(message)                  close 4001: the caller logs out
 * `authFields()` gives more fields for each `auth` frame ({device}).
 */
export class Connection {
  constructor({ token, resolveUrl, onFrame, onStatus, onUnauthorized, authFields = () => ({}) }) {
    this.token = token;
    // More fields of `auth`, asked at each connect (the end-to-end `device`).
    this.authFields = authFields;
    this.resolveUrl = resolveUrl;
    this.onFrame = onFrame;
    this.onStatus = onStatus;
    this.onUnauthorized = onUnauthorized;
    this.ws = null;
    this.state = 'stopped';
    this.attempt = 0;
    this.stopped = true;
    this.timers = { retry: 0, ping: 0, pong: 0, ready: 0 };
    this.lastError = null;
    this.retryAt = 0;
    this._onOnline = () => {
      if (this.state === 'waiting') this.reconnectNow();
    };
  }

  get ready() {
    return this.state === 'ready';
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    window.addEventListener('online', this._onOnline);
    this._connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener('online', this._onOnline);
    this._clearTimers();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000, 'logout');
      } catch {
        /* already closed */
      }
    }
    this._setState('stopped');
  }

  /** Skip the backoff wait (the user pressed "retry now", or the network came back). */
  reconnectNow() {
    if (this.stopped || this.state !== 'waiting') return;
    clearTimeout(this.timers.retry);
    this._connect();
  }

  /** Close and connect again at once (e.g. to fetch the rest of a long backlog). */
  restart() {
    if (this.stopped || !this.ws) return;
    this.attempt = 0;
    this.ws.close(4000, 'restart');
  }

  /** Send a frame if the socket is authenticated; returns whether it went out. */
  send(frame) {
    if (!this.ready || !this.ws) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _setState(state, extra = {}) {
    this.state = state;
    this.onStatus({ state, attempt: this.attempt, ...extra });
  }

  _clearTimers() {
    for (const key of Object.keys(this.timers)) {
      clearTimeout(this.timers[key]);
      clearInterval(this.timers[key]);
      this.timers[key] = 0;
    }
  }

  async _connect() {
    this._clearTimers();
    this._setState('connecting');
    let url;
    try {
      url = await this.resolveUrl();
    } catch {
      this._scheduleRetry();
      return;
    }
    if (this.stopped) return;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      this._scheduleRetry();
      return;
    }
    this.ws = ws;
    this.lastError = null;
    ws.onopen = () => {
      this._setState('authenticating');
      ws.send(JSON.stringify({ ...this.authFields(), type: 'auth', token: this.token }));
      this.timers.ready = setTimeout(() => ws.close(4000, 'no ready'), READY_TIMEOUT_MS);
    };
    ws.onmessage = (ev) => {
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!frame || typeof frame.type !== 'string') return;
      clearTimeout(this.timers.pong); // any frame proves the link is alive
      if (frame.type === 'ready') {
        clearTimeout(this.timers.ready);
        this.attempt = 0;
        this._setState('ready');
        this._startPing();
      } else if (frame.type === 'error' && frame.code === 'unauthorized') {
        this.lastError = frame.message;
      }
      if (frame.type === 'pong') return;
      this.onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._clearTimers();
      if (this.stopped) return;
      if (ev.code === CLOSE_UNAUTHORIZED) {
        this.stopped = true;
        this._setState('stopped');
        this.onUnauthorized(this.lastError || ev.reason || 'Your session has expired.');
        return;
      }
      this._scheduleRetry();
    };
    ws.onerror = () => {
      /* onclose follows and decides */
    };
  }

  _startPing() {
    clearInterval(this.timers.ping);
    this.timers.ping = setInterval(() => {
      if (!this.send({ type: 'ping' })) return;
      clearTimeout(this.timers.pong);
      this.timers.pong = setTimeout(() => {
        // No answer: the link is dead even if the browser has not noticed.
        if (this.ws) this.ws.close(4000, 'ping timeout');
      }, PONG_TIMEOUT_MS);
    }, PING_EVERY_MS);
  }

  _scheduleRetry() {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    const delay = Math.round(ceiling * (0.5 + Math.random() * 0.5));
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this._setState('waiting', { retryInMs: delay });
    this.timers.retry = setTimeout(() => this._connect(), delay);
  }
}
