//! The reads of the PostgreSQL backend (accounts, rooms, messages), each on
//! a pooled connection; the same answers as the embedded store's
//! (`store/reads.rs`).
//!
//! Ids are `u64` in confab and `bigint` here (group rooms have the top bit
//! set, so they are negative in SQL): whatever the embedded store returns
//! in id order is sorted in Rust, never with `ORDER BY` on an id. Usernames
//! are compared byte-wise (`COLLATE "C"`), as the embedded store's keys are.
//! Each read is one or two queries, whatever the number of rooms.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::rows::{self, MESSAGE_COLUMNS, b, db_err, u};
use crate::error::ApiError;
use crate::frames::{Message, Room, User};
use crate::ids::{RoomId, UserId};
use crate::store::{Audience, Privacy, UserRecord, by_activity, room_list_entry};
use crate::wallet::TransferIds;

/// The largest id, seq or position that fits a `bigint`: bounds beyond it
/// are clamped (nothing stored is above it).
const MAX_BIGINT: u64 = i64::MAX as u64;

/// [`MESSAGE_COLUMNS`] qualified with a table alias (`m.room, m.seq, …`),
/// for queries that join `messages` to other tables.
fn message_columns(alias: &str) -> String {
    MESSAGE_COLUMNS
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A count for `LIMIT` (a `bigint`).
fn sql_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// True until the first user signs up.
pub async fn has_no_users(c: &Client) -> Result<bool, ApiError> {
    let row = c
        .query_one("SELECT NOT EXISTS (SELECT 1 FROM users)", &[])
        .await
        .map_err(db_err)?;
    Ok(row.get(0))
}

/// The user record (with password hash) for a username, case-insensitive
/// (usernames are stored lowercase; the name is lowercased here, as the
/// embedded store does, not by the database's locale).
pub async fn user_by_name(
    c: &Client,
    username: &str,
) -> Result<Option<(UserId, UserRecord)>, ApiError> {
    let row = c
        .query_opt(
            "SELECT id, username, display_name, password_hash, created_at
             FROM users WHERE username = $1",
            &[&username.to_lowercase()],
        )
        .await
        .map_err(db_err)?;
    Ok(row.map(|r| {
        (
            UserId(u(r.get(0))),
            UserRecord {
                username: r.get(1),
                display_name: r.get(2),
                password_hash: r.get(3),
                created_at: r.get(4),
            },
        )
    }))
}

/// `s` as a `LIKE` pattern matching itself literally (`\` escapes).
fn like_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 1);
    for ch in s.chars() {
        if matches!(ch, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Up to `limit` users whose username starts with `prefix` (lowercased), in
/// username order (byte-wise, as the embedded store's index).
pub async fn search_users(c: &Client, prefix: &str, limit: usize) -> Result<Vec<User>, ApiError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    // A literal prefix pattern: the `text_pattern_ops` index serves it.
    let pattern = format!("{}%", like_literal(&prefix.to_lowercase()));
    let rows = c
        .query(
            r#"SELECT id, username, display_name FROM users
               WHERE username LIKE $1
               ORDER BY username COLLATE "C" LIMIT $2"#,
            &[&pattern, &sql_limit(limit)],
        )
        .await
        .map_err(db_err)?;
    Ok(rows.iter().map(rows::user).collect())
}

/// `owner`'s contacts, by username.
pub async fn contacts(c: &Client, owner: UserId) -> Result<Vec<User>, ApiError> {
    let rows = c
        .query(
            "SELECT u.id, u.username, u.display_name FROM contacts c
             JOIN users u ON u.id = c.contact WHERE c.owner = $1",
            &[&b(owner.0)],
        )
        .await
        .map_err(db_err)?;
    let mut out: Vec<User> = rows.iter().map(rows::user).collect();
    // Ties (there are none: usernames are unique) would keep contact-id
    // order in the embedded store; sort by id first to be exact anyway.
    out.sort_by_key(|u| u.id);
    out.sort_by(|a, b| a.username.cmp(&b.username));
    Ok(out)
}

/// `user`'s privacy settings (the defaults for an unknown user).
pub async fn privacy(c: &Client, user: UserId) -> Result<Privacy, ApiError> {
    let row = c
        .query_opt(
            "SELECT presence, group_adds FROM users WHERE id = $1",
            &[&b(user.0)],
        )
        .await
        .map_err(db_err)?;
    Ok(row.as_ref().map(rows::privacy).unwrap_or_default())
}

/// When `user` was last seen (None: never, or no such user).
pub async fn last_seen(c: &Client, user: UserId) -> Result<Option<i64>, ApiError> {
    let row = c
        .query_opt("SELECT last_seen FROM users WHERE id = $1", &[&b(user.0)])
        .await
        .map_err(db_err)?;
    Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
}

/// Of `viewers` (in their order), those who may see `owner`'s presence.
pub async fn presence_audience(
    c: &Client,
    owner: UserId,
    viewers: &[UserId],
) -> Result<Vec<UserId>, ApiError> {
    if viewers.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = viewers.iter().map(|v| b(v.0)).collect();
    // One row: the owner's presence setting (NULL: no such user, the
    // default) and which of the viewers are in their contacts.
    let row = c
        .query_one(
            "SELECT (SELECT presence FROM users WHERE id = $1),
                    ARRAY(SELECT contact FROM contacts
                          WHERE owner = $1 AND contact = ANY($2))",
            &[&b(owner.0), &ids],
        )
        .await
        .map_err(db_err)?;
    let audience = row
        .get::<_, Option<i16>>(0)
        .map(rows::audience)
        .unwrap_or_default();
    let contacts: HashSet<u64> = row.get::<_, Vec<i64>>(1).into_iter().map(u).collect();
    Ok(viewers
        .iter()
        .copied()
        .filter(|v| audience.admits_given(owner, *v, contacts.contains(&v.0)))
        .collect())
}

/// Of `owners` (in their order), those whose presence `viewer` may see.
pub async fn presences_seen_by(
    c: &Client,
    viewer: UserId,
    owners: &[UserId],
) -> Result<Vec<UserId>, ApiError> {
    if owners.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = owners.iter().map(|o| b(o.0)).collect();
    let rows = c
        .query(
            "SELECT u.id, u.presence,
                    EXISTS (SELECT 1 FROM contacts c
                            WHERE c.owner = u.id AND c.contact = $1)
             FROM users u WHERE u.id = ANY($2)",
            &[&b(viewer.0), &ids],
        )
        .await
        .map_err(db_err)?;
    // Owner → (presence audience, has the viewer in their contacts). An
    // owner with no row has the default settings and no contacts.
    let known: HashMap<u64, (Audience, bool)> = rows
        .iter()
        .map(|r| (u(r.get(0)), (rows::audience(r.get(1)), r.get(2))))
        .collect();
    Ok(owners
        .iter()
        .copied()
        .filter(|o| {
            let (audience, is_contact) = known.get(&o.0).copied().unwrap_or_default();
            audience.admits_given(*o, viewer, is_contact)
        })
        .collect())
}

/// Revoked token ids that have not expired yet (loaded at start-up), in
/// token-id order.
pub async fn revoked_tokens(c: &Client, now_secs: i64) -> Result<Vec<(String, i64)>, ApiError> {
    let rows = c
        .query("SELECT jti, exp FROM revoked WHERE exp > $1", &[&now_secs])
        .await
        .map_err(db_err)?;
    let mut out: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    out.sort();
    Ok(out)
}

/// A room's row, as [`room_row`] reads it (selected with
/// [`ROOM_COLUMNS`]).
struct RoomRow {
    id: RoomId,
    kind: i16,
    name: Option<String>,
    owner: Option<UserId>,
    created_at: i64,
    last_seq: u64,
}

/// The `rooms` columns [`room_row`] reads, starting at its `at`.
const ROOM_COLUMNS: &str = "r.id, r.kind, r.name, r.owner, r.created_at, r.last_seq";

/// The room selected with [`ROOM_COLUMNS`] at column `at` onwards.
fn room_row(row: &tokio_postgres::Row, at: usize) -> RoomRow {
    RoomRow {
        id: RoomId(u(row.get(at))),
        kind: row.get(at + 1),
        name: row.get(at + 2),
        owner: row.get::<_, Option<i64>>(at + 3).map(|o| UserId(u(o))),
        created_at: row.get(at + 4),
        last_seq: u(row.get(at + 5)),
    }
}

/// A member of a room, with their read position and (when the user
/// exists) who they are.
struct MemberRow {
    user: UserId,
    read_seq: u64,
    profile: Option<User>,
}

/// Every member of `rooms`, by room, each room's in user-id order: one
/// query.
async fn members_of(
    c: &Client,
    rooms: &[i64],
) -> Result<HashMap<RoomId, Vec<MemberRow>>, ApiError> {
    let rows = c
        .query(
            "SELECT m.room, m.user_id, m.read_seq, u.username, u.display_name
             FROM members m LEFT JOIN users u ON u.id = m.user_id
             WHERE m.room = ANY($1)",
            &[&rooms],
        )
        .await
        .map_err(db_err)?;
    let mut out: HashMap<RoomId, Vec<MemberRow>> = HashMap::new();
    for r in &rows {
        let user = UserId(u(r.get(1)));
        let username: Option<String> = r.get(3);
        let display_name: Option<String> = r.get(4);
        let profile = username.map(|username| User {
            id: user,
            username,
            display_name: display_name.unwrap_or_default(),
        });
        out.entry(RoomId(u(r.get(0)))).or_default().push(MemberRow {
            user,
            read_seq: u(r.get(2)),
            profile,
        });
    }
    for list in out.values_mut() {
        list.sort_by_key(|m| m.user);
    }
    Ok(out)
}

/// The client view of a room (as `rows::room_view` builds it): members
/// that are users, in id order.
fn room_view(room: &RoomRow, members: &[MemberRow]) -> Room {
    Room {
        id: room.id,
        kind: if room.kind == 0 { "direct" } else { "group" },
        name: room.name.clone(),
        owner: room.owner,
        members: members.iter().filter_map(|m| m.profile.clone()).collect(),
        created_at: room.created_at,
        last_seq: room.last_seq,
    }
}

/// The room, if `user` is a member of it (`room_not_found` otherwise,
/// whether or not it exists).
pub async fn room_for(c: &Client, room: RoomId, user: UserId) -> Result<Room, ApiError> {
    let Some(row) = c
        .query_opt(
            &format!(
                "SELECT {ROOM_COLUMNS} FROM rooms r
                 WHERE r.id = $1
                   AND EXISTS (SELECT 1 FROM members WHERE room = $1 AND user_id = $2)"
            ),
            &[&b(room.0), &b(user.0)],
        )
        .await
        .map_err(db_err)?
    else {
        return Err(ApiError::room_not_found());
    };
    let r = room_row(&row, 0);
    let members = members_of(c, &[b(room.0)]).await?;
    Ok(room_view(
        &r,
        members.get(&room).map_or(&[][..], Vec::as_slice),
    ))
}

/// Every room of `user` (the client view, with `last_message`, the user's
/// `unread` count and `reads`: every member's read position by user id),
/// most recent activity first (the last message's time, else the room's
/// creation), rooms of the same activity in room-id order. Two queries:
/// the rooms with their last messages, then all their members.
pub async fn rooms_of(
    c: &Client,
    user: UserId,
    ids: &TransferIds,
) -> Result<Vec<serde_json::Value>, ApiError> {
    // The message columns come first: `rows::message` reads them from 0.
    // Those are NULL for a room without messages (`last_seq` 0).
    let rows = c
        .query(
            &format!(
                "SELECT {}, {ROOM_COLUMNS} FROM rooms r
                 LEFT JOIN messages m ON m.room = r.id AND m.seq = r.last_seq
                 WHERE r.id IN (SELECT room FROM members WHERE user_id = $1)",
                message_columns("m")
            ),
            &[&b(user.0)],
        )
        .await
        .map_err(db_err)?;
    let at = MESSAGE_COLUMNS.split(',').count();
    let mut rooms: Vec<(RoomRow, Option<Message>)> = rows
        .iter()
        .map(|r| {
            let has_last = r.get::<_, Option<i64>>(1).is_some();
            (room_row(r, at), has_last.then(|| rows::message(r, ids)))
        })
        .collect();
    rooms.sort_by_key(|(r, _)| r.id);
    let room_ids: Vec<i64> = rooms.iter().map(|(r, _)| b(r.id.0)).collect();
    let members = members_of(c, &room_ids).await?;

    let mut out = Vec::with_capacity(rooms.len());
    for (room, last) in rooms {
        let list = members.get(&room.id).map_or(&[][..], Vec::as_slice);
        let view = room_view(&room, list);
        let reads: Vec<(UserId, u64)> = list.iter().map(|m| (m.user, m.read_seq)).collect();
        out.push(room_list_entry(&view, last.as_ref(), &reads, user)?);
    }
    // Equal activity keeps room-id order, as in the embedded store.
    Ok(by_activity(out))
}

/// The rooms `user` is a member of, in room-id order.
pub async fn room_ids_of(c: &Client, user: UserId) -> Result<Vec<RoomId>, ApiError> {
    let rows = c
        .query("SELECT room FROM members WHERE user_id = $1", &[&b(user.0)])
        .await
        .map_err(db_err)?;
    let mut out: Vec<RoomId> = rows.iter().map(|r| RoomId(u(r.get(0)))).collect();
    out.sort();
    Ok(out)
}

/// Every room of `user` with its last seq (0 without messages), in room-id
/// order.
pub async fn room_heads(c: &Client, user: UserId) -> Result<Vec<(RoomId, u64)>, ApiError> {
    let rows = c
        .query(
            "SELECT m.room, COALESCE(r.last_seq, 0) FROM members m
             LEFT JOIN rooms r ON r.id = m.room WHERE m.user_id = $1",
            &[&b(user.0)],
        )
        .await
        .map_err(db_err)?;
    let mut out: Vec<(RoomId, u64)> = rows
        .iter()
        .map(|r| (RoomId(u(r.get(0))), u(r.get(1))))
        .collect();
    out.sort();
    Ok(out)
}

/// Fails with `room_not_found` unless `user` is in `room` (whether or not
/// the room exists).
pub async fn check_member(c: &Client, room: RoomId, user: UserId) -> Result<(), ApiError> {
    let row = c
        .query_opt(
            "SELECT 1 FROM members WHERE room = $1 AND user_id = $2",
            &[&b(room.0), &b(user.0)],
        )
        .await
        .map_err(db_err)?;
    match row {
        Some(_) => Ok(()),
        None => Err(ApiError::room_not_found()),
    }
}

/// Users who share a direct room with `user` (they see its presence), by
/// room id, then user id.
pub async fn direct_peers(c: &Client, user: UserId) -> Result<Vec<UserId>, ApiError> {
    let rows = c
        .query(
            "SELECT o.room, o.user_id FROM members me
             JOIN members o ON o.room = me.room AND o.user_id <> me.user_id
             WHERE me.user_id = $1",
            &[&b(user.0)],
        )
        .await
        .map_err(db_err)?;
    let mut pairs: Vec<(RoomId, UserId)> = rows
        .iter()
        .map(|r| (RoomId(u(r.get(0))), UserId(u(r.get(1)))))
        .filter(|(room, _)| room.is_direct())
        .collect();
    pairs.sort();
    Ok(pairs.into_iter().map(|(_, peer)| peer).collect())
}

/// Messages of a room for a member: `after` → the first `limit` with a
/// greater seq; `before` → the last `limit` with a smaller seq; neither →
/// the latest `limit`. Always ascending.
pub async fn history(
    c: &Client,
    ids: &TransferIds,
    room: RoomId,
    user: UserId,
    after: Option<u64>,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<Message>, ApiError> {
    check_member(c, room, user).await?;
    let lo = after.map(|a| a.saturating_add(1)).unwrap_or(1);
    let hi = before
        .map(|b| b.saturating_sub(1))
        .unwrap_or(u64::MAX)
        .min(MAX_BIGINT);
    if lo > hi || limit == 0 {
        return Ok(Vec::new());
    }
    // From `after` upwards, or down from `before` (or the end).
    let order = if after.is_some() { "ASC" } else { "DESC" };
    let rows = c
        .query(
            &format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE room = $1 AND seq BETWEEN $2 AND $3
                 ORDER BY seq {order} LIMIT $4"
            ),
            &[&b(room.0), &b(lo), &b(hi), &sql_limit(limit)],
        )
        .await
        .map_err(db_err)?;
    let mut out: Vec<Message> = rows.iter().map(|r| rows::message(r, ids)).collect();
    if after.is_none() {
        out.reverse();
    }
    Ok(out)
}

/// Up to `max` messages after stream position `after`, in stream order,
/// each with its position.
pub async fn log_after(
    c: &Client,
    ids: &TransferIds,
    after: u64,
    max: usize,
) -> Result<Vec<(u64, Message)>, ApiError> {
    if after >= MAX_BIGINT || max == 0 {
        return Ok(Vec::new());
    }
    // `pos` after the message columns: `rows::message` reads them from 0.
    let rows = c
        .query(
            &format!(
                "SELECT {MESSAGE_COLUMNS}, pos FROM messages
                 WHERE pos > $1 ORDER BY pos LIMIT $2"
            ),
            &[&b(after), &sql_limit(max)],
        )
        .await
        .map_err(db_err)?;
    let at = MESSAGE_COLUMNS.split(',').count();
    Ok(rows
        .iter()
        .map(|r| (u(r.get(at)), rows::message(r, ids)))
        .collect())
}

/// The stored messages at these keys, in their order (missing ones are
/// skipped, repeated ones repeated): one query.
pub async fn messages_at(
    c: &Client,
    ids: &TransferIds,
    keys: &[(RoomId, u64)],
) -> Result<Vec<Message>, ApiError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let rooms: Vec<i64> = keys.iter().map(|(r, _)| b(r.0)).collect();
    let seqs: Vec<i64> = keys.iter().map(|(_, s)| b(*s)).collect();
    let rows = c
        .query(
            &format!(
                "SELECT {} FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS k(room, seq, n)
                 JOIN messages m ON m.room = k.room AND m.seq = k.seq
                 ORDER BY k.n",
                message_columns("m")
            ),
            &[&rooms, &seqs],
        )
        .await
        .map_err(db_err)?;
    Ok(rows.iter().map(|r| rows::message(r, ids)).collect())
}

/// The last committed position of the message stream (`meta.log_pos`: a
/// writer's increment is invisible until its commit).
pub async fn head(c: &Client) -> Result<u64, ApiError> {
    let row = c
        .query_one("SELECT value FROM meta WHERE key = 'log_pos'", &[])
        .await
        .map_err(db_err)?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// The server `c` is connected to (`"addr:port"`, whether it is a standby)
/// and its standbys: name, state, sync state, bytes not yet replayed and
/// the replay lag in seconds (null where the role may not see them).
pub async fn replication(c: &Client) -> Result<serde_json::Value, ApiError> {
    let row = c
        .query_one(
            "SELECT COALESCE(host(inet_server_addr()) || ':' || inet_server_port(), 'local'),
                    pg_is_in_recovery(),
                    (SELECT COALESCE(json_agg(json_build_object(
                        'name', application_name,
                        'state', state,
                        'sync_state', sync_state,
                        'lag_bytes', CASE WHEN pg_is_in_recovery() THEN NULL
                                          ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) END,
                        'replay_lag_seconds', EXTRACT(EPOCH FROM replay_lag)
                     ) ORDER BY application_name), '[]'::json)::text
                     FROM pg_stat_replication)",
            &[],
        )
        .await
        .map_err(db_err)?;
    let standbys: String = row.try_get(2).map_err(db_err)?;
    Ok(serde_json::json!({
        "server": {
            "addr": row.try_get::<_, String>(0).map_err(db_err)?,
            "standby": row.try_get::<_, bool>(1).map_err(db_err)?,
        },
        "standbys": serde_json::from_str::<serde_json::Value>(&standbys).map_err(ApiError::internal)?,
    }))
}
