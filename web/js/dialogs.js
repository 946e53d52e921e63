// Modal dialogs (native <dialog>: focus stays inside, Escape closes): new
// chat (find people, add contacts, start a direct chat), new group, group
// info (members, add, remove, leave), the wallet and "send money".

import { avatar, debounce, fmtFull, fmtMoney, h, newId, parseMoney, randomId, setChildren } from './dom.js';
import { t } from './i18n.js';
import { explain } from './api.js';
import { icon } from './icons.js';

export class Dialogs {
  constructor(app) {
    this.app = app;
    this.current = null;
  }

  get model() {
    return this.app.model;
  }

  /** Opens a modal with `title` and `body`; returns the <dialog>. */
  open(title, ...body) {
    this.close();
    const titleId = newId('dlg');
    const dlg = h(
      'dialog',
      { class: 'dialog', 'aria-labelledby': titleId },
      h('header', null, h('h2', { id: titleId }, title), h('button', { type: 'button', class: 'icon', 'aria-label': t('close'), title: t('close'), onclick: () => this.close() }, icon('close'))),
      h('div', { class: 'dialog-body' }, body),
    );
    dlg.addEventListener('close', () => {
      dlg.remove();
      if (this.current === dlg) this.current = null;
    });
    document.body.append(dlg);
    dlg.showModal();
    this.current = dlg;
    return dlg;
  }

  close() {
    if (this.current) this.current.close();
  }

  /** A labelled text field. */
  field(label, attrs) {
    const id = newId('f');
    const input = h('input', { id, type: 'text', autocomplete: 'off', ...attrs });
    return { input, el: h('div', { class: 'field' }, h('label', { for: id }, label), input) };
  }

  /** A people finder: a "find by username" field feeding `render(users)`. */
  finder(label, render) {
    const { input, el } = this.field(label, { autocapitalize: 'none', spellcheck: 'false' });
    const run = debounce(async () => {
      const q = input.value.trim();
      if (!q) return render(null);
      try {
        const data = await this.app.api.get(`/users?q=${encodeURIComponent(q)}&limit=20`);
        if (input.value.trim() === q) render(data.users.filter((u) => u.id !== this.model.me.id));
      } catch (e) {
        render(null, explain(e));
      }
    }, 200);
    input.addEventListener('input', run);
    return { input, el };
  }

  person(u, ...actions) {
    this.model.addUser(u);
    return h('li', { class: 'person' }, avatar(u.display_name, u.id), h('span', { class: 'person-name' }, u.display_name, h('small', null, ` @${u.username}`)), h('span', { class: 'person-actions' }, actions));
  }

  // ---- new chat -----------------------------------------------------------

  async newChat() {
    const list = h('ul', { class: 'people', 'aria-live': 'polite' });
    const err = h('p', { class: 'error', role: 'alert' });
    const contactIds = new Set(this.model.contacts.map((c) => c.id));
    const show = (users, errorText) => {
      err.textContent = errorText || '';
      const people = users ?? this.model.contacts;
      if (!people.length) {
        setChildren(list, h('li', { class: 'hint' }, users ? t('no_people') : t('no_contacts')));
        return;
      }
      setChildren(
        list,
        people.map((u) => {
          const add = h('button', { type: 'button', class: 'secondary', 'aria-label': `${t('add_contact')}: ${u.username}`, disabled: contactIds.has(u.id) }, contactIds.has(u.id) ? t('contact_added') : t('add_contact'));
          add.addEventListener('click', async () => {
            try {
              const c = await this.app.api.post('/contacts', { username: u.username });
              contactIds.add(c.id);
              if (!this.model.contacts.some((x) => x.id === c.id)) this.model.contacts.push(c);
              add.textContent = t('contact_added');
              add.disabled = true;
            } catch (e) {
              err.textContent = explain(e);
            }
          });
          const chat = h('button', { type: 'button', 'aria-label': `${t('start_chat')}: ${u.username}`, onclick: () => this.startDirect(u, err) }, t('start_chat'));
          return this.person(u, add, chat);
        }),
      );
    };
    const finder = this.finder(t('find_people'), show);
    this.open(t('new_chat'), finder.el, err, h('h3', null, t('contacts')), list);
    show(null);
    finder.input.focus();
  }

  async startDirect(u, err) {
    try {
      const room = await this.app.api.post('/rooms', { kind: 'direct', user_id: u.id });
      this.model.upsertRoom(room);
      this.close();
      this.app.openRoom(room.id);
    } catch (e) {
      err.textContent = explain(e);
    }
  }

  // ---- groups -------------------------------------------------------------

  newGroup() {
    const name = this.field(t('group_name'), { maxlength: '64', required: true });
    const chosen = new Map();
    const chips = h('ul', { class: 'chips', 'aria-label': t('group_members') });
    const list = h('ul', { class: 'people' });
    const err = h('p', { class: 'error', role: 'alert' });
    const renderChips = () =>
      setChildren(
        chips,
        [...chosen.values()].map((u) =>
          h('li', null, u.display_name, ' ', h('button', { type: 'button', class: 'icon small', 'aria-label': `${t('remove')}: ${u.username}`, onclick: () => { chosen.delete(u.id); renderChips(); } }, icon('close'))),
        ),
      );
    const show = (users, errorText) => {
      err.textContent = errorText || '';
      const people = users ?? this.model.contacts;
      setChildren(
        list,
        people.map((u) => this.person(u, h('button', { type: 'button', 'aria-label': `${t('add_member')}: ${u.username}`, onclick: () => { chosen.set(u.id, u); renderChips(); } }, t('add_member')))),
      );
    };
    const finder = this.finder(t('add_people'), show);
    const create = h('button', { type: 'submit' }, t('create_group'));
    const form = h('form', { class: 'stack' }, name.el, h('p', { class: 'label' }, t('group_members')), chips, finder.el, list, err, create);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      create.disabled = true;
      try {
        const room = await this.app.api.post('/rooms', { kind: 'group', name: name.input.value.trim(), member_ids: [...chosen.keys()] });
        this.model.upsertRoom(room);
        this.close();
        this.app.openRoom(room.id);
      } catch (e2) {
        err.textContent = explain(e2);
        create.disabled = false;
      }
    });
    this.open(t('new_group'), form);
    show(null);
    name.input.focus();
  }

  groupInfo(roomId) {
    const r = this.model.rooms.get(roomId);
    if (!r) return;
    const me = this.model.me.id;
    const err = h('p', { class: 'error', role: 'alert' });
    const members = h('ul', { class: 'people', 'aria-label': t('group_members') });
    const renderMembers = () => {
      const room = this.model.rooms.get(roomId);
      if (!room) return this.close();
      setChildren(
        members,
        room.members.map((id) => {
          const u = this.model.users.get(id) || { id, username: id, display_name: id };
          const actions = [];
          if (id === room.owner) actions.push(h('small', { class: 'owner' }, t('owner')));
          if (room.owner === me && id !== me) {
            actions.push(h('button', { type: 'button', class: 'secondary', 'aria-label': `${t('remove')}: ${u.username}`, onclick: () => this.removeMember(roomId, id, err) }, t('remove')));
          }
          return this.person(u, actions);
        }),
      );
    };
    const results = h('ul', { class: 'people' });
    const finder = this.finder(t('add_people'), (users, errorText) => {
      err.textContent = errorText || '';
      const room = this.model.rooms.get(roomId);
      setChildren(
        results,
        (users || []).filter((u) => room && !room.members.includes(u.id)).map((u) =>
          this.person(u, h('button', { type: 'button', 'aria-label': `${t('add_member')}: ${u.username}`, onclick: async () => {
            try {
              this.model.upsertRoom(await this.app.api.post(`/rooms/${roomId}/members`, { user_id: u.id }));
              finder.input.value = '';
              setChildren(results);
              renderMembers();
            } catch (e) {
              err.textContent = explain(e);
            }
          } }, t('add_member'))),
        ),
      );
    });
    const leave = h('button', { type: 'button', class: 'danger', onclick: () => this.removeMember(roomId, me, err) }, t('leave_group'));
    const dlg = this.open(`${t('group_info')}: ${r.name}`, h('h3', null, t('group_members')), members, finder.el, results, err, leave);
    dlg.refresh = renderMembers;
    dlg.roomId = roomId;
    renderMembers();
  }

  async removeMember(roomId, userId, err) {
    try {
      await this.app.api.del(`/rooms/${roomId}/members/${userId}`);
      if (userId === this.model.me.id) {
        this.close();
        this.app.roomGone(roomId);
      } else {
        const room = await this.app.api.get(`/rooms/${roomId}`);
        this.model.upsertRoom(room);
        this.current?.refresh?.();
      }
    } catch (e) {
      err.textContent = explain(e);
    }
  }

  /** Privacy: who sees my presence, who may add me to groups. Each choice
   *  is saved when it changes. */
  async privacy() {
    const err = h('p', { class: 'error', role: 'alert' });
    const saved = h('p', { class: 'hint', role: 'status' });
    const choice = (name, label, options) => {
      const id = newId('p');
      const select = h('select', { id, name }, options.map((o) => h('option', { value: o }, t(`audience_${o}`))));
      select.addEventListener('change', async () => {
        err.textContent = '';
        saved.textContent = '';
        try {
          const now = await this.app.api.put('/me/privacy', { [name]: select.value });
          select.value = now[name];
          saved.textContent = t('privacy_saved');
        } catch (e) {
          err.textContent = explain(e);
        }
      });
      return { select, el: h('div', { class: 'field' }, h('label', { for: id }, label), select) };
    };
    const presence = choice('presence', t('privacy_presence'), ['everyone', 'contacts', 'nobody']);
    const groups = choice('group_adds', t('privacy_group_adds'), ['everyone', 'contacts', 'nobody']);
    this.open(t('privacy'), h('p', { class: 'hint' }, t('privacy_intro')), presence.el, groups.el, saved, err);
    try {
      const now = await this.app.api.get('/me/privacy');
      presence.select.value = now.presence;
      groups.select.value = now.group_adds;
    } catch (e) {
      err.textContent = explain(e);
    }
  }

  /** A transfer changed: an open wallet dialog reloads. */
  walletChanged() {
    if (this.current && this.current.reloadWallet) this.current.reloadWallet();
  }

  /** Called when a room changed: an open group-info dialog re-renders. */
  roomChanged(roomId) {
    if (this.current && this.current.roomId === roomId && this.current.refresh) this.current.refresh();
  }

  // ---- wallet -------------------------------------------------------------

  async wallet() {
    const balance = h('p', { class: 'balance', role: 'status' }, '…');
    const err = h('p', { class: 'error', role: 'alert' });
    const history = h('ul', { class: 'txs', 'aria-label': t('history') });
    const recipient = this.field(t('recipient'), { autocapitalize: 'none', spellcheck: 'false' });
    const form = this.transferForm(async (body) => {
      const name = recipient.input.value.trim();
      const found = await this.app.api.get(`/users?q=${encodeURIComponent(name)}&limit=50`);
      const u = found.users.find((x) => x.username === name.toLowerCase());
      if (!u) throw new Error(`${t('no_people')} (${name})`);
      return { ...body, to_user_id: u.id };
    }, () => load(), recipient.el);
    const dlg = this.open(t('wallet'), h('h3', null, t('balance')), balance, err, h('h3', null, t('send_money')), form, h('h3', null, t('history')), history);
    dlg.reloadWallet = () => load();
    const load = async () => {
      try {
        const w = await this.app.api.get('/wallet');
        this.currency = w.currency;
        balance.textContent = fmtMoney(w.balance, w.currency);
        const txs = await this.app.api.get('/wallet/transactions?limit=50');
        this.renderHistory(history, txs, load, err);
      } catch (e) {
        balance.textContent = '';
        err.textContent = t('wallet_unavailable', { msg: explain(e) });
      }
    };
    await load();
  }

  renderHistory(list, data, reload, err) {
    const items = (data && (data.transactions || data.items)) || [];
    if (!items.length) {
      setChildren(list, h('li', { class: 'hint' }, t('no_transactions')));
      return;
    }
    setChildren(
      list,
      items.map((tx) => {
        const who = tx.counterparty ? tx.counterparty.display_name || tx.counterparty.username : t('credit');
        const when = tx.executed_at || tx.execute_at || tx.created_at || tx.ts;
        const out = tx.direction === 'out';
        const repeat = tx.repeat ? ` · ${t(`repeat_${tx.repeat}`)}` : '';
        const cancel =
          tx.state === 'scheduled' && tx.id
            ? h('button', { type: 'button', class: 'secondary', 'aria-label': `${t('cancel_transfer')}: ${fmtMoney(tx.amount, tx.currency || this.currency || 'KRW')} → ${who}`, onclick: async () => {
                try {
                  await this.app.api.del(`/wallet/transfers/${tx.id}`);
                  reload();
                } catch (e) {
                  err.textContent = explain(e);
                }
              } }, t('cancel_transfer'))
            : null;
        return h(
          'li',
          { class: `tx ${tx.state || ''}` },
          h('span', { class: 'tx-who' }, who),
          h('strong', { class: out ? 'out' : 'in' }, `${out ? '−' : '+'}${fmtMoney(tx.amount, tx.currency || this.currency || 'KRW')}`),
          tx.note ? h('span', { class: 'tx-note' }, tx.note) : null,
          h('small', null, `${t(`state_${tx.state}`)}${repeat} · ${when ? fmtFull(when) : ''}${tx.failure ? ` · ${tx.failure}` : ''}`),
          cancel,
        );
      }),
    );
  }

  /** The amount / note / schedule form shared by the wallet and "send money". */
  transferForm(prepare, done, ...extra) {
    const amount = this.field(t('amount'), { inputmode: 'decimal', required: true });
    const note = this.field(t('note'), { maxlength: '200' });
    const when = this.field(t('schedule_for'), { type: 'datetime-local' });
    const repeatId = newId('f');
    const repeat = h('select', { id: repeatId }, h('option', { value: '' }, t('repeat_none')), h('option', { value: 'weekly' }, t('repeat_weekly')), h('option', { value: 'monthly' }, t('repeat_monthly')));
    const err = h('p', { class: 'error', role: 'alert' });
    const ok = h('p', { class: 'ok', role: 'status' });
    const submit = h('button', { type: 'submit' }, t('send_money'));
    const form = h('form', { class: 'stack' }, extra, amount.el, note.el, when.el, h('div', { class: 'field' }, h('label', { for: repeatId }, t('repeat')), repeat), err, ok, submit);
    // One key per intended transfer: a retry after a network error cannot charge twice.
    let key = randomId();
    form.addEventListener('input', () => {
      key = randomId();
    });
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      err.textContent = '';
      ok.textContent = '';
      const currency = this.currency || 'KRW';
      const minor = parseMoney(amount.input.value, currency);
      if (minor === null) {
        err.textContent = t('bad_amount');
        return;
      }
      const body = { amount: minor, idempotency_key: key };
      if (note.input.value.trim()) body.note = note.input.value.trim();
      if (when.input.value) body.execute_at = new Date(when.input.value).getTime();
      if (repeat.value) body.repeat = repeat.value;
      submit.disabled = true;
      try {
        const tx = await this.app.api.post('/wallet/transfers', await prepare(body));
        const shown = fmtMoney(minor, currency);
        ok.textContent = body.execute_at ? t('money_scheduled', { amount: shown, when: fmtFull(body.execute_at) }) : t('money_sent', { amount: shown });
        key = randomId();
        amount.input.value = '';
        note.input.value = '';
        done(tx);
      } catch (e2) {
        err.textContent = explain(e2);
      } finally {
        submit.disabled = false;
      }
    });
    return form;
  }

  async sendMoney(peerId) {
    if (!peerId) return;
    const name = this.model.name(peerId);
    const balance = h('p', { class: 'balance', role: 'status' });
    const form = this.transferForm(async (body) => ({ ...body, to_user_id: peerId }), () => this.refreshBalance(balance));
    this.open(`${t('send_money')}: ${name}`, balance, form);
    await this.refreshBalance(balance);
  }

  async refreshBalance(el) {
    try {
      const w = await this.app.api.get('/wallet');
      this.currency = w.currency;
      el.textContent = `${t('balance')}: ${fmtMoney(w.balance, w.currency)}`;
    } catch (e) {
      el.textContent = t('wallet_unavailable', { msg: explain(e) });
    }
  }
}
