//! The chat's writes in the PostgreSQL backend, inside the writer's batch
//! transaction: sends (a run of them as a few array statements), read
//! positions, accounts, contacts, rooms and members, tokens, privacy. The
//! same answers as the embedded writer's (`writes/chat.rs`): the rules
//! both apply are `writes::rules`.
//!
//! Seqs: a room's `last_seq` is read and advanced under its row's lock
//! (`FOR UPDATE`, rooms locked in id order), and `(room, seq)` is the
//! primary key — two writers can never both give out a seq. Stream
//! positions come from `meta.log_pos` under its row's lock, so they follow
//! commit order across nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_postgres::Transaction;

use super::base::{
    MessageColumns, add_member, ensure_direct, exists, find_row, room_view_of, take_positions,
    user_exists,
};
use super::context::{BatchState, Ctx};
use super::rows::{self, b, db_err, u};
use crate::error::ApiError;
use crate::frames::{Message, Room};
use crate::ids::{RoomId, UserId};
use crate::store::now_ms;
use crate::writes::rules;
use crate::writes::{
    Contact, Effect, Op, Origin, announce_and_reply, answer_change, direct_opened, fail_origin,
    member_removed, reply_after_commit,
};

/// One send of a run.
struct Send {
    room: RoomId,
    from: UserId,
    client_id: String,
    text: String,
    origin: Origin,
    received: Instant,
}

/// What became of one send: (the message, whether it was a duplicate, the
/// room's members), or why it was refused.
type Outcome = Result<(Message, bool, Arc<[UserId]>), ApiError>;

/// Applies a run of sends (every op an [`Op::Send`]): membership and
/// `client_id` checks for the whole run at once, then one insert of every
/// new message and one update of the rooms' last seqs.
pub(super) async fn send_many(
    w: &Ctx,
    txn: &Transaction<'_>,
    ops: Vec<Op>,
    effects: &mut Vec<Effect>,
    state: &mut BatchState,
) -> Result<(), ApiError> {
    let sends: Vec<Send> = ops
        .into_iter()
        .filter_map(|op| match op {
            Op::Send {
                room,
                from,
                client_id,
                text,
                origin,
                received,
            } => Some(Send {
                room,
                from,
                client_id,
                text,
                origin,
                received,
            }),
            _ => None,
        })
        .collect();
    match plan(w, txn, &sends, state).await {
        Ok(outcomes) => {
            for (s, outcome) in sends.into_iter().zip(outcomes) {
                effects.push(match outcome {
                    Ok((msg, duplicate, members)) => Effect::Sent {
                        msg,
                        members,
                        origin: s.origin,
                        duplicate,
                        received: s.received,
                    },
                    Err(err) => Effect::Rejected {
                        origin: s.origin,
                        err,
                        client_id: s.client_id,
                        room: s.room,
                    },
                });
            }
            Ok(())
        }
        Err(e) => {
            // Every send of the run is answered, also a WebSocket session's
            // (its error frame), before the batch fails.
            for s in sends {
                fail_origin(s.origin, &e, &s.client_id, s.room);
            }
            Err(e)
        }
    }
}

/// The run's outcomes, one per send in order; its new messages inserted.
async fn plan(
    w: &Ctx,
    txn: &Transaction<'_>,
    sends: &[Send],
    state: &mut BatchState,
) -> Result<Vec<Outcome>, ApiError> {
    let mut rooms: Vec<i64> = sends.iter().map(|s| b(s.room.0)).collect();
    rooms.sort_unstable();
    rooms.dedup();
    // Members of every room of the run.
    let members = rows::members_of(txn, &rooms).await?;
    // Messages already stored under these client_ids.
    let (k_rooms, k_senders, k_ids): (Vec<i64>, Vec<i64>, Vec<&str>) = sends
        .iter()
        .map(|s| (b(s.room.0), b(s.from.0), s.client_id.as_str()))
        .collect();
    let mut stored: HashMap<(RoomId, UserId, String), Message> = HashMap::new();
    for r in txn
        .query(
            &format!(
                "SELECT {} FROM messages m
                 JOIN unnest($1::bigint[], $2::bigint[], $3::text[]) AS k(room, sender, client_id)
                   ON m.room = k.room AND m.sender = k.sender AND m.client_id = k.client_id",
                prefixed("m")
            ),
            &[&k_rooms, &k_senders, &k_ids],
        )
        .await
        .map_err(db_err)?
    {
        let sender = UserId(u(r.get(2)));
        let client_id: String = r.get(4);
        let msg = rows::message(&r, &w.shared.ids);
        stored.insert((msg.room, sender, client_id), msg);
    }
    // The rooms that get new messages, locked in id order, with their last seq.
    let mut last: HashMap<RoomId, u64> = HashMap::new();
    for r in txn
        .query(
            "SELECT id, last_seq FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&rooms],
        )
        .await
        .map_err(db_err)?
    {
        last.insert(RoomId(u(r.get(0))), u(r.get(1)));
    }
    let ts = now_ms();
    let mut new: Vec<(usize, Message)> = Vec::new();
    let mut outcome: Vec<Outcome> = Vec::with_capacity(sends.len());
    for s in sends {
        let room_members = members.get(&s.room).cloned();
        let Some(room_members) = room_members.filter(|m| m.binary_search(&s.from).is_ok()) else {
            outcome.push(Err(ApiError::room_not_found()));
            continue;
        };
        let key = (s.room, s.from, s.client_id.clone());
        if let Some(msg) = stored.get(&key) {
            let msg = msg.clone();
            outcome.push(Ok((msg, true, room_members)));
            continue;
        }
        let Some(seq) = last.get_mut(&s.room) else {
            outcome.push(Err(ApiError::room_not_found()));
            continue;
        };
        *seq += 1;
        let msg = Message {
            room: s.room,
            seq: *seq,
            from: s.from,
            ts,
            text: s.text.clone(),
            client_id: s.client_id.clone(),
            kind: None,
            payment: None,
            unreadable: false,
        };
        // A second copy later in this run is the same message.
        stored.insert(key, msg.clone());
        state
            .reads
            .entry((s.room, s.from))
            .and_modify(|q| *q = (*q).max(msg.seq))
            .or_insert(msg.seq);
        new.push((outcome.len(), msg.clone()));
        outcome.push(Ok((msg, false, room_members)));
    }
    if !new.is_empty() {
        let first = take_positions(txn, state, new.len() as i64).await?;
        let mut cols = MessageColumns::default();
        for (i, (_, m)) in new.iter().enumerate() {
            cols.push(m, first + i as i64, None);
        }
        cols.insert(txn).await?;
        let (ids, seqs): (Vec<i64>, Vec<i64>) = last.iter().map(|(r, s)| (b(r.0), b(*s))).unzip();
        txn.execute(
            "UPDATE rooms SET last_seq = k.seq
             FROM unnest($1::bigint[], $2::bigint[]) AS k(id, seq)
             WHERE rooms.id = k.id AND rooms.last_seq < k.seq",
            &[&ids, &seqs],
        )
        .await
        .map_err(db_err)?;
    }
    Ok(outcome)
}

/// `MESSAGE_COLUMNS` with a table alias.
fn prefixed(alias: &str) -> String {
    rows::MESSAGE_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// (room, member) → seq entries as three `bigint` columns for `unnest`,
/// in key order (the order every writer locks member rows in); a seq past
/// `i64::MAX` is clamped to it.
fn member_columns(
    entries: impl Iterator<Item = ((RoomId, UserId), u64)>,
) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let mut keys: Vec<(i64, i64, i64)> = entries
        .map(|((r, m), s)| (b(r.0), b(m.0), b(s.min(i64::MAX as u64))))
        .collect();
    keys.sort_unstable();
    let mut cols = (Vec::with_capacity(keys.len()), Vec::new(), Vec::new());
    for (r, m, s) in keys {
        cols.0.push(r);
        cols.1.push(m);
        cols.2.push(s);
    }
    cols
}

/// Moves the batch's senders' read positions to their newest messages.
pub(super) async fn flush_reads(
    txn: &Transaction<'_>,
    state: &mut BatchState,
) -> Result<(), ApiError> {
    if state.reads.is_empty() {
        return Ok(());
    }
    let (rooms, users, seqs) = member_columns(state.reads.drain());
    txn.execute(
        "UPDATE members SET read_seq = k.seq
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k(room, user_id, seq)
         WHERE members.room = k.room AND members.user_id = k.user_id
           AND members.read_seq < k.seq",
        &[&rooms, &users, &seqs],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Applies the batch's reported read positions in one statement (each
/// clamped to the room's last seq, only forward, only for members), and
/// adds a receipt (`Effect::Read`) for each position that moved.
pub(super) async fn apply_reads(
    txn: &Transaction<'_>,
    state: &mut BatchState,
    effects: &mut Vec<Effect>,
) -> Result<(), ApiError> {
    if state.read_ops.is_empty() {
        return Ok(());
    }
    let (rooms, users, seqs) = member_columns(state.read_ops.drain());
    let moved = txn
        .query(
            "UPDATE members m SET read_seq = LEAST(k.seq, r.last_seq)
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k(room, user_id, seq)
             JOIN rooms r ON r.id = k.room
             WHERE m.room = k.room AND m.user_id = k.user_id
               AND m.read_seq < LEAST(k.seq, r.last_seq)
             RETURNING m.room, m.user_id, m.read_seq",
            &[&rooms, &users, &seqs],
        )
        .await
        .map_err(db_err)?;
    if moved.is_empty() {
        return Ok(());
    }
    let changed: Vec<i64> = moved.iter().map(|r| r.get::<_, i64>(0)).collect();
    let members = rows::members_of(txn, &changed).await?;
    for r in moved {
        let room = RoomId(u(r.get(0)));
        effects.push(Effect::Read {
            room,
            user: UserId(u(r.get(1))),
            seq: u(r.get(2)),
            members: members.get(&room).cloned().unwrap_or_else(|| Arc::from([])),
        });
    }
    Ok(())
}

/// Applies one op other than a send or a wallet op.
pub(super) async fn apply(
    w: &Ctx,
    txn: &Transaction<'_>,
    op: Op,
    state: &mut BatchState,
) -> Result<Effect, ApiError> {
    Ok(match op {
        Op::Send { .. } | Op::Wallet(_) => {
            return Err(ApiError::internal(
                "a send or wallet op in the chat's apply",
            ));
        }
        Op::Read { room, user, seq } => {
            // Applied with the batch's other reads ([`apply_reads`]).
            let at = state.read_ops.entry((room, user)).or_insert(seq);
            *at = (*at).max(seq);
            Effect::None
        }
        Op::CreateUser {
            username,
            display_name,
            password_hash,
            reply,
        } => {
            let key = username.to_lowercase();
            if exists(txn, "SELECT 1 FROM users WHERE username = $1", &[&key]).await? {
                return Ok(reply_after_commit(reply, Err(rules::username_taken())));
            }
            let mut id = UserId::random();
            while user_exists(txn, id).await? {
                id = UserId::random();
            }
            txn.execute(
                "INSERT INTO users (id, username, display_name, password_hash, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&b(id.0), &key, &display_name, &password_hash, &now_ms()],
            )
            .await
            .map_err(db_err)?;
            let bonus = w.wallet.settings.signup_bonus;
            if bonus > 0 {
                super::wallet::signup_bonus(w, txn, id, bonus).await?;
            }
            reply_after_commit(
                reply,
                Ok(crate::frames::User {
                    id,
                    username: key,
                    display_name,
                }),
            )
        }
        Op::AddContact { owner, who, reply } => {
            let found = match who {
                Contact::Name(name) => {
                    let sql = "SELECT id, username, display_name FROM users WHERE username = $1";
                    find_row(txn, sql, &[&name.to_lowercase()])
                        .await?
                        .map(|r| rows::user(&r))
                }
                Contact::Id(id) => rows::user_by_id(txn, id).await?,
            };
            let result = match found {
                None => Err(ApiError::user_not_found()),
                Some(user) if user.id == owner => Err(rules::cannot_add_yourself()),
                Some(user) => {
                    let added = txn
                        .execute(
                            "INSERT INTO contacts (owner, contact, added_at) VALUES ($1, $2, $3)
                             ON CONFLICT DO NOTHING",
                            &[&b(owner.0), &b(user.id.0), &now_ms()],
                        )
                        .await
                        .map_err(db_err)?;
                    Ok((user, added == 1))
                }
            };
            reply_after_commit(reply, result)
        }
        Op::RemoveContact {
            owner,
            contact,
            reply,
        } => {
            txn.execute(
                "DELETE FROM contacts WHERE owner = $1 AND contact = $2",
                &[&b(owner.0), &b(contact.0)],
            )
            .await
            .map_err(db_err)?;
            reply_after_commit(reply, Ok(()))
        }
        Op::CreateDirect { a, b: other, reply } => {
            if a == other {
                return Ok(reply_after_commit(
                    reply,
                    Err(rules::direct_needs_another_user()),
                ));
            }
            if !user_exists(txn, other).await? {
                return Ok(reply_after_commit(reply, Err(ApiError::user_not_found())));
            }
            let (room, created) = ensure_direct(txn, a, other).await?;
            direct_opened(room_view_of(txn, room).await?, created, reply)
        }
        Op::CreateGroup {
            owner,
            name,
            members,
            reply,
        } => {
            let ids = rules::group_members_in_order(owner, members);
            if let Err(e) = rules::check_group_size(ids.len(), w.max_group_members) {
                return Ok(reply_after_commit(reply, Err(e)));
            }
            for &id in &ids {
                if !user_exists(txn, id).await? {
                    return Ok(reply_after_commit(reply, Err(ApiError::user_not_found())));
                }
                if let Err(e) = may_add(txn, owner, id).await? {
                    return Ok(reply_after_commit(reply, Err(e)));
                }
            }
            let mut room = RoomId::new_group();
            while exists(txn, "SELECT 1 FROM rooms WHERE id = $1", &[&b(room.0)]).await? {
                room = RoomId::new_group();
            }
            txn.execute(
                "INSERT INTO rooms (id, kind, name, owner, created_at) VALUES ($1, 1, $2, $3, $4)",
                &[&b(room.0), &name, &b(owner.0), &now_ms()],
            )
            .await
            .map_err(db_err)?;
            for id in ids {
                add_member(txn, room, id).await?;
            }
            announce_and_reply(room_view_of(txn, room).await?, reply)
        }
        Op::AddMember {
            room,
            by,
            user,
            reply,
        } => answer_change(
            add_to_group(w, txn, room, by, user).await,
            reply,
            announce_and_reply,
        )?,
        Op::RemoveMember {
            room,
            by,
            user,
            reply,
        } => answer_change(
            remove_from_group(txn, room, by, user).await,
            reply,
            |view, reply| member_removed(view, user, reply),
        )?,
        Op::Revoke { jti, exp, reply } => {
            txn.execute(
                "INSERT INTO revoked (jti, exp) VALUES ($1, $2)
                 ON CONFLICT (jti) DO UPDATE SET exp = $2",
                &[&jti, &exp],
            )
            .await
            .map_err(db_err)?;
            reply_after_commit(reply, Ok(()))
        }
        Op::Stop => Effect::None,
        Op::SetPrivacy {
            user,
            presence,
            group_adds,
            reply,
        } => {
            let sql = "SELECT presence, group_adds FROM users WHERE id = $1 FOR UPDATE";
            let Some(row) = find_row(txn, sql, &[&b(user.0)]).await? else {
                return Ok(reply_after_commit(reply, Err(ApiError::user_not_found())));
            };
            let before = rows::privacy(&row);
            let after = rules::privacy_after(before, presence, group_adds);
            if after != before {
                txn.execute(
                    "UPDATE users SET presence = $2, group_adds = $3 WHERE id = $1",
                    &[
                        &b(user.0),
                        &rows::audience_code(after.presence),
                        &rows::audience_code(after.group_adds),
                    ],
                )
                .await
                .map_err(db_err)?;
            }
            reply_after_commit(reply, Ok((before, after)))
        }
        Op::LastSeen { user, ts } => {
            txn.execute(
                "UPDATE users SET last_seen = $2 WHERE id = $1",
                &[&b(user.0), &ts],
            )
            .await
            .map_err(db_err)?;
            Effect::None
        }
    })
}

/// Whether `by` may add `user` to a group, by `user`'s `group_adds`
/// setting: Ok(Err(403 `not_allowed`)) when not.
async fn may_add(
    txn: &Transaction<'_>,
    by: UserId,
    user: UserId,
) -> Result<Result<(), ApiError>, ApiError> {
    if by == user {
        return Ok(Ok(()));
    }
    let sql = "SELECT group_adds, username,
                      EXISTS (SELECT 1 FROM contacts WHERE owner = $1 AND contact = $2)
               FROM users WHERE id = $1";
    let Some(row) = find_row(txn, sql, &[&b(user.0), &b(by.0)]).await? else {
        return Ok(Ok(()));
    };
    if rows::audience(row.get(0)).admits_given(user, by, row.get(2)) {
        return Ok(Ok(()));
    }
    let name: String = row.get(1);
    Ok(Err(rules::not_allowed_to_add(&name)))
}

/// The group's members and owner, its row locked (membership changes of
/// one room queue up), for a change by `by` ([`rules::check_member_change`]).
async fn locked_group(
    txn: &Transaction<'_>,
    room: RoomId,
    by: UserId,
) -> Result<(Vec<UserId>, Option<UserId>), ApiError> {
    let sql = "SELECT owner FROM rooms WHERE id = $1 FOR UPDATE";
    let Some(r) = find_row(txn, sql, &[&b(room.0)]).await? else {
        return Err(ApiError::room_not_found());
    };
    let owner = r.get::<_, Option<i64>>(0).map(|o| UserId(u(o)));
    let members = rows::members(txn, room).await?;
    rules::check_member_change(room, &members, by)?;
    Ok((members, owner))
}

async fn add_to_group(
    w: &Ctx,
    txn: &Transaction<'_>,
    room: RoomId,
    by: UserId,
    user: UserId,
) -> Result<Room, ApiError> {
    let (members, _) = locked_group(txn, room, by).await?;
    if !user_exists(txn, user).await? {
        return Err(ApiError::user_not_found());
    }
    if members.binary_search(&user).is_err() {
        rules::check_group_size(members.len() + 1, w.max_group_members)?;
        may_add(txn, by, user).await??;
        add_member(txn, room, user).await?;
    }
    room_view_of(txn, room).await
}

async fn remove_from_group(
    txn: &Transaction<'_>,
    room: RoomId,
    by: UserId,
    user: UserId,
) -> Result<Room, ApiError> {
    let (members, owner) = locked_group(txn, room, by).await?;
    rules::check_is_member(&members, user)?;
    rules::check_may_remove(by, user, owner)?;
    txn.execute(
        "DELETE FROM members WHERE room = $1 AND user_id = $2",
        &[&b(room.0), &b(user.0)],
    )
    .await
    .map_err(db_err)?;
    if owner == Some(user) {
        // The longest-standing remaining member becomes owner.
        txn.execute(
            "UPDATE rooms SET owner = (SELECT user_id FROM members WHERE room = $1
                                       ORDER BY joined_at LIMIT 1)
             WHERE id = $1",
            &[&b(room.0)],
        )
        .await
        .map_err(db_err)?;
    }
    room_view_of(txn, room).await
}
