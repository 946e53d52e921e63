//! Exports from PostgreSQL: a user's own data, or one room, as the same
//! JSON Lines as the embedded store's (`crate::export`, documented in
//! docs/PROTOCOL.md, "Export"), written from one repeatable-read, read-only
//! transaction so the export is a consistent snapshot while the cluster
//! keeps writing. Messages are read a page at a time and the lines go out
//! in 64 KiB chunks at the pace of the reader (a reader that takes nothing
//! for the stall time stops the export), so memory stays bounded however
//! big the export is.

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_postgres::GenericClient;

use super::rows::{self, MESSAGE_COLUMNS, b, db_err, u};
use crate::error::ApiError;
use crate::export::{CHUNK, Counts, Scope, Slot, Stopped, Target, header, line, log_early_end};
use crate::ids::{RoomId, UserId};
use crate::wallet::TransferIds;

/// Messages read per query.
const PAGE: i64 = 1000;

/// Looks the scope up: `user_not_found` / `room_not_found` before anything
/// is sent.
pub(super) async fn resolve(c: &impl GenericClient, scope: &Scope) -> Result<Target, ApiError> {
    match scope {
        Scope::UserNamed(name) => c
            .query_opt(
                "SELECT id FROM users WHERE username = $1",
                &[&name.to_lowercase()],
            )
            .await
            .map_err(db_err)?
            .map(|r| Target::User(UserId(u(r.get(0)))))
            .ok_or_else(ApiError::user_not_found),
        Scope::User(user) => {
            let found = c
                .query_opt("SELECT 1 FROM users WHERE id = $1", &[&b(user.0)])
                .await
                .map_err(db_err)?;
            found
                .map(|_| Target::User(*user))
                .ok_or_else(ApiError::user_not_found)
        }
        Scope::Room(room) => {
            let found = c
                .query_opt("SELECT 1 FROM rooms WHERE id = $1", &[&b(room.0)])
                .await
                .map_err(db_err)?;
            found
                .map(|_| Target::Room(*room))
                .ok_or_else(ApiError::room_not_found)
        }
    }
}

/// The lines, buffered into chunks for the reader.
struct Sink {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    stall: std::time::Duration,
    stopped: Option<Stopped>,
}

impl Sink {
    fn line<T: Serialize>(
        &mut self,
        kind: &str,
        v: &T,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ApiError> {
        line(&mut self.buf, kind, v, scratch)
    }

    /// Sends what is buffered once it is a chunk (`all`: whatever there is).
    async fn flush(&mut self, all: bool) -> Result<(), ApiError> {
        if self.buf.is_empty() || (!all && self.buf.len() < CHUNK) {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        let why = match tokio::time::timeout(self.stall, self.tx.send(chunk)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => Stopped::Gone,
            Err(_) => Stopped::Stalled,
        };
        self.stopped = Some(why);
        Err(ApiError::new(
            hyper::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "export interrupted: its reader stopped",
        ))
    }
}

/// Starts the export of `scope` on a pooled connection `obj`: checks the
/// scope, then streams from a task. The chunks come out of the receiver.
pub(super) async fn spawn(
    mut obj: deadpool_postgres::Object,
    scope: Scope,
    ids: TransferIds,
    slot: Slot,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let target = {
        let c: &tokio_postgres::Client = &obj;
        resolve(c, &scope).await?
    };
    let (tx, rx) = mpsc::channel(8);
    let stall = slot.stall();
    tokio::spawn(async move {
        let _slot = slot;
        let mut sink = Sink {
            tx,
            buf: Vec::with_capacity(CHUNK),
            stall,
            stopped: None,
        };
        let c: &mut tokio_postgres::Client = &mut obj;
        let result = async {
            let txn = rows::snapshot(c).await?;
            write(&txn, target, &ids, &mut sink).await?;
            sink.flush(true).await?;
            txn.commit().await.map_err(db_err)
        }
        .await;
        if let Err(e) = result {
            log_early_end(&scope, &e, sink.stopped, stall);
        }
    });
    Ok(rx)
}

/// The export of `target` from the snapshot `txn`.
async fn write(
    txn: &tokio_postgres::Transaction<'_>,
    target: Target,
    ids: &TransferIds,
    w: &mut Sink,
) -> Result<Counts, ApiError> {
    let mut scratch = Vec::with_capacity(1024);
    let mut counts = Counts::default();
    header(&mut w.buf, target, &mut scratch)?;
    match target {
        Target::User(user) => {
            let me = b(user.0);
            let row = txn
                .query_opt(
                    "SELECT username, display_name, created_at FROM users WHERE id = $1",
                    &[&me],
                )
                .await
                .map_err(db_err)?
                .ok_or_else(ApiError::user_not_found)?;
            w.line(
                "user",
                &json!({
                    "id": user,
                    "username": row.get::<_, String>(0),
                    "display_name": row.get::<_, String>(1),
                    "created_at": row.get::<_, i64>(2),
                }),
                &mut scratch,
            )?;
            let contacts = txn
                .query(
                    "SELECT u.id, u.username, u.display_name, c.added_at FROM contacts c
                     JOIN users u ON u.id = c.contact WHERE c.owner = $1 ORDER BY c.contact",
                    &[&me],
                )
                .await
                .map_err(db_err)?;
            for r in &contacts {
                let c = rows::user(r);
                w.line(
                    "contact",
                    &json!({"id": c.id, "username": c.username, "display_name": c.display_name, "added_at": r.get::<_, i64>(3)}),
                    &mut scratch,
                )?;
                counts.contacts += 1;
            }
            let rooms = txn
                .query(
                    "SELECT room, joined_at FROM members WHERE user_id = $1",
                    &[&me],
                )
                .await
                .map_err(db_err)?;
            let mut rooms: Vec<(RoomId, i64)> = rooms
                .iter()
                .map(|r| (RoomId(u(r.get(0))), r.get(1)))
                .collect();
            // As the embedded store lists them: by room id.
            rooms.sort();
            for (room, joined) in rooms {
                room_and_messages(txn, room, Some(joined), ids, w, &mut scratch, &mut counts)
                    .await?;
            }
            wallet(txn, user, ids, w, &mut scratch, &mut counts).await?;
        }
        Target::Room(room) => {
            if !room_and_messages(txn, room, None, ids, w, &mut scratch, &mut counts).await? {
                return Err(ApiError::room_not_found());
            }
        }
    }
    w.line("end", &counts, &mut scratch)?;
    Ok(counts)
}

/// The room line, then every message of the room in seq order, a page at
/// a time. False when the room does not exist.
async fn room_and_messages(
    txn: &tokio_postgres::Transaction<'_>,
    room: RoomId,
    joined_at: Option<i64>,
    ids: &TransferIds,
    w: &mut Sink,
    scratch: &mut Vec<u8>,
    counts: &mut Counts,
) -> Result<bool, ApiError> {
    let Some(view) = rows::room_view(txn, room).await? else {
        return Ok(false);
    };
    let mut v = serde_json::to_value(&view).map_err(ApiError::internal)?;
    if let Some(j) = joined_at {
        v["joined_at"] = j.into();
    }
    w.line("room", &v, scratch)?;
    counts.rooms += 1;
    let mut after = 0i64;
    loop {
        let page = txn
            .query(
                &format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages
                     WHERE room = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ),
                &[&b(room.0), &after, &PAGE],
            )
            .await
            .map_err(db_err)?;
        for r in &page {
            let m = rows::message(r, ids);
            after = b(m.seq);
            w.line("message", &m, scratch)?;
            counts.messages += 1;
            w.flush(false).await?;
        }
        if (page.len() as i64) < PAGE {
            return Ok(true);
        }
    }
}

/// The user's balance and every transfer they see (as in their history),
/// oldest first.
async fn wallet(
    txn: &tokio_postgres::Transaction<'_>,
    user: UserId,
    ids: &TransferIds,
    w: &mut Sink,
    scratch: &mut Vec<u8>,
    counts: &mut Counts,
) -> Result<(), ApiError> {
    let currency = ids.currency().to_string();
    let balance = super::ledger::balance(txn, user).await?;
    w.line(
        "wallet",
        &json!({"balance": balance, "currency": currency}),
        scratch,
    )?;
    // The history's pages, newest first; written oldest first.
    let mut all = Vec::new();
    let mut before = None;
    loop {
        let (page, next) =
            super::ledger::transactions(txn, ids, user, before, 200, &currency).await?;
        all.extend(page);
        match next.and_then(|n| ids.parse(&n)) {
            Some(id) => before = Some(id),
            None => break,
        }
    }
    for t in all.iter().rev() {
        w.line("transfer", t, scratch)?;
        counts.transfers += 1;
        w.flush(false).await?;
    }
    Ok(())
}
