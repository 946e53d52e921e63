// The left column: who I am and the menu, the connection state, the search
// box with its results, and the conversation list (last activity first, with
// preview, time, unread badge and an online dot for direct chats).

import { appendHighlighted, appendRanges, avatar, debounce, fmtListTime, fmtMoney, h, setChildren } from './dom.js';
import { t } from './i18n.js';
import { explain } from './api.js';
import { paymentOf } from './chat.js';
import { icon } from './icons.js';

export class Sidebar {
  constructor(app) {
    this.app = app;
    this.connState = h('p', { class: 'conn', role: 'status', dataset: { state: 'connecting' } }, t('conn_connecting'));
    this.search = h('input', { type: 'text', 'aria-label': t('search'), placeholder: t('search_placeholder'), autocomplete: 'off', enterkeyhint: 'search', dir: 'auto' });
    this.results = h('div', { class: 'results', hidden: true, 'aria-label': t('search'), role: 'region' });
    this.list = h('ul', { class: 'rooms', 'aria-label': t('chats') });
    this.notice = h('p', { class: 'side-notice', role: 'alert', hidden: true });
    this.me = h('div', { class: 'me' });
    const runSearch = debounce(() => this.runSearch(), 300);
    this.search.addEventListener('input', () => (this.search.value.trim() ? runSearch() : this.hideResults()));
    this.search.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.isComposing && e.keyCode !== 229) this.runSearch();
      if (e.key === 'Escape') {
        this.search.value = '';
        this.hideResults();
      }
    });
    const menu = h(
      'nav',
      { class: 'menu', 'aria-label': t('menu') },
      h('button', { type: 'button', class: 'icon', 'aria-label': t('new_chat'), title: t('new_chat'), onclick: () => app.dialogs.newChat() }, icon('newChat')),
      h('button', { type: 'button', class: 'icon', 'aria-label': t('new_group'), title: t('new_group'), onclick: () => app.dialogs.newGroup() }, icon('group')),
      h('button', { type: 'button', class: 'icon', 'aria-label': t('wallet'), title: t('wallet'), onclick: () => app.dialogs.wallet() }, icon('wallet')),
      h('button', { type: 'button', class: 'icon', 'aria-label': t('privacy'), title: t('privacy'), onclick: () => app.dialogs.privacy() }, icon('lock')),
      h('button', { type: 'button', class: 'icon', 'aria-label': t('export_data'), title: t('export_data'), onclick: () => app.exportData() }, icon('download')),
      h('a', { class: 'icon', href: '/status', target: '_blank', rel: 'noopener', 'aria-label': t('status_page'), title: t('status_page') }, icon('chart')),
      h('button', { type: 'button', class: 'icon', 'aria-label': t('log_out'), title: t('log_out'), onclick: () => app.logout() }, icon('logout')),
    );
    this.el = h(
      'aside',
      { class: 'sidebar', 'aria-label': t('chats') },
      h('header', { class: 'side-head' }, this.me, menu),
      this.connState,
      this.notice,
      h('div', { class: 'search' }, this.search),
      this.results,
      this.list,
    );
  }

  get model() {
    return this.app.model;
  }

  /** Shows a message at the top of the sidebar until clicked. */
  notify(text) {
    this.notice.textContent = text;
    this.notice.hidden = false;
    this.notice.onclick = () => {
      this.notice.hidden = true;
    };
  }

  renderMe() {
    const me = this.model.me;
    setChildren(this.me, avatar(me.display_name, me.id), h('span', { class: 'me-name', title: `@${me.username}` }, me.display_name));
  }

  setConn(state, retryAt) {
    this.connState.dataset.state = state;
    clearInterval(this.connTimer);
    const show = () => {
      if (state === 'online') this.connState.textContent = t('conn_online');
      else if (state === 'connecting') this.connState.textContent = t('conn_connecting');
      else {
        const secs = Math.ceil((retryAt - Date.now()) / 1000);
        this.connState.textContent = secs > 0 ? t('conn_offline', { secs }) : t('conn_offline_now');
      }
    };
    show();
    if (state === 'offline') this.connTimer = setInterval(show, 1000);
  }

  render() {
    const rooms = this.model.sortedRooms();
    if (rooms.length === 0) {
      this.items = new Map();
      setChildren(this.list, h('li', { class: 'empty' }, t('no_chats')));
      return;
    }
    // One <li><button> per room, kept across renders (only its content is
    // redrawn), so focus and a click in progress survive live updates.
    this.items = this.items || new Map();
    const keep = new Set();
    const nodes = rooms.map((r) => {
      keep.add(r.id);
      let it = this.items.get(r.id);
      if (!it) {
        const button = h('button', { type: 'button', class: 'room', dataset: { room: r.id }, onclick: () => this.app.openRoom(r.id) });
        it = { li: h('li', null, button), button, version: null };
        this.items.set(r.id, it);
      }
      this.fill(it, r);
      return it.li;
    });
    for (const id of [...this.items.keys()]) if (!keep.has(id)) this.items.delete(id);
    let cur = this.list.firstChild;
    for (const node of nodes) {
      if (cur === node) cur = cur.nextSibling;
      else this.list.insertBefore(node, cur);
    }
    while (cur) {
      const next = cur.nextSibling;
      cur.remove();
      cur = next;
    }
  }

  /** Redraws one chat-list entry if what it shows changed. */
  fill(it, r) {
    const m = this.model;
    const title = m.title(r);
    const peer = m.peer(r);
    const online = peer && m.presence.get(peer)?.online;
    const typers = m.typers(r);
    const pend = m.pendingIn(r.id);
    const lastPending = pend.length ? pend[pend.length - 1] : null;
    let preview = '';
    let ts = r.createdAt;
    if (typers.length) preview = t('typing');
    else if (lastPending && (!r.last || lastPending.ts >= r.last.ts)) {
      preview = `${t('you')}: ${lastPending.text}`;
      ts = lastPending.ts;
    } else if (r.last && r.last.unreadable) {
      preview = t('unreadable_message');
    } else if (r.last) {
      const pay = paymentOf(r.last);
      const body = pay ? `${t('payment')} ${fmtMoney(pay.amount, pay.currency)}` : r.last.text;
      preview = r.last.from === m.me.id ? `${t('you')}: ${body}` : r.kind === 'group' ? `${m.name(r.last.from)}: ${body}` : body;
      ts = r.last.ts;
    }
    if (lastPending && r.last && !r.last.unreadable && r.last.ts > ts) ts = r.last.ts;
    const previewId = `pv-${r.id}`;
    const active = this.app.activeRoom === r.id;
    const b = it.button;
    b.classList.toggle('active', active);
    b.setAttribute('aria-label', title);
    b.setAttribute('aria-describedby', previewId);
    if (active) b.setAttribute('aria-current', 'true');
    else b.removeAttribute('aria-current');
    const timeText = ts ? fmtListTime(ts) : '';
    const version = JSON.stringify([title, online, preview, typers.length > 0, timeText, r.unread]);
    if (version === it.version) return;
    it.version = version;
    setChildren(
      b,
      h('span', { class: 'av-wrap' }, avatar(title, peer || r.id), online ? h('span', { class: 'dot', title: t('online') }) : null),
      h(
        'span',
        { class: 'room-body' },
        h('span', { class: 'room-top' }, h('span', { class: 'room-name', dir: 'auto' }, title), h('time', { class: 'room-time' }, timeText)),
        h(
          'span',
          { class: 'room-bottom' },
          h('span', { class: `preview${typers.length ? ' is-typing' : ''}`, id: previewId, dir: 'auto' }, preview),
          r.unread > 0 ? h('span', { class: 'badge', 'aria-label': `${r.unread} unread` }, String(r.unread)) : null,
        ),
      ),
    );
  }

  hideResults() {
    this.results.hidden = true;
    this.list.hidden = false;
    setChildren(this.results);
  }

  async runSearch() {
    const q = this.search.value.trim();
    if (!q) return this.hideResults();
    this.results.hidden = false;
    this.list.hidden = true;
    let data;
    try {
      data = await this.app.api.get(`/search?q=${encodeURIComponent(q)}&limit=30`);
    } catch (e) {
      if (this.search.value.trim() !== q) return;
      setChildren(this.results, h('p', { class: 'error', role: 'alert' }, t('search_failed', { msg: explain(e) })));
      return;
    }
    if (this.search.value.trim() !== q) return;
    const hits = (data && data.hits) || [];
    if (hits.length === 0) {
      setChildren(this.results, h('p', { class: 'hint' }, t('search_none')));
      return;
    }
    const terms = q.replaceAll('"', ' ').split(/\s+/).filter((w) => w && !w.includes(':'));
    setChildren(
      this.results,
      h(
        'ul',
        { class: 'hits' },
        hits.map((hit) => {
          const room = this.model.rooms.get(hit.room);
          const snippet = h('span', { class: 'snippet', dir: 'auto' });
          if (Array.isArray(hit.highlights)) appendRanges(snippet, hit.snippet || '', hit.highlights);
          else appendHighlighted(snippet, hit.snippet || hit.text || '', terms);
          return h(
            'li',
            null,
            h(
              'button',
              { type: 'button', class: 'hit', 'aria-label': `${room ? this.model.title(room) : hit.room} — ${hit.snippet || hit.text || ''}`, onclick: () => this.app.openRoom(hit.room, hit.seq) },
              h('span', { class: 'room-top' }, h('span', { class: 'room-name' }, room ? this.model.title(room) : hit.room), h('time', { class: 'room-time' }, fmtListTime(hit.ts))),
              h('span', { class: 'hit-from' }, `${this.model.name(hit.from)}: `, snippet),
            ),
          );
        }),
      ),
    );
  }
}
