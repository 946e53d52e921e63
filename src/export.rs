//! Export: a user's own data, or one room, as JSON Lines (one object per
//! line, each with a `type`), written from one read transaction so the
//! export is a consistent snapshot. Streams: memory stays constant however
//! many messages there are. The line types are documented in
//! `docs/PROTOCOL.md` ("Export").

use std::io::Write;

use redb::ReadTransaction;
use serde::Serialize;
use serde_json::json;

use crate::error::ApiError;
use crate::ids::{RoomId, UserId};
use crate::store::integrity::{self, Item};
use crate::store::{
    self, CONTACTS, MEMBERS, MESSAGES, Message, ROOMS, Rec, USER_ROOMS, USERNAMES, USERS,
    WALLET_ACCOUNTS, WALLET_TRANSFERS, WALLET_USER_TRANSFERS,
};
use crate::wallet::TransferIds;

pub const FORMAT: &str = "confab-export";
pub const FORMAT_VERSION: u32 = 1;

/// What to export.
#[derive(Debug, Clone)]
pub enum Scope {
    /// A user's profile, contacts, rooms, every message in them and wallet.
    User(UserId),
    /// The same, by username (case-insensitive).
    UserNamed(String),
    /// One room and all its messages.
    Room(RoomId),
}

/// The counts written in the final `end` line.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counts {
    pub rooms: u64,
    pub messages: u64,
    pub contacts: u64,
    pub transfers: u64,
    /// Messages that could not be read (damaged in the store): each has an
    /// `unreadable` line instead of a `message` line.
    pub damaged: u64,
}

/// A failed write: the reader went away or stalled, or the output failed.
/// Not logged here (as `ApiError::internal` would, as an error): whoever
/// runs the export knows why and logs it at the right level.
fn io(e: std::io::Error) -> ApiError {
    ApiError::new(
        hyper::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("export interrupted: {e}"),
    )
}

/// Writes `{"type": kind, ...fields of v}` and a newline.
pub(crate) fn line<W: Write, T: Serialize>(
    w: &mut W,
    kind: &str,
    v: &T,
    buf: &mut Vec<u8>,
) -> Result<(), ApiError> {
    buf.clear();
    serde_json::to_writer(&mut *buf, v).map_err(ApiError::internal)?;
    w.write_all(b"{\"type\":\"").map_err(io)?;
    w.write_all(kind.as_bytes()).map_err(io)?;
    w.write_all(b"\"").map_err(io)?;
    // `v` is an object: splice its fields in after the type.
    if buf.len() > 2 {
        w.write_all(b",").map_err(io)?;
    }
    w.write_all(&buf[1..]).map_err(io)?;
    w.write_all(b"\n").map_err(io)
}

/// Writes the export of `scope` from the snapshot `txn` to `w`, transfer
/// ids shown under `ids` (the server's, so they match the API's).
pub fn write<W: Write>(
    txn: &ReadTransaction,
    scope: Scope,
    ids: &TransferIds,
    w: &mut W,
) -> Result<Counts, ApiError> {
    let target = resolve(txn, &scope)?;
    let mut buf = Vec::with_capacity(1024);
    let mut counts = Counts::default();
    header(w, target, &mut buf)?;
    let users = txn.open_table(USERS)?;
    match target {
        Target::User(user) => {
            let Some(g) = users.get(user.0)? else {
                return Err(ApiError::user_not_found());
            };
            let rec: store::UserRecord = store::seal::open(Rec::Users, user.0, g.value())?;
            line(
                w,
                "user",
                &json!({
                    "id": user,
                    "username": rec.username,
                    "display_name": rec.display_name,
                    "created_at": rec.created_at,
                }),
                &mut buf,
            )?;
            let contacts = txn.open_table(CONTACTS)?;
            for entry in contacts.range((user.0, 0)..=(user.0, u64::MAX))? {
                let (k, added) = entry?;
                if let Some(u) = store::user_in(&users, UserId(k.value().1))? {
                    line(
                        w,
                        "contact",
                        &json!({"id": u.id, "username": u.username, "display_name": u.display_name, "added_at": added.value()}),
                        &mut buf,
                    )?;
                    counts.contacts += 1;
                }
            }
            let user_rooms = txn.open_table(USER_ROOMS)?;
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                let (k, joined) = entry?;
                let room = RoomId(k.value().1);
                room_and_messages(
                    txn,
                    room,
                    Some(joined.value()),
                    ids,
                    w,
                    &mut buf,
                    &mut counts,
                )?;
            }
            wallet(txn, user, ids, w, &mut buf, &mut counts)?;
        }
        Target::Room(room) => {
            if !room_and_messages(txn, room, None, ids, w, &mut buf, &mut counts)? {
                return Err(ApiError::room_not_found());
            }
        }
    }
    line(w, "end", &counts, &mut buf)?;
    w.flush().map_err(io)?;
    Ok(counts)
}

/// The room line, then every message of the room in seq order. False when
/// the room does not exist (nothing written).
fn room_and_messages<W: Write>(
    txn: &ReadTransaction,
    room: RoomId,
    joined_at: Option<i64>,
    ids: &TransferIds,
    w: &mut W,
    buf: &mut Vec<u8>,
    counts: &mut Counts,
) -> Result<bool, ApiError> {
    let rooms = txn.open_table(ROOMS)?;
    let members = txn.open_table(MEMBERS)?;
    let users = txn.open_table(USERS)?;
    let messages = txn.open_table(MESSAGES)?;
    let Some(view) = store::room_view(&rooms, &members, &users, &messages, room)? else {
        return Ok(false);
    };
    let mut v = serde_json::to_value(&view).map_err(ApiError::internal)?;
    if let Some(j) = joined_at {
        v["joined_at"] = j.into();
    }
    line(w, "room", &v, buf)?;
    counts.rooms += 1;
    drop(messages);
    // Every message, past damage: a damaged one (or one on a page that
    // cannot be read) is an `unreadable` line, and the rest still follow.
    integrity::visit_messages::<ApiError>(txn, Some(room.0), &mut |item| {
        let (seq, m) = match item {
            Item::Record { seq, value, .. } => (seq, Message::from_stored(room, seq, value, ids)),
            Item::Unreachable { seq, .. } => (seq, Message::unreadable(room, seq)),
            Item::Page { after, why } => {
                tracing::error!(room = %room, after = ?after, why, "export: a damaged page in the room's messages");
                return Ok(());
            }
        };
        if m.unreadable {
            line(w, "unreadable", &json!({"room": room, "seq": seq}), buf)?;
            counts.damaged += 1;
        } else {
            line(w, "message", &m, buf)?;
            counts.messages += 1;
        }
        Ok(())
    })?;
    Ok(true)
}

/// The user's balance and every transfer they see (as in their history),
/// oldest first.
fn wallet<W: Write>(
    txn: &ReadTransaction,
    user: UserId,
    ids: &TransferIds,
    w: &mut W,
    buf: &mut Vec<u8>,
    counts: &mut Counts,
) -> Result<(), ApiError> {
    let currency = ids.currency();
    let accounts = txn.open_table(WALLET_ACCOUNTS)?;
    let balance = accounts.get(user.0)?.map(|g| g.value()).unwrap_or(0);
    line(
        w,
        "wallet",
        &json!({"balance": balance, "currency": currency}),
        buf,
    )?;
    let mine = txn.open_table(WALLET_USER_TRANSFERS)?;
    let transfers = txn.open_table(WALLET_TRANSFERS)?;
    let users = txn.open_table(USERS)?;
    for entry in mine.range((user.0, 0)..=(user.0, u64::MAX))? {
        let id = entry?.0.value().1;
        if let Some(g) = transfers.get(id)? {
            let rec = crate::wallet::decode_transfer(id, g.value())?;
            if !rec.visible_to(user.0) {
                continue;
            }
            let view = crate::wallet::view(id, &rec, user.0, currency, ids, |u| {
                store::user_in(&users, UserId(u)).ok().flatten()
            });
            line(w, "transfer", &view, buf)?;
            counts.transfers += 1;
        }
    }
    Ok(())
}

/// An `io::Write` that hands 64 KiB chunks to an async consumer (an HTTP
/// body, the admin socket) through a bounded channel, so an export thread
/// streams at the pace of the reader. Writing fails once the receiver is
/// gone (the client went away), or when the reader has taken nothing for
/// the stall time (a client that stopped reading): either stops the export.
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    buf: Vec<u8>,
    stall: std::time::Duration,
    /// Why the last send failed, once one has.
    stopped: Option<Stopped>,
}

/// Why a [`ChannelWriter`] stopped taking data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The receiver was dropped: the client disconnected.
    Gone,
    /// The reader took no chunk for the whole stall time.
    Stalled,
}

pub(crate) const CHUNK: usize = 64 << 10;

impl ChannelWriter {
    /// A writer whose every send gives up after `stall` without room in
    /// the channel (the reader took nothing in that time).
    pub fn new(
        tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
        stall: std::time::Duration,
    ) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            stall,
            stopped: None,
        }
    }

    /// Why writing stopped, if it has.
    pub fn stopped(&self) -> Option<Stopped> {
        self.stopped
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = bytes::Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        match send_within(&self.tx, chunk, self.stall) {
            Ok(()) => Ok(()),
            Err(why) => {
                self.stopped = Some(why);
                Err(match why {
                    Stopped::Gone => {
                        std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader went away")
                    }
                    Stopped::Stalled => std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the reader took nothing for {} s", self.stall.as_secs_f64()),
                    ),
                })
            }
        }
    }
}

/// Wakes the thread that is waiting in [`send_within`].
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// Sends `chunk` into the async channel from a plain thread, waiting at
/// most `limit` for room. `blocking_send` would wait for ever (a client that
/// stops reading held its export thread, and with it a snapshot, until it
/// disconnected). This polls the channel's own `reserve` future and parks
/// the thread until the channel wakes it or the time is up: no tokio runtime
/// or timer is involved, so it works the same on any thread, during the
/// runtime's shutdown, and in tests without a runtime; and a dropped
/// receiver wakes it at once (`reserve` then fails), so a client that
/// disconnects frees its export promptly. (std's `SyncSender` has no timed
/// send, and the HTTP body needs an async receiver anyway.)
fn send_within(
    tx: &tokio::sync::mpsc::Sender<bytes::Bytes>,
    chunk: bytes::Bytes,
    limit: std::time::Duration,
) -> Result<(), Stopped> {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let deadline = std::time::Instant::now() + limit;
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let reserve = tx.reserve();
    let mut reserve = std::pin::pin!(reserve);
    loop {
        match reserve.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(permit)) => {
                permit.send(chunk);
                return Ok(());
            }
            Poll::Ready(Err(_)) => return Err(Stopped::Gone),
            Poll::Pending => {
                let now = std::time::Instant::now();
                if now >= deadline {
                    return Err(Stopped::Stalled);
                }
                // Spurious wake-ups only cost another poll.
                std::thread::park_timeout(deadline - now);
            }
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// What an admin `export` request asks for: `{"user": name}` or
/// `{"room": id}`.
pub fn scope_of(req: &serde_json::Value) -> Result<Scope, ApiError> {
    if let Some(name) = req["user"].as_str() {
        return Ok(Scope::UserNamed(name.to_string()));
    }
    if let Some(room) = req["room"].as_str() {
        let room: RoomId = room.parse().map_err(|_| ApiError::bad_id())?;
        return Ok(Scope::Room(room));
    }
    Err(ApiError::bad_request(
        "bad_request",
        "export needs a user or a room",
    ))
}

/// What a scope names, once looked up.
#[derive(Clone, Copy)]
pub(crate) enum Target {
    User(UserId),
    Room(RoomId),
}

/// The first line of every export (`scope`: "user" or "room").
pub(crate) fn header<W: Write>(
    w: &mut W,
    target: Target,
    buf: &mut Vec<u8>,
) -> Result<(), ApiError> {
    let (kind, id) = match target {
        Target::Room(r) => ("room", r.to_string()),
        Target::User(u) => ("user", u.to_string()),
    };
    line(
        w,
        "export",
        &json!({
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "scope": kind,
            "id": id,
            "created_at": store::now_ms(),
            "confab": crate::telemetry::VERSION,
        }),
        buf,
    )
}

/// Logs how an export that ended early ended (`stopped`: why its reader
/// stopped taking data, if it did).
pub(crate) fn log_early_end(
    scope: &Scope,
    e: &ApiError,
    stopped: Option<Stopped>,
    stall: std::time::Duration,
) {
    match stopped {
        Some(Stopped::Stalled) => tracing::warn!(
            ?scope,
            stall_secs = stall.as_secs_f64(),
            "export abandoned: its reader took nothing for export_stall_secs"
        ),
        Some(Stopped::Gone) => tracing::info!(?scope, "export stopped: its reader went away"),
        None => tracing::warn!(error = %e.message, ?scope, "export ended early"),
    }
}

/// Looks the scope up in the snapshot: `user_not_found` / `room_not_found`
/// unless it exists.
fn resolve(txn: &ReadTransaction, scope: &Scope) -> Result<Target, ApiError> {
    let target = match scope {
        Scope::UserNamed(name) => {
            let names = txn.open_table(USERNAMES)?;
            match names.get(name.to_lowercase().as_str())? {
                Some(g) => Target::User(UserId(g.value())),
                None => return Err(ApiError::user_not_found()),
            }
        }
        Scope::User(u) => Target::User(*u),
        Scope::Room(r) => Target::Room(*r),
    };
    let exists = match target {
        Target::User(u) => txn.open_table(USERS)?.get(u.0)?.is_some(),
        Target::Room(r) => txn.open_table(ROOMS)?.get(r.0)?.is_some(),
    };
    match (exists, target) {
        (true, _) => Ok(target),
        (false, Target::User(_)) => Err(ApiError::user_not_found()),
        (false, Target::Room(_)) => Err(ApiError::room_not_found()),
    }
}

/// Checks that the export can start (the user or room exists), so an error
/// can be reported before any output.
pub fn check(txn: &ReadTransaction, scope: &Scope) -> Result<(), ApiError> {
    resolve(txn, scope).map(drop)
}

/// Seconds a refused export is told to wait (`Retry-After`) when the
/// server-wide bound is full.
pub const RETRY_AFTER_SECS: u64 = 5;

/// The bounds on exports running at once: `export_concurrency` server-wide
/// and, for HTTP, one per user. An export holds an OS thread and a redb
/// snapshot for as long as it runs — as long as its reader lets it — so
/// without a bound, clients that ask and never read could hold any number
/// of both.
pub struct Exports {
    max: usize,
    stall: std::time::Duration,
    running: std::sync::Mutex<Running>,
}

#[derive(Default)]
struct Running {
    total: usize,
    users: std::collections::HashSet<UserId>,
}

/// One admitted export; dropping it (when the export's thread ends) frees
/// its place.
pub struct Slot {
    exports: std::sync::Arc<Exports>,
    user: Option<UserId>,
}

impl Exports {
    pub fn new(max: usize, stall: std::time::Duration) -> std::sync::Arc<Exports> {
        std::sync::Arc::new(Exports {
            max,
            stall,
            running: std::sync::Mutex::new(Running::default()),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        // The counts stay consistent even if a holder panicked (every
        // change is one statement).
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Exports running now.
    pub fn running_now(&self) -> usize {
        self.running().total
    }

    /// Admits one export for `user` (None: the operator's, through the
    /// admin socket, bound only server-wide): 429 `rate_limited` while the
    /// user has one running, 503 `busy` with `Retry-After` when
    /// `export_concurrency` are running.
    pub fn admit(self: &std::sync::Arc<Self>, user: Option<UserId>) -> Result<Slot, ApiError> {
        let mut r = self.running();
        if let Some(u) = user
            && r.users.contains(&u)
        {
            return Err(ApiError::new(
                hyper::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "an export of yours is already running; wait for it to finish",
            ));
        }
        if r.total >= self.max {
            let mut e = ApiError::busy(format!(
                "the server is running as many exports as it allows ({}); try again shortly",
                self.max
            ));
            e.retry_after = Some(RETRY_AFTER_SECS);
            return Err(e);
        }
        r.total += 1;
        if let Some(u) = user {
            r.users.insert(u);
        }
        Ok(Slot {
            exports: self.clone(),
            user,
        })
    }
}

impl Slot {
    /// How long a send may wait for a reader that takes nothing.
    pub fn stall(&self) -> std::time::Duration {
        self.exports.stall
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut r = self.exports.running();
        r.total = r.total.saturating_sub(1);
        if let Some(u) = self.user {
            r.users.remove(&u);
        }
    }
}

/// Starts an admitted export on its own OS thread; returns the receiving
/// end of its chunks. A dedicated thread, not tokio's blocking pool: an
/// export lives as long as its reader takes, and the pool is shared with
/// search (and was with backups), so stalled exports once filled it and
/// everyone's searches queued behind them. The thread ends, freeing the
/// slot, when the export is written, when the reader goes away, or when
/// the reader takes nothing for `export_stall_secs` (then the stream ends
/// without its `end` line, which tells the reader it is incomplete; a
/// failure after the first bytes ends it the same way).
pub fn spawn(
    db: std::sync::Arc<crate::store::db::Db>,
    scope: Scope,
    ids: TransferIds,
    slot: Slot,
) -> Result<tokio::sync::mpsc::Receiver<bytes::Bytes>, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stall = slot.exports.stall;
    std::thread::Builder::new()
        .name("confab-export".into())
        .spawn(move || {
            let mut w = ChannelWriter::new(tx, stall);
            let result = db.damage().scope(|| {
                db.begin_read().map_err(ApiError::from).and_then(|txn| {
                    let r = store::guard("the export", || write(&txn, scope.clone(), &ids, &mut w));
                    drop(txn);
                    r
                })
            });
            if let Err(e) = result {
                log_early_end(&scope, &e, w.stopped(), stall);
            }
            // The read transaction is gone; only now is the place freed.
            drop(slot);
        })
        .map_err(|e| {
            tracing::error!(error = %e, "cannot start an export thread");
            let mut e = ApiError::busy("cannot start an export now; try again shortly");
            e.retry_after = Some(RETRY_AFTER_SECS);
            e
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_reader_that_takes_nothing_stops_the_writer_after_the_stall_time() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let mut w = ChannelWriter::new(tx, Duration::from_millis(200));
        // The first chunk fits in the channel; the second waits for room.
        w.write_all(&[b'x'; CHUNK]).expect("first chunk");
        let started = Instant::now();
        let e = w.write_all(&[b'y'; CHUNK]).expect_err("nobody reads");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(w.stopped(), Some(Stopped::Stalled));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(190) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        // What was sent is still there for the reader.
        assert_eq!(rx.try_recv().expect("first chunk").len(), CHUNK);
    }

    #[test]
    fn a_reader_that_takes_a_chunk_in_time_keeps_the_export_going() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            while let Some(c) = rx.blocking_recv() {
                got += c.len();
                std::thread::sleep(Duration::from_millis(50));
            }
            got
        });
        let mut w = ChannelWriter::new(tx, Duration::from_secs(5));
        for _ in 0..6 {
            w.write_all(&[b'z'; CHUNK]).expect("the reader keeps up");
        }
        w.flush().expect("flush");
        drop(w);
        assert_eq!(reader.join().expect("reader"), 6 * CHUNK);
    }

    #[test]
    fn a_reader_that_goes_away_stops_a_waiting_writer_at_once() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut w = ChannelWriter::new(tx, Duration::from_secs(60));
        w.write_all(&[b'x'; CHUNK]).expect("first chunk");
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(rx);
        });
        let started = Instant::now();
        let e = w.write_all(&[b'y'; CHUNK]).expect_err("the reader is gone");
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        assert_eq!(w.stopped(), Some(Stopped::Gone));
        assert!(started.elapsed() < Duration::from_secs(10));
        dropper.join().expect("dropper");
    }

    #[test]
    fn exports_are_bounded_per_user_and_server_wide() {
        let exports = Exports::new(2, Duration::from_secs(30));
        let (a, b, c) = (UserId(1), UserId(2), UserId(3));
        let first = exports.admit(Some(a)).expect("a's first");
        let again = exports.admit(Some(a)).err().expect("a's second");
        assert_eq!((again.status.as_u16(), again.code), (429, "rate_limited"));
        let second = exports.admit(Some(b)).expect("b's");
        let full = exports.admit(Some(c)).err().expect("full");
        assert_eq!((full.status.as_u16(), full.code), (503, "busy"));
        assert_eq!(full.retry_after, Some(RETRY_AFTER_SECS));
        // The operator's export counts server-wide too.
        assert!(exports.admit(None).is_err());
        assert_eq!(exports.running_now(), 2);
        drop(first);
        assert_eq!(exports.running_now(), 1);
        let a_again = exports.admit(Some(a)).expect("a's place is free again");
        drop((second, a_again));
        assert_eq!(exports.running_now(), 0);
        let ops = exports.admit(None).expect("operator");
        let _c = exports.admit(Some(c)).expect("c");
        drop(ops);
        assert_eq!(exports.running_now(), 1);
    }
}
