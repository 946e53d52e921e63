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
use crate::store::{
    self, CONTACTS, MEMBERS, MESSAGES, Message, MessageRecord, ROOMS, USER_ROOMS, USERNAMES, USERS,
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
}

fn io(e: std::io::Error) -> ApiError {
    ApiError::internal(format!("export interrupted: {e}"))
}

/// Writes `{"type": kind, ...fields of v}` and a newline.
fn line<W: Write, T: Serialize>(
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
        &mut buf,
    )?;
    let users = txn.open_table(USERS)?;
    match target {
        Target::User(user) => {
            let Some(g) = users.get(user.0)? else {
                return Err(ApiError::user_not_found());
            };
            let rec: store::UserRecord = store::decode(g.value(), "user")?;
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
    for entry in messages.range((room.0, 0)..=(room.0, u64::MAX))? {
        let (k, val) = entry?;
        let m = Message::from_record(room, k.value().1, MessageRecord::decode(val.value())?, ids);
        line(w, "message", &m, buf)?;
        counts.messages += 1;
    }
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
    let currency = store::currency();
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
            let rec = crate::wallet::decode_transfer(g.value())?;
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
/// body, the admin socket) through a bounded channel, so a blocking export
/// thread streams at the pace of the reader. Writing fails once the
/// receiver is gone (the client went away), which stops the export.
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    buf: Vec<u8>,
}

const CHUNK: usize = 64 << 10;

impl ChannelWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<bytes::Bytes>) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = bytes::Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader went away"))
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
enum Target {
    User(UserId),
    Room(RoomId),
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

/// Starts an export on a blocking thread; returns the receiving end of its
/// chunks. A failure after the first bytes ends the stream early: the
/// missing `end` line tells the reader it is incomplete.
pub fn spawn(
    db: std::sync::Arc<redb::Database>,
    scope: Scope,
    ids: TransferIds,
) -> tokio::sync::mpsc::Receiver<bytes::Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        use redb::ReadableDatabase;
        let mut w = ChannelWriter::new(tx);
        let result = db
            .begin_read()
            .map_err(ApiError::from)
            .and_then(|txn| write(&txn, scope.clone(), &ids, &mut w));
        if let Err(e) = result {
            tracing::warn!(error = %e.message, ?scope, "export ended early");
        }
    });
    rx
}
