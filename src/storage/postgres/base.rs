//! The chat's core that the other writes build on, inside the writer's
//! batch transaction: stream positions, inserting messages (one or a run of
//! them as arrays), appending one message to a room (a payment's), direct
//! rooms and members. Below `chat.rs` and `wallet.rs`, which both use it.
//!
//! Seqs: a room's `last_seq` is read and advanced under its row's lock
//! (`FOR UPDATE`), and `(room, seq)` is the primary key — two writers can
//! never both give out a seq. Stream positions come from `meta.log_pos`
//! under its row's lock, held to the commit, so they follow commit order
//! across nodes.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Transaction};

use super::context::{BatchState, Ctx};
use super::rows::{self, b, db_err, u};
use crate::error::ApiError;
use crate::frames::{Message, Room};
use crate::ids::{RoomId, UserId};
use crate::store::{PaymentInfo, now_ms};

/// Takes `n` stream positions (under `meta.log_pos`'s row lock, held to
/// the commit): returns the first.
pub(super) async fn take_positions(
    txn: &Transaction<'_>,
    state: &mut BatchState,
    n: i64,
) -> Result<i64, ApiError> {
    let end: i64 = txn
        .query_one(
            "UPDATE meta SET value = value + $1 WHERE key = 'log_pos' RETURNING value",
            &[&n],
        )
        .await
        .map_err(db_err)?
        .get(0);
    state.last_pos = Some(end as u64);
    Ok(end - n + 1)
}

/// Messages to insert, column by column (sent as arrays).
#[derive(Default)]
pub(super) struct MessageColumns {
    room: Vec<i64>,
    seq: Vec<i64>,
    pos: Vec<i64>,
    sender: Vec<i64>,
    ts: Vec<i64>,
    client_id: Vec<String>,
    text: Vec<String>,
    pay_transfer: Vec<Option<i64>>,
    pay_amount: Vec<Option<i64>>,
    pay_to: Vec<Option<i64>>,
    pay_note: Vec<Option<String>>,
}

impl MessageColumns {
    pub(super) fn push(&mut self, m: &Message, pos: i64, payment: Option<&PaymentInfo>) {
        self.room.push(b(m.room.0));
        self.seq.push(b(m.seq));
        self.pos.push(pos);
        self.sender.push(b(m.from.0));
        self.ts.push(m.ts);
        self.client_id.push(m.client_id.clone());
        self.text.push(m.text.clone());
        self.pay_transfer.push(payment.map(|p| b(p.transfer)));
        self.pay_amount.push(payment.map(|p| b(p.amount)));
        self.pay_to.push(payment.map(|p| b(p.to)));
        self.pay_note.push(payment.and_then(|p| p.note.clone()));
    }

    pub(super) async fn insert(&self, txn: &Transaction<'_>) -> Result<(), ApiError> {
        txn.execute(
            "INSERT INTO messages (room, seq, pos, sender, ts, client_id, text,
                                   pay_transfer, pay_amount, pay_to, pay_note)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                  $5::bigint[], $6::text[], $7::text[], $8::bigint[],
                                  $9::bigint[], $10::bigint[], $11::text[])",
            &[
                &self.room,
                &self.seq,
                &self.pos,
                &self.sender,
                &self.ts,
                &self.client_id,
                &self.text,
                &self.pay_transfer,
                &self.pay_amount,
                &self.pay_to,
                &self.pay_note,
            ],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }
}

/// Appends one message to `room` (the next seq under the room row's lock,
/// the next stream position): a payment's message. Returns its client view.
#[allow(clippy::too_many_arguments)]
pub(super) async fn append_message(
    w: &Ctx,
    txn: &Transaction<'_>,
    state: &mut BatchState,
    room: RoomId,
    from: UserId,
    client_id: &str,
    text: &str,
    payment: Option<&PaymentInfo>,
    ts: i64,
) -> Result<Message, ApiError> {
    let seq: i64 = txn
        .query_opt(
            "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
            &[&b(room.0)],
        )
        .await
        .map_err(db_err)?
        .ok_or_else(ApiError::room_not_found)?
        .get(0);
    let pos = take_positions(txn, state, 1).await?;
    let msg = Message {
        room,
        seq: u(seq),
        from,
        ts,
        text: text.to_string(),
        client_id: client_id.to_string(),
        kind: None,
        payment: None,
        unreadable: false,
    };
    let mut cols = MessageColumns::default();
    cols.push(&msg, pos, payment);
    cols.insert(txn).await?;
    // As clients see it (a payment shows its transfer's public id).
    let row = txn
        .query_one(
            &format!(
                "SELECT {} FROM messages WHERE room = $1 AND seq = $2",
                rows::MESSAGE_COLUMNS
            ),
            &[&b(room.0), &seq],
        )
        .await
        .map_err(db_err)?;
    Ok(rows::message(&row, &w.shared.ids))
}

/// The view of `room`, which exists (else 404 `room_not_found`).
pub(super) async fn room_view_of(txn: &Transaction<'_>, room: RoomId) -> Result<Room, ApiError> {
    rows::room_view(txn, room)
        .await?
        .ok_or_else(ApiError::room_not_found)
}

/// The row `sql` finds, if any (an error if it finds several).
pub(super) async fn find_row(
    txn: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, ApiError> {
    txn.query_opt(sql, params).await.map_err(db_err)
}

/// Whether a row exists.
pub(super) async fn exists(
    txn: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<bool, ApiError> {
    Ok(find_row(txn, sql, params).await?.is_some())
}

pub(super) async fn user_exists(txn: &Transaction<'_>, id: UserId) -> Result<bool, ApiError> {
    exists(txn, "SELECT 1 FROM users WHERE id = $1", &[&b(id.0)]).await
}

/// The direct room of `a` and `b`, created (both as members) if new; true
/// when it was created.
pub(super) async fn ensure_direct(
    txn: &Transaction<'_>,
    a: UserId,
    other: UserId,
) -> Result<(RoomId, bool), ApiError> {
    let room = RoomId::direct(a, other);
    let created = txn
        .execute(
            "INSERT INTO rooms (id, kind, created_at) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
            &[&b(room.0), &now_ms()],
        )
        .await
        .map_err(db_err)?
        == 1;
    if created {
        add_member(txn, room, a).await?;
        add_member(txn, room, other).await?;
    }
    Ok((room, created))
}

/// Adds a member. Join times are strictly increasing within a room, so the
/// longest-standing member (the next owner) is never a tie.
pub(super) async fn add_member(
    txn: &Transaction<'_>,
    room: RoomId,
    user: UserId,
) -> Result<(), ApiError> {
    txn.execute(
        "INSERT INTO members (room, user_id, joined_at)
         SELECT $1, $2, GREATEST($3, COALESCE(MAX(joined_at) + 1, $3))
         FROM members WHERE room = $1
         ON CONFLICT DO NOTHING",
        &[&b(room.0), &b(user.0), &now_ms()],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}
