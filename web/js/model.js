// What the client knows: the user, people, rooms with a window of their
// messages, receipts, presence, typing, and the outbox of messages not yet
// acknowledged. It applies server frames and HTTP answers, and tells views
// what changed through `onChange(what, roomId)`. It never touches the DOM.
//
// Exactly-once display: a room's messages are a Map keyed by `seq`, so a
// message that arrives twice (live, catch-up, history, a retried send) is
// shown once. A pending message is keyed by its `client_id` until its `ack`
// (or the message itself, after a reconnect) gives it a seq.

const OUTBOX_KEY = 'confab.outbox.';
const TYPING_SHOWN_MS = 4000;

export class Model {
  constructor(me) {
    this.me = me;
    this.users = new Map([[me.id, me]]);
    this.rooms = new Map();
    this.presence = new Map();
    this.contacts = [];
    this.onChange = () => {};
    this.outbox = this.loadOutbox();
  }

  // ---- people -------------------------------------------------------------

  addUser(u) {
    if (u && u.id) this.users.set(u.id, u);
  }

  name(userId) {
    if (userId === this.me.id) return this.me.display_name;
    const u = this.users.get(userId);
    return u ? u.display_name : userId;
  }

  /** The other member of a direct room. */
  peer(room) {
    return room.kind === 'direct' ? room.members.find((id) => id !== this.me.id) || null : null;
  }

  title(room) {
    if (room.kind === 'group') return room.name || '';
    const p = this.peer(room);
    return p ? this.name(p) : this.me.display_name;
  }

  // ---- rooms --------------------------------------------------------------

  /** Merges a room object from the server (GET /rooms, a `room` frame, …). */
  upsertRoom(obj) {
    for (const u of obj.members || []) this.addUser(u);
    let r = this.rooms.get(obj.id);
    if (!r) {
      r = {
        id: obj.id,
        seen: obj.last_seq || 0,
        lastSeq: 0,
        msgs: new Map(),
        loaded: false,
        lo: 0,
        hi: 0,
        hasNewer: false,
        unread: 0,
        last: null,
        reads: {},
        delivered: {},
        typing: new Map(),
        createdAt: obj.created_at,
        loading: false,
      };
      this.rooms.set(obj.id, r);
    }
    r.kind = obj.kind;
    r.name = obj.name;
    r.owner = obj.owner;
    r.members = (obj.members || []).map((u) => u.id);
    r.createdAt = obj.created_at;
    r.lastSeq = Math.max(r.lastSeq, obj.last_seq || 0);
    if (obj.last_message !== undefined && obj.last_message) {
      if (!r.last || obj.last_message.seq >= r.last.seq) r.last = obj.last_message;
    }
    if (typeof obj.unread === 'number') r.unread = obj.unread;
    if (obj.reads) {
      for (const [u, s] of Object.entries(obj.reads)) r.reads[u] = Math.max(r.reads[u] || 0, s);
    }
    if (r.loaded && !r.hasNewer && r.lastSeq > r.hi) r.hasNewer = true;
    this.onChange('room', r.id);
    return r;
  }

  removeRoom(id) {
    const r = this.rooms.get(id);
    if (!r) return null;
    this.rooms.delete(id);
    for (const p of this.outbox) {
      if (p.room === id && p.state !== 'failed') {
        p.state = 'failed';
        p.error = 'room_not_found';
      }
    }
    this.saveOutbox();
    this.onChange('room_removed', id);
    return r;
  }

  /** Rooms by last activity, newest first. */
  sortedRooms() {
    const activity = (r) => {
      const pend = this.outbox.filter((p) => p.room === r.id);
      const lastPending = pend.length ? pend[pend.length - 1].ts : 0;
      return Math.max(r.last && !r.last.unreadable ? r.last.ts : r.createdAt || 0, lastPending);
    };
    return [...this.rooms.values()].sort((a, b) => activity(b) - activity(a));
  }

  /** room → last seq seen, for `resume`. */
  resumePositions() {
    const out = {};
    for (const r of this.rooms.values()) out[r.id] = r.seen;
    return out;
  }

  // ---- messages -----------------------------------------------------------

  /** Sets the loaded window from a history page (the latest, or around a seq). */
  setWindow(roomId, msgs) {
    const r = this.rooms.get(roomId);
    if (!r) return;
    r.msgs = new Map();
    for (const m of msgs) this.putMsg(r, m);
    r.loaded = true;
    r.lo = msgs.length ? msgs[0].seq : r.seen + 1;
    r.hi = msgs.length ? msgs[msgs.length - 1].seq : r.seen;
    // Whatever arrived live while the page was on its way is fetched next.
    r.hasNewer = r.hi < Math.max(r.seen, r.lastSeq);
    this.onChange('messages', roomId);
  }

  /** Adds an older page (ascending) in front of the window. */
  prependPage(roomId, msgs) {
    const r = this.rooms.get(roomId);
    if (!r) return;
    for (const m of msgs) this.putMsg(r, m);
    if (msgs.length) r.lo = Math.min(r.lo, msgs[0].seq);
    else r.lo = 1;
    this.onChange('messages', roomId);
  }

  /** Adds a newer page (ascending) after the window; `done` when it reached the end. */
  appendPage(roomId, msgs, done) {
    const r = this.rooms.get(roomId);
    if (!r) return;
    for (const m of msgs) this.putMsg(r, m);
    if (msgs.length) r.hi = Math.max(r.hi, msgs[msgs.length - 1].seq);
    if (done) r.hasNewer = false;
    this.onChange('messages', roomId);
  }

  putMsg(r, m) {
    r.msgs.set(m.seq, m);
    r.seen = Math.max(r.seen, m.seq);
    r.lastSeq = Math.max(r.lastSeq, m.seq);
    if (!r.last || m.seq >= r.last.seq) r.last = m;
    this.settlePending(m);
  }

  /** A live or catch-up message. Returns true when it was new. */
  message(m, { viewing }) {
    const r = this.rooms.get(m.room);
    if (!r) return false;
    const isNew = m.seq > r.seen && !r.msgs.has(m.seq);
    r.seen = Math.max(r.seen, m.seq);
    r.lastSeq = Math.max(r.lastSeq, m.seq);
    if (!r.last || m.seq >= r.last.seq) r.last = m;
    if (r.loaded && !r.hasNewer) {
      if (m.seq <= r.hi + 1) {
        r.msgs.set(m.seq, m);
        r.hi = Math.max(r.hi, m.seq);
      } else {
        // A gap (an ack overtaking a message): the view fetches it rather than hide it.
        r.hasNewer = true;
      }
    }
    this.settlePending(m);
    r.typing.delete(m.from);
    if (isNew && m.from !== this.me.id && !viewing) r.unread += 1;
    // Sending moves the sender's read position to their message (PROTOCOL.md).
    r.reads[m.from] = Math.max(r.reads[m.from] || 0, m.seq);
    this.onChange('message', m.room);
    return isNew;
  }

  /** A pending message that now has a seq (ack or the stored message itself) leaves the outbox. */
  settlePending(m) {
    if (m.from !== this.me.id) return;
    const i = this.outbox.findIndex((p) => p.room === m.room && p.client_id === m.client_id);
    if (i >= 0) {
      this.outbox.splice(i, 1);
      this.saveOutbox();
    }
  }

  ack(f) {
    const p = this.outbox.find((x) => x.room === f.room && x.client_id === f.client_id);
    const text = p ? p.text : null;
    if (text === null) {
      // Not ours any more (already settled by the catch-up copy): nothing to add.
      return;
    }
    this.message(
      { room: f.room, seq: f.seq, from: this.me.id, ts: f.ts, text, client_id: f.client_id },
      { viewing: true },
    );
  }

  receipt(f) {
    const r = this.rooms.get(f.room);
    if (!r) return;
    const map = f.kind === 'read' ? r.reads : r.delivered;
    map[f.user] = Math.max(map[f.user] || 0, f.seq);
    this.onChange('receipt', f.room);
  }

  /** sent | delivered | read, for one of my messages. */
  tick(r, seq) {
    const others = r.members.filter((id) => id !== this.me.id);
    if (others.length === 0) return 'sent';
    if (others.every((u) => (r.reads[u] || 0) >= seq)) return 'read';
    if (others.every((u) => Math.max(r.delivered[u] || 0, r.reads[u] || 0) >= seq)) return 'delivered';
    return 'sent';
  }

  typing(f) {
    const r = this.rooms.get(f.room);
    if (!r || f.user === this.me.id) return;
    r.typing.set(f.user, Date.now() + TYPING_SHOWN_MS);
    this.onChange('typing', f.room);
    setTimeout(() => this.onChange('typing', f.room), TYPING_SHOWN_MS + 50);
  }

  /** Who is typing in a room right now. */
  typers(r) {
    const now = Date.now();
    const out = [];
    for (const [u, until] of r.typing) {
      if (until > now) out.push(u);
      else r.typing.delete(u);
    }
    return out;
  }

  setPresence(f) {
    this.presence.set(f.user, { online: f.online, last_seen: f.last_seen });
    this.onChange('presence', null);
  }

  markRead(r) {
    r.unread = 0;
    r.reads[this.me.id] = Math.max(r.reads[this.me.id] || 0, r.seen);
    this.onChange('room', r.id);
  }

  // ---- outbox -------------------------------------------------------------

  /** Queues a message; it stays until acked (persisted, so a reload keeps it). */
  queue(room, clientId, text) {
    const p = { room, client_id: clientId, text, ts: Date.now(), state: 'queued', error: null };
    this.outbox.push(p);
    this.saveOutbox();
    this.onChange('message', room);
    return p;
  }

  pendingIn(roomId) {
    return this.outbox.filter((p) => p.room === roomId);
  }

  failPending(roomId, clientId, code) {
    const p = this.outbox.find((x) => x.room === roomId && x.client_id === clientId);
    if (!p) return;
    p.state = 'failed';
    p.error = code;
    this.saveOutbox();
    this.onChange('message', roomId);
  }

  dropPending(roomId, clientId) {
    this.outbox = this.outbox.filter((x) => !(x.room === roomId && x.client_id === clientId));
    this.saveOutbox();
    this.onChange('message', roomId);
  }

  loadOutbox() {
    try {
      const raw = localStorage.getItem(OUTBOX_KEY + this.me.id);
      const list = raw ? JSON.parse(raw) : [];
      return Array.isArray(list) ? list.filter((p) => p && p.room && p.client_id && typeof p.text === 'string') : [];
    } catch {
      return [];
    }
  }

  saveOutbox() {
    try {
      if (this.outbox.length) localStorage.setItem(OUTBOX_KEY + this.me.id, JSON.stringify(this.outbox));
      else localStorage.removeItem(OUTBOX_KEY + this.me.id);
    } catch {
      // Storage full or disabled: the queue still lives in memory.
    }
  }

  clearOutbox() {
    this.outbox = [];
    this.saveOutbox();
  }
}
