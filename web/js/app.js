// confab's browser client: boot, log in / sign up, then the chat shell
// (sidebar + open conversation) driven by one WebSocket. See
// docs/ARCHITECTURE.md ("Browser UI") for how the modules fit together.

import { Api, ApiError, explain } from './api.js';
import { ChatView } from './chat.js';
import { Connection } from './conn.js';
import { Dialogs } from './dialogs.js';
import { fmtMoney, h, newId, randomId, setChildren } from './dom.js';
import { LANG, t } from './i18n.js';
import { Model } from './model.js';
import { Sidebar } from './sidebar.js';

const TOKEN_KEY = 'confab.token';
/** Sends per second when draining a long offline queue (the server allows 50/s, burst 100). */
const FLUSH_PER_SEC = 40;

class App {
  constructor(root) {
    this.root = root;
    this.api = new Api();
    this.api.onUnauthorized = () => this.sessionEnded();
    this.model = null;
    this.conn = null;
    this.activeRoom = null;
    this.maxTextChars = 4096;
    this.readSent = new Map();
    this.renderQueued = false;
    this.dirtyRooms = new Set();
    this.everReady = false;
    document.documentElement.lang = LANG;
    // Coming back to the tab reads what arrived meanwhile in the open chat.
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible' && this.activeRoom) this.markRead(this.activeRoom);
    });
  }

  async boot() {
    let token = null;
    try {
      token = localStorage.getItem(TOKEN_KEY);
    } catch {
      token = null;
    }
    if (!token) return this.showLogin();
    this.api.token = token;
    try {
      const me = await this.api.get('/me');
      await this.start(me);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return;
      this.showLogin(explain(e));
    }
  }

  // ---- log in / sign up ---------------------------------------------------

  showLogin(message) {
    this.stop();
    document.title = t('app_name');
    const user = h('input', { id: 'login-user', name: 'username', autocomplete: 'username', autocapitalize: 'none', spellcheck: 'false', required: true });
    const pass = h('input', { id: 'login-pass', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
    const display = h('input', { id: 'login-display', name: 'display_name', autocomplete: 'name' });
    const err = h('p', { class: 'error', role: 'alert' }, message || '');
    const login = h('button', { type: 'submit' }, t('log_in'));
    const signup = h('button', { type: 'button', class: 'secondary' }, t('sign_up'));
    const run = async (kind) => {
      err.textContent = '';
      if (!user.value.trim() || !pass.value) {
        (user.value.trim() ? pass : user).focus();
        err.textContent = `${t('username')} / ${t('password')}?`;
        return;
      }
      login.disabled = true;
      signup.disabled = true;
      try {
        const body = { username: user.value.trim(), password: pass.value };
        if (kind === 'signup' && display.value.trim()) body.display_name = display.value.trim();
        const res = await this.api.post(kind === 'signup' ? '/signup' : '/login', body);
        try {
          localStorage.setItem(TOKEN_KEY, res.token);
        } catch {
          // Without storage the session lasts until the tab closes.
        }
        this.api.token = res.token;
        await this.start(res.user);
      } catch (e) {
        err.textContent = explain(e);
        login.disabled = false;
        signup.disabled = false;
      }
    };
    signup.addEventListener('click', () => run('signup'));
    const form = h(
      'form',
      { class: 'login-card', novalidate: true, onsubmit: (e) => { e.preventDefault(); run('login'); } },
      h('h1', null, t('app_name')),
      h('p', { class: 'hint' }, t('login_intro')),
      h('label', { for: user.id }, t('username')),
      user,
      h('label', { for: pass.id }, t('password')),
      pass,
      h('label', { for: display.id }, t('display_name')),
      display,
      err,
      h('div', { class: 'row-buttons' }, login, signup),
    );
    setChildren(this.root, h('main', { class: 'login' }, form));
    user.focus();
  }

  sessionEnded() {
    this.clearToken();
    this.showLogin(t('err_session_ended'));
  }

  clearToken() {
    this.api.token = null;
    try {
      localStorage.removeItem(TOKEN_KEY);
    } catch {
      // nothing stored
    }
  }

  /** Saves everything of the user's (GET /me/export, JSON Lines) as a file. */
  async exportData() {
    try {
      const blob = await this.api.download('/me/export');
      const url = URL.createObjectURL(blob);
      const a = document.createElement('a');
      a.href = url;
      a.download = `confab-${this.model ? this.model.me.username : 'export'}.jsonl`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (e) {
      this.sidebar.notify(t('export_failed', { reason: explain(e) }));
    }
  }

  async logout() {
    if (this.model && this.model.outbox.length) {
      if (!window.confirm(t('unsent_confirm', { n: this.model.outbox.length }))) return;
      this.model.clearOutbox();
    }
    try {
      await this.api.post('/logout');
    } catch {
      // Revocation failed (offline): the token is forgotten here anyway.
    }
    this.clearToken();
    this.showLogin();
  }

  stop() {
    if (this.conn) this.conn.stop();
    this.conn = null;
    this.model = null;
    this.activeRoom = null;
    this.everReady = false;
    this.dialogs?.close();
  }

  // ---- the chat shell -----------------------------------------------------

  async start(me) {
    this.stop();
    this.model = new Model(me);
    this.model.onChange = (what, roomId) => this.changed(what, roomId);
    this.sidebar = new Sidebar(this);
    this.chat = new ChatView(this);
    this.dialogs = new Dialogs(this);
    this.shell = h('div', { class: 'shell' }, this.sidebar.el, this.chat.el);
    setChildren(this.root, this.shell);
    this.sidebar.renderMe();
    document.title = `${me.display_name} · ${t('app_name')}`;
    const [rooms, contacts] = await Promise.all([this.api.get('/rooms'), this.api.get('/contacts').catch(() => ({ contacts: [] }))]);
    if (this.model?.me !== me) return;
    for (const r of rooms.rooms) this.model.upsertRoom(r);
    this.model.contacts = contacts.contacts;
    for (const c of contacts.contacts) this.model.addUser(c);
    this.sidebar.render();
    this.conn = new Connection({
      token: this.api.token,
      resume: () => this.model.resumePositions(),
      onFrame: (f) => this.onFrame(f),
      onState: (s, retryAt) => {
        this.sidebar.setConn(s, retryAt);
        this.shell.dataset.conn = s;
      },
      onUnauthorized: () => this.sessionEnded(),
    });
    this.conn.start();
  }

  /** Coalesces model changes into one render per task. */
  changed(what, roomId) {
    if (roomId) this.dirtyRooms.add(roomId);
    this.dirtyKinds = this.dirtyKinds || new Set();
    this.dirtyKinds.add(what);
    if (this.renderQueued) return;
    this.renderQueued = true;
    queueMicrotask(() => {
      this.renderQueued = false;
      const kinds = this.dirtyKinds;
      const rooms = this.dirtyRooms;
      this.dirtyKinds = new Set();
      this.dirtyRooms = new Set();
      if (!this.model) return;
      this.sidebar.render();
      if (this.activeRoom && (rooms.has(this.activeRoom) || kinds.has('presence'))) {
        for (const k of kinds) this.chat.changed(k);
      }
      for (const id of rooms) this.dialogs.roomChanged(id);
    });
  }

  onFrame(f) {
    const m = this.model;
    if (!m) return;
    switch (f.type) {
      case 'ready':
        m.me = f.user;
        m.addUser(f.user);
        for (const p of m.outbox) if (p.state === 'sent') p.state = 'queued';
        this.flushOutbox();
        if (this.everReady) this.refreshRooms();
        this.everReady = true;
        if (this.activeRoom) this.markRead(this.activeRoom);
        break;
      case 'message': {
        const viewing = this.viewing(f.room);
        m.message(f, { viewing });
        if (viewing) this.markRead(f.room);
        break;
      }
      case 'ack':
        m.ack(f);
        break;
      case 'receipt':
        m.receipt(f);
        break;
      case 'typing':
        m.typing(f);
        break;
      case 'presence':
        m.setPresence(f);
        break;
      case 'room':
        m.upsertRoom(f.room);
        break;
      case 'room_removed':
        this.roomGone(f.room);
        break;
      case 'error':
        this.frameError(f);
        break;
      case 'wallet':
        this.walletChanged(f.transfer);
        break;
      default:
        break;
    }
  }

  frameError(f) {
    const m = this.model;
    if (f.client_id && f.room) {
      if (f.code === 'rate_limited' || f.code === 'busy') {
        const p = m.outbox.find((x) => x.room === f.room && x.client_id === f.client_id);
        if (p) p.state = 'queued';
        setTimeout(() => this.flushOutbox(), 1000);
      } else {
        m.failPending(f.room, f.client_id, f.message || f.code);
      }
    } else if (f.room && f.code === 'room_not_found') {
      this.roomGone(f.room);
    }
  }

  /** A transfer of mine changed: tell about failures, refresh an open wallet. */
  walletChanged(tx) {
    if (!tx) return;
    if (tx.state === 'failed' && tx.direction === 'out') {
      const name = tx.counterparty ? tx.counterparty.display_name : '';
      this.sidebar.notify(t('transfer_failed', { amount: fmtMoney(tx.amount, tx.currency), name, why: tx.failure || '' }));
    }
    this.dialogs.walletChanged();
  }

  /** Re-reads the room list after a reconnect: rooms made or left while offline. */
  async refreshRooms() {
    try {
      const data = await this.api.get('/rooms');
      const m = this.model;
      if (!m) return;
      const ids = new Set(data.rooms.map((r) => r.id));
      for (const r of data.rooms) m.upsertRoom(r);
      for (const id of [...m.rooms.keys()]) if (!ids.has(id)) this.roomGone(id);
    } catch {
      // The next reconnect tries again.
    }
  }

  viewing(roomId) {
    return this.activeRoom === roomId && document.visibilityState === 'visible';
  }

  /** Sends queued messages in order, at most FLUSH_PER_SEC a second. */
  flushOutbox() {
    const m = this.model;
    if (!m || !this.conn || !this.conn.online) return;
    let budget = FLUSH_PER_SEC;
    for (const p of m.outbox) {
      if (p.state !== 'queued') continue;
      if (!m.rooms.has(p.room)) {
        m.failPending(p.room, p.client_id, 'room_not_found');
        continue;
      }
      if (budget === 0) {
        clearTimeout(this.flushTimer);
        this.flushTimer = setTimeout(() => this.flushOutbox(), 1000);
        return;
      }
      if (!this.conn.send({ type: 'send', room: p.room, client_id: p.client_id, text: p.text })) return;
      p.state = 'sent';
      budget -= 1;
    }
  }

  sendText(roomId, text) {
    this.model.queue(roomId, randomId(), text);
    this.flushOutbox();
  }

  markRead(roomId) {
    const m = this.model;
    const r = m && m.rooms.get(roomId);
    if (!r || !this.viewing(roomId)) return;
    if (r.unread) m.markRead(r);
    const sent = this.readSent.get(roomId) || 0;
    if (r.seen > sent && this.conn && this.conn.send({ type: 'read', room: roomId, seq: r.seen })) {
      this.readSent.set(roomId, r.seen);
      m.markRead(r);
    }
  }

  openRoom(roomId, focusSeq) {
    if (!this.model.rooms.has(roomId)) return;
    this.activeRoom = roomId;
    this.shell.classList.add('show-chat');
    this.sidebar.render();
    this.chat.open(roomId, focusSeq);
    setTimeout(() => this.chat.input?.focus(), 0);
  }

  closeChat() {
    this.activeRoom = null;
    this.shell.classList.remove('show-chat');
    this.chat.showEmpty();
    this.sidebar.render();
  }

  /** A room I left or was removed from. */
  roomGone(roomId) {
    const r = this.model.removeRoom(roomId);
    if (this.activeRoom === roomId) {
      this.closeChat();
      if (r) {
        const note = h('p', { class: 'chat-notice', role: 'alert', id: newId('gone') }, t('removed_from_room', { name: this.model.title(r) }));
        this.chat.el.append(note);
      }
    }
  }
}

const root = document.getElementById('app');
if (root) {
  const app = new App(root);
  app.boot();
}
