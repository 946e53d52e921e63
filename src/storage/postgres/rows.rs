//! Rows of the cluster database as confab's types, and the few queries
//! both the writer and the reads build views with.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::{GenericClient, Row};

use crate::error::ApiError;
use crate::frames::{Message, PaymentView, Room, User};
use crate::ids::{RoomId, UserId};
use crate::store::transfer_ids::TransferIds;
use crate::store::{Audience, Privacy};

/// A database error for people: the server's message (and its detail)
/// when it sent one — `tokio_postgres::Error`'s own text is "db error".
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({}): {detail}", d.message(), d.code().code()),
            None => format!("{} ({})", d.message(), d.code().code()),
        },
        None => e.to_string(),
    }
}

/// A database error as confab's: the storage failed (503, retryable).
pub fn db_err(e: tokio_postgres::Error) -> ApiError {
    tracing::warn!(error = %describe_error(&e), "database error");
    crate::error::storage_error()
}

/// `u64` id → `bigint` (the same bits).
pub fn b(id: u64) -> i64 {
    id as i64
}

/// `bigint` → `u64` id.
pub fn u(v: i64) -> u64 {
    v as u64
}

/// The columns [`message`] reads, in its order.
pub const MESSAGE_COLUMNS: &str =
    "room, seq, sender, ts, client_id, text, pay_transfer, pay_amount, pay_to, pay_note";

/// A `messages` row (selected with [`MESSAGE_COLUMNS`]) as clients see it.
/// A payment message shows its transfer by public id (see
/// `Message::from_record`).
pub fn message(row: &Row, ids: &TransferIds) -> Message {
    let room = RoomId(u(row.get(0)));
    let pay_transfer: Option<i64> = row.get(6);
    let payment = pay_transfer.map(|t| PaymentView {
        transfer: ids.show(u(t)),
        amount: u(row.get::<_, Option<i64>>(7).unwrap_or(0)),
        currency: ids.currency().to_string(),
        to: UserId(u(row.get::<_, Option<i64>>(8).unwrap_or(0))),
        note: row.get(9),
    });
    let client_id = match &payment {
        Some(p) => format!("pay-{}", p.transfer),
        None => row.get(4),
    };
    Message {
        room,
        seq: u(row.get(1)),
        from: UserId(u(row.get(2))),
        ts: row.get(3),
        text: row.get(5),
        client_id,
        kind: payment.as_ref().map(|_| "payment"),
        payment,
        unreadable: false,
    }
}

/// A user from `id, username, display_name`.
pub fn user(row: &Row) -> User {
    User {
        id: UserId(u(row.get(0))),
        username: row.get(1),
        display_name: row.get(2),
    }
}

pub fn audience(v: i16) -> Audience {
    match v {
        1 => Audience::Contacts,
        2 => Audience::Nobody,
        _ => Audience::Everyone,
    }
}

pub fn audience_code(a: Audience) -> i16 {
    match a {
        Audience::Everyone => 0,
        Audience::Contacts => 1,
        Audience::Nobody => 2,
    }
}

/// A user's privacy settings from `presence, group_adds`.
pub fn privacy(row: &Row) -> Privacy {
    Privacy {
        presence: audience(row.get(0)),
        group_adds: audience(row.get(1)),
    }
}

pub async fn user_by_id(c: &impl GenericClient, id: UserId) -> Result<Option<User>, ApiError> {
    let row = c
        .query_opt(
            "SELECT id, username, display_name FROM users WHERE id = $1",
            &[&b(id.0)],
        )
        .await
        .map_err(db_err)?;
    Ok(row.as_ref().map(user))
}

/// A room's members, in id order (as `u64`).
pub async fn members(c: &impl GenericClient, room: RoomId) -> Result<Vec<UserId>, ApiError> {
    let rows = c
        .query("SELECT user_id FROM members WHERE room = $1", &[&b(room.0)])
        .await
        .map_err(db_err)?;
    let mut out: Vec<UserId> = rows.iter().map(|r| UserId(u(r.get(0)))).collect();
    out.sort();
    Ok(out)
}

/// The members of these rooms (`bigint` ids), each room's in id order.
pub async fn members_of(
    c: &impl GenericClient,
    rooms: &[i64],
) -> Result<HashMap<RoomId, Arc<[UserId]>>, ApiError> {
    let mut members: HashMap<RoomId, Vec<UserId>> = HashMap::new();
    for r in c
        .query(
            "SELECT room, user_id FROM members WHERE room = ANY($1)",
            &[&rooms],
        )
        .await
        .map_err(db_err)?
    {
        members
            .entry(RoomId(u(r.get(0))))
            .or_default()
            .push(UserId(u(r.get(1))));
    }
    Ok(members
        .into_iter()
        .map(|(room, mut list)| {
            list.sort();
            (room, list.into())
        })
        .collect())
}

/// The client view of a room (None when there is no such room).
pub async fn room_view(c: &impl GenericClient, room: RoomId) -> Result<Option<Room>, ApiError> {
    let Some(r) = c
        .query_opt(
            "SELECT kind, name, owner, created_at, last_seq FROM rooms WHERE id = $1",
            &[&b(room.0)],
        )
        .await
        .map_err(db_err)?
    else {
        return Ok(None);
    };
    let rows = c
        .query(
            "SELECT u.id, u.username, u.display_name FROM members m
             JOIN users u ON u.id = m.user_id WHERE m.room = $1",
            &[&b(room.0)],
        )
        .await
        .map_err(db_err)?;
    let mut list: Vec<User> = rows.iter().map(user).collect();
    list.sort_by_key(|u| u.id);
    let kind: i16 = r.get(0);
    Ok(Some(Room {
        id: room,
        kind: if kind == 0 { "direct" } else { "group" },
        name: r.get(1),
        owner: r.get::<_, Option<i64>>(2).map(|o| UserId(u(o))),
        members: list,
        created_at: r.get(3),
        last_seq: u(r.get(4)),
    }))
}

/// A consistent, read-only snapshot: one repeatable-read transaction (what
/// the ledger's check and the exports read from while writers go on).
pub async fn snapshot(
    c: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'_>, ApiError> {
    c.build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_err)
}
