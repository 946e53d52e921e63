// The open conversation: header (title, presence / typing, actions), the
// message log (bubbles, day separators, ticks, older pages on scroll up) and
// the composer (Enter sends, Shift+Enter is a new line, and Enter while an
// IME composition is in progress — Korean, Japanese, Chinese input — never
// sends).

import { avatar, charCount, daysAgo, fmtDay, fmtFull, fmtLastSeen, fmtMoney, fmtTime, h, setChildren } from './dom.js';
import { t } from './i18n.js';
import { icon } from './icons.js';

const PAGE = 50;
const NEAR_EDGE_PX = 120;

export class ChatView {
  constructor(app) {
    this.app = app;
    this.roomId = null;
    this.nodes = new Map();
    this.el = h('section', { class: 'chat', 'aria-label': t('chats') });
    this.lastTypingSent = 0;
    this.drafts = new Map();
    this.showEmpty();
  }

  get model() {
    return this.app.model;
  }

  showEmpty() {
    this.roomId = null;
    this.nodes = new Map();
    setChildren(this.el, h('div', { class: 'chat-empty' }, h('p', null, t('pick_chat'))));
  }

  /** Opens a room; with `focusSeq`, scrolled to that message (from a search hit). */
  async open(roomId, focusSeq) {
    const r = this.model.rooms.get(roomId);
    if (!r) return;
    if (this.roomId && this.input) this.drafts.set(this.roomId, this.input.value);
    this.roomId = roomId;
    this.nodes = new Map();
    this.build(r);
    this.input.value = this.drafts.get(roomId) || '';
    this.autosize();
    try {
      if (focusSeq) {
        const after = Math.max(0, focusSeq - Math.floor(PAGE / 2));
        const page = await this.app.api.get(`/rooms/${roomId}/messages?after=${after}&limit=${PAGE}`);
        if (this.roomId !== roomId) return;
        this.model.setWindow(roomId, page.messages);
        this.render();
        this.scrollToSeq(focusSeq);
      } else {
        if (!r.loaded) {
          const page = await this.app.api.get(`/rooms/${roomId}/messages?limit=${PAGE}`);
          if (this.roomId !== roomId) return;
          this.model.setWindow(roomId, page.messages);
        }
        this.render();
        this.scrollToBottom();
        await this.fillNewer();
      }
      await this.fillViewport();
    } catch (e) {
      this.showError(e);
    }
    this.app.markRead(roomId);
  }

  build(r) {
    const isGroup = r.kind === 'group';
    this.title = h('h2', { class: 'chat-title' });
    this.subtitle = h('p', { class: 'chat-sub', 'aria-live': 'polite' });
    this.headAvatar = h('span');
    const actions = h('div', { class: 'chat-actions' });
    if (isGroup) {
      actions.append(h('button', { type: 'button', class: 'icon', 'aria-label': t('group_info'), title: t('group_info'), onclick: () => this.app.dialogs.groupInfo(r.id) }, icon('info')));
    } else {
      actions.append(h('button', { type: 'button', class: 'icon', 'aria-label': t('send_money'), title: t('send_money'), onclick: () => this.app.dialogs.sendMoney(this.model.peer(r)) }, icon('money')));
    }
    const header = h(
      'header',
      { class: 'chat-head' },
      h('button', { type: 'button', class: 'icon back', 'aria-label': t('back'), title: t('back'), onclick: () => this.app.closeChat() }, icon('back')),
      this.headAvatar,
      h('div', { class: 'chat-names' }, this.title, this.subtitle),
      actions,
    );
    this.log = h('div', { class: 'log', role: 'log', 'aria-label': t('message'), tabindex: '0' });
    this.log.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.notice = h('p', { class: 'chat-notice', role: 'alert', hidden: true });
    this.jump = h('button', { type: 'button', class: 'jump', hidden: true, 'aria-label': t('jump_latest'), title: t('jump_latest'), onclick: () => this.jumpToLatest() }, icon('down'));
    this.input = h('textarea', { rows: '1', 'aria-label': t('message'), placeholder: t('message_placeholder'), enterkeyhint: 'send', dir: 'auto' });
    this.input.addEventListener('keydown', (e) => this.onKey(e));
    this.input.addEventListener('input', () => this.onInput());
    this.sendBtn = h('button', { type: 'submit', class: 'send' }, t('send'));
    const form = h('form', { class: 'composer', onsubmit: (e) => { e.preventDefault(); this.submit(); } }, this.input, this.sendBtn);
    setChildren(this.el, header, h('div', { class: 'log-wrap' }, this.log, this.jump), this.notice, form);
    this.el.setAttribute('aria-label', this.model.title(r));
    this.renderHeader();
  }

  showError(e) {
    this.notice.textContent = e && e.message ? e.message : String(e);
    this.notice.hidden = false;
  }

  // ---- composer -----------------------------------------------------------

  onKey(e) {
    if (e.key !== 'Enter' || e.shiftKey) return;
    // The Enter that confirms an IME composition is not a "send" (keyCode 229 on some browsers).
    if (e.isComposing || e.keyCode === 229) return;
    e.preventDefault();
    this.submit();
  }

  onInput() {
    this.autosize();
    const now = Date.now();
    if (this.input.value && now - this.lastTypingSent > 2500 && this.roomId) {
      this.lastTypingSent = now;
      this.app.conn?.send({ type: 'typing', room: this.roomId });
    }
  }

  autosize() {
    this.input.style.height = 'auto';
    const full = this.input.scrollHeight;
    this.input.style.height = `${Math.min(full, 160)}px`;
    this.input.style.overflowY = full > 160 ? 'auto' : 'hidden';
  }

  submit() {
    const text = this.input.value;
    if (!text.trim() || !this.roomId) return;
    const n = charCount(text);
    const max = this.app.maxTextChars;
    if (n > max) {
      this.showError(t('too_long', { n, max }));
      return;
    }
    this.notice.hidden = true;
    this.lastTypingSent = 0;
    this.input.value = '';
    this.drafts.delete(this.roomId);
    this.autosize();
    this.app.sendText(this.roomId, text);
    this.stick = true;
    this.render();
    this.scrollToBottom();
  }

  // ---- rendering ----------------------------------------------------------

  renderHeader() {
    const r = this.model.rooms.get(this.roomId);
    if (!r) return;
    const title = this.model.title(r);
    this.title.textContent = title;
    setChildren(this.headAvatar, avatar(title, r.kind === 'direct' ? this.model.peer(r) || r.id : r.id));
    const typers = this.model.typers(r);
    let sub = '';
    this.subtitle.classList.toggle('is-typing', typers.length > 0);
    if (typers.length) {
      sub = r.kind === 'direct' ? t('typing') : t('typing_named', { name: typers.map((u) => this.model.name(u)).join(', ') });
    } else if (r.kind === 'direct') {
      const p = this.model.presence.get(this.model.peer(r));
      if (p && p.online) sub = t('online');
      else if (p && p.last_seen) sub = fmtLastSeen(p.last_seen);
    } else {
      const names = r.members.map((u) => (u === this.model.me.id ? t('you') : this.model.name(u)));
      sub = names.join(', ');
    }
    this.subtitle.textContent = sub;
  }

  /** Re-renders the log, keeping one DOM node per message and moving as little as possible. */
  render() {
    const r = this.model.rooms.get(this.roomId);
    if (!r) return;
    const log = this.log;
    const fromBottom = log.scrollHeight - log.scrollTop - log.clientHeight;
    const atBottom = fromBottom < 40 || this.stick;
    this.stick = false;
    const me = this.model.me.id;
    const seqs = [...r.msgs.keys()].sort((a, b) => a - b);
    const desired = [];
    if (r.lo > 1 && r.loaded) desired.push(this.keyed('older', 'x', () => h('p', { class: 'older', role: 'status' }, t('load_older'))));
    let lastDay = null;
    let lastFrom = null;
    const add = (item, pending) => {
      // A message the server could not read (`unreadable`) has no time or
      // sender: it sits in the day and the run of the message before it.
      if (item.unreadable) {
        desired.push(this.keyed(`s${item.seq}`, 'unreadable', () => this.bubble(r, item, { own: false, showName: false, state: null })));
        lastFrom = null;
        return;
      }
      const day = new Date(item.ts).toDateString();
      if (day !== lastDay) {
        lastDay = day;
        lastFrom = null;
        const label = fmtDay(item.ts);
        desired.push(this.keyed(`d${day}`, `${label}`, () => h('div', { class: 'day', role: 'separator' }, h('span', null, label))));
      }
      const own = item.from === me;
      const showName = r.kind === 'group' && !own && item.from !== lastFrom;
      lastFrom = item.from;
      if (pending) {
        const key = `p${item.client_id}`;
        desired.push(this.keyed(key, `${item.state}|${item.error}`, () => this.bubble(r, item, { own: true, showName: false, state: item.state === 'failed' ? 'failed' : 'pending' })));
      } else {
        const state = own ? this.model.tick(r, item.seq) : null;
        desired.push(this.keyed(`s${item.seq}`, `${state}|${showName}|${daysAgo(item.ts)}`, () => this.bubble(r, item, { own, showName, state })));
      }
    };
    for (const s of seqs) add(r.msgs.get(s), false);
    if (!r.hasNewer) {
      for (const p of this.model.pendingIn(r.id)) add({ ...p, from: me }, true);
    }
    let cur = log.firstChild;
    for (const node of desired) {
      if (cur === node) cur = cur.nextSibling;
      else log.insertBefore(node, cur);
    }
    while (cur) {
      const next = cur.nextSibling;
      cur.remove();
      cur = next;
    }
    const keep = new Set(desired);
    for (const [k, v] of this.nodes) if (!keep.has(v.node)) this.nodes.delete(k);
    if (atBottom && !r.hasNewer) this.scrollToBottom();
    this.jump.hidden = !(r.hasNewer || log.scrollHeight - log.scrollTop - log.clientHeight > 400);
    this.renderHeader();
  }

  keyed(key, version, make) {
    const got = this.nodes.get(key);
    if (got && got.version === version) return got.node;
    const node = make();
    this.nodes.set(key, { node, version });
    return node;
  }

  bubble(r, m, { own, showName, state }) {
    if (m.unreadable) {
      const attrs = { class: 'msg their unreadable', id: `m-${r.id}-${m.seq}`, dataset: { seq: String(m.seq) } };
      return h('div', { class: 'row their' }, h('div', attrs, h('div', { class: 'text' }, t('unreadable_message'))));
    }
    const parts = [];
    if (showName) parts.push(h('div', { class: 'sender' }, this.model.name(m.from)));
    const payment = paymentOf(m);
    if (payment) {
      parts.push(h('div', { class: 'payment' }, h('span', { class: 'payment-label' }, t('payment')), h('strong', null, fmtMoney(payment.amount, payment.currency)), payment.note ? h('span', { class: 'payment-note' }, payment.note) : null));
    } else {
      parts.push(h('div', { class: 'text', dir: 'auto' }, m.text));
    }
    const meta = h('div', { class: 'meta' }, h('time', { datetime: new Date(m.ts).toISOString(), title: fmtFull(m.ts) }, fmtTime(m.ts)));
    if (own && state) {
      const label = t(`tick_${state}`);
      const glyph = { pending: 'clock', sent: 'check', delivered: 'checks', read: 'checks', failed: 'alert' }[state];
      meta.append(h('span', { class: `tick ${state}`, dataset: { state }, role: 'img', 'aria-label': label, title: label }, icon(glyph)));
    }
    parts.push(meta);
    if (state === 'failed') {
      parts.push(
        h(
          'div',
          { class: 'failed-note', role: 'alert' },
          t('failed_hint', { msg: m.error || '' }),
          ' ',
          h('button', { type: 'button', class: 'link', onclick: () => this.model.dropPending(r.id, m.client_id) }, t('delete')),
        ),
      );
    }
    const attrs = { class: `msg ${own ? 'own' : 'their'}${state === 'pending' ? ' pending' : ''}` };
    if (m.seq) {
      attrs.id = `m-${r.id}-${m.seq}`;
      attrs.dataset = { seq: String(m.seq) };
    } else {
      attrs.dataset = { clientId: m.client_id };
    }
    return h('div', { class: `row ${own ? 'own' : 'their'}` }, h('div', attrs, parts));
  }

  // ---- scrolling and paging -----------------------------------------------

  scrollToBottom() {
    this.log.scrollTop = this.log.scrollHeight;
  }

  scrollToSeq(seq) {
    const el = this.log.querySelector(`[data-seq="${seq}"]`);
    if (!el) return;
    el.scrollIntoView({ block: 'center' });
    el.classList.add('flash');
    setTimeout(() => el.classList.remove('flash'), 2500);
  }

  onScroll() {
    const log = this.log;
    if (log.scrollTop < NEAR_EDGE_PX) this.loadOlder();
    if (log.scrollHeight - log.scrollTop - log.clientHeight < NEAR_EDGE_PX) this.fillNewer();
    const r = this.model.rooms.get(this.roomId);
    if (r) this.jump.hidden = !(r.hasNewer || log.scrollHeight - log.scrollTop - log.clientHeight > 400);
  }

  async loadOlder() {
    const r = this.model.rooms.get(this.roomId);
    if (!r || !r.loaded || r.lo <= 1 || r.loading) return;
    r.loading = true;
    const roomId = r.id;
    try {
      const page = await this.app.api.get(`/rooms/${roomId}/messages?before=${r.lo}&limit=${PAGE}`);
      if (this.roomId !== roomId) return;
      const log = this.log;
      const fromBottom = log.scrollHeight - log.scrollTop;
      this.model.prependPage(roomId, page.messages);
      this.render();
      log.scrollTop = log.scrollHeight - fromBottom;
    } catch (e) {
      this.showError(e);
    } finally {
      r.loading = false;
    }
  }

  /** Fetches messages after the window until it reaches the latest (after a jump or a gap). */
  async fillNewer() {
    const r = this.model.rooms.get(this.roomId);
    if (!r || !r.loaded || !r.hasNewer || r.loadingNewer) return;
    r.loadingNewer = true;
    const roomId = r.id;
    try {
      while (r.hasNewer && this.roomId === roomId) {
        const page = await this.app.api.get(`/rooms/${roomId}/messages?after=${r.hi}&limit=${PAGE * 2}`);
        this.model.appendPage(roomId, page.messages, page.messages.length < PAGE * 2);
        this.render();
        if (page.messages.length === 0) break;
      }
    } catch (e) {
      this.showError(e);
    } finally {
      r.loadingNewer = false;
    }
    this.app.markRead(roomId);
  }

  /** Loads older pages until the log can scroll (so scrolling up can load more). */
  async fillViewport() {
    for (let i = 0; i < 5; i++) {
      const r = this.model.rooms.get(this.roomId);
      if (!r || r.lo <= 1 || this.log.scrollHeight > this.log.clientHeight + NEAR_EDGE_PX) return;
      await this.loadOlder();
    }
  }

  async jumpToLatest() {
    const r = this.model.rooms.get(this.roomId);
    if (!r) return;
    if (r.hasNewer) {
      const page = await this.app.api.get(`/rooms/${r.id}/messages?limit=${PAGE}`).catch((e) => {
        this.showError(e);
        return null;
      });
      if (!page) return;
      this.model.setWindow(r.id, page.messages);
      this.nodes = new Map();
    }
    this.stick = true;
    this.render();
    this.scrollToBottom();
  }

  /** Called by the app when the model changed for this room. */
  changed(what) {
    if (!this.roomId) return;
    if (what === 'typing' || what === 'presence' || what === 'room') {
      this.renderHeader();
      if (what !== 'room') return;
    }
    this.render();
    const r = this.model.rooms.get(this.roomId);
    if (r && r.hasNewer) {
      const log = this.log;
      if (log.scrollHeight - log.scrollTop - log.clientHeight < NEAR_EDGE_PX) this.fillNewer();
    }
  }
}

/** A payment message (from the wallet), or null for a plain text message. */
export function paymentOf(m) {
  if (m && m.kind === 'payment' && m.payment && Number.isFinite(Number(m.payment.amount))) return m.payment;
  return null;
}
