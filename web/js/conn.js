// The WebSocket to /api/v1/ws: authenticates with the first frame, asks for
// catch-up (`resume`) from the last seq seen in each room, reconnects by
// itself with exponential back-off and jitter, and notices a dead link with
// a ping every 15 s (no frame for 35 s → reconnect).

const PING_EVERY_MS = 15000;
const DEAD_AFTER_MS = 35000;
const MAX_BACKOFF_MS = 10000;

export class Connection {
  /**
   * @param {object} o
   * @param {string} o.token
   * @param {() => object} o.resume  room → last seq seen, asked for at each (re)connect
   * @param {(frame: object) => void} o.onFrame  every server frame after `auth`
   * @param {(state: string, retryAt?: number) => void} o.onState  connecting | online | offline
   * @param {() => void} o.onUnauthorized  the server closed with 4001
   */
  constructor(o) {
    this.o = o;
    this.ws = null;
    this.state = 'offline';
    this.attempt = 0;
    this.timer = null;
    this.pinger = null;
    this.lastRx = 0;
    this.stopped = false;
    this.retryAt = 0;
    this.wake = () => this.retryNow();
    window.addEventListener('online', this.wake);
    document.addEventListener('visibilitychange', this.wake);
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    window.removeEventListener('online', this.wake);
    document.removeEventListener('visibilitychange', this.wake);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000);
    }
    this.setState('offline');
  }

  /** Sends a frame if the connection is authenticated; false otherwise. */
  send(frame) {
    if (this.state !== 'online' || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  get online() {
    return this.state === 'online';
  }

  setState(state) {
    this.state = state;
    this.o.onState(state, this.retryAt);
  }

  connect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.setState('connecting');
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let ws;
    try {
      ws = new WebSocket(`${scheme}//${location.host}/api/v1/ws`);
    } catch {
      this.lost(null);
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.lastRx = Date.now();
      ws.send(JSON.stringify({ type: 'auth', token: this.o.token, resume: this.o.resume() }));
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastRx = Date.now();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame.type === 'pong') return;
      if (frame.type === 'ready') {
        this.attempt = 0;
        this.startPinging(ws);
        this.setState('online');
      }
      this.o.onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.lost(ev.code);
    };
  }

  startPinging(ws) {
    clearInterval(this.pinger);
    this.pinger = setInterval(() => {
      if (this.ws !== ws) return;
      if (Date.now() - this.lastRx > DEAD_AFTER_MS) {
        // No frame for too long: the link is dead even if TCP has not noticed.
        this.ws = null;
        ws.close();
        this.lost(null);
        return;
      }
      if (ws.readyState === WebSocket.OPEN) ws.send('{"type":"ping"}');
    }, PING_EVERY_MS);
  }

  lost(code) {
    this.ws = null;
    clearInterval(this.pinger);
    if (this.stopped) return;
    if (code === 4001) {
      this.stopped = true;
      this.setState('offline');
      this.o.onUnauthorized();
      return;
    }
    const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** this.attempt);
    this.attempt += 1;
    const delay = Math.round(base / 2 + (Math.random() * base) / 2);
    this.retryAt = Date.now() + delay;
    this.timer = setTimeout(() => this.connect(), delay);
    this.setState('offline');
  }

  /** Reconnects at once if waiting for a retry (the network came back, the tab became visible). */
  retryNow() {
    if (this.stopped || this.state !== 'offline') return;
    if (document.visibilityState === 'hidden') return;
    this.attempt = Math.max(0, this.attempt - 1);
    this.connect();
  }
}
