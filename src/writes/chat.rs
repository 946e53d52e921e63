//! The chat's write operations inside the engine's write transaction: the
//! big match over [`Op`] (messages with seq assignment and `client_id`
//! dedup, rooms, members, contacts, accounts, tokens, privacy, read
//! positions), and the records and effects each one leaves; the wallet's
//! ops are handed to `writes/wallet.rs`. What is allowed is decided by
//! [`super::rules`], which the PostgreSQL backend applies too.

use redb::{ReadableTable, Table};

use super::base::*;
use super::rules;
use crate::error::ApiError;
use crate::frames::{self};
use crate::hub::OutFrame;
use crate::ids::{RoomId, UserId};
use crate::store::seal::seal;
use crate::store::*;

impl GroupCommitWriter {
    pub(super) fn apply(&mut self, op: Op, t: &mut Tables) -> Result<Effect, ApiError> {
        Ok(match op {
            Op::Wallet(op) => return self.apply_wallet(op, t),
            Op::Send {
                room,
                from,
                client_id,
                text,
                origin,
                received,
            } => {
                let members = match self.check_member(t, room, from) {
                    Ok(m) => m,
                    Err(err) if err.status.is_client_error() => {
                        return Ok(Effect::Rejected {
                            origin,
                            err,
                            client_id,
                            room,
                        });
                    }
                    Err(e) => return Err(e),
                };
                let existing = t
                    .client_ids
                    .get((room.0, from.0, client_id.as_str()))?
                    .map(|g| g.value());
                if let Some(seq) = existing {
                    // A damaged original answers as unreadable (reported),
                    // with the client_id the client knows it by.
                    let msg = match t.messages.get((room.0, seq))? {
                        Some(g) => {
                            Message::from_stored(room, seq, g.value(), &self.store.transfer_ids)
                        }
                        None => {
                            return Err(ApiError::internal(
                                "client_id points at a missing message",
                            ));
                        }
                    };
                    let msg = if msg.unreadable {
                        Message { client_id, ..msg }
                    } else {
                        msg
                    };
                    return Ok(Effect::Sent {
                        msg,
                        members,
                        origin,
                        duplicate: true,
                        received,
                    });
                }
                let seq = self.next_seq(t, room)?;
                let rec = MessageRecord {
                    from: from.0,
                    ts: now_ms(),
                    client_id,
                    text,
                    payment: None,
                };
                t.messages
                    .insert((room.0, seq), rec.sealed(room, seq).as_slice())?;
                let pos = self.next_log_pos(t)?;
                t.message_log.insert(pos, (room.0, seq))?;
                t.client_ids
                    .insert((room.0, from.0, rec.client_id.as_str()), seq)?;
                self.pending_reads.insert((room, from), seq);
                Effect::Sent {
                    msg: Message::from_record(room, seq, rec, &self.store.transfer_ids),
                    members,
                    origin,
                    duplicate: false,
                    received,
                }
            }
            Op::Read { room, user, seq } => {
                let Ok(members) = self.check_member(t, room, user) else {
                    return Ok(Effect::None);
                };
                let seq = seq.min(self.last_seq(t, room)?);
                if seq == 0 || !bump_read(&mut t.members, room, user, seq)? {
                    return Ok(Effect::None);
                }
                Effect::Read {
                    room,
                    user,
                    seq,
                    members,
                }
            }
            Op::CreateUser {
                username,
                display_name,
                password_hash,
                reply,
            } => {
                let key = username.to_lowercase();
                let result = if t.usernames.get(key.as_str())?.is_some() {
                    Err(rules::username_taken())
                } else {
                    let mut id = UserId::random();
                    while t.users.get(id.0)?.is_some() {
                        id = UserId::random();
                    }
                    let rec = UserRecord {
                        username: key.clone(),
                        display_name: display_name.clone(),
                        password_hash,
                        created_at: now_ms(),
                    };
                    t.users
                        .insert(id.0, seal(Rec::Users, id.0, encode(&rec)).as_slice())?;
                    t.usernames.insert(key.as_str(), id.0)?;
                    let bonus = self.wallet.settings.signup_bonus;
                    if bonus > 0 {
                        let mut ignored = Default::default();
                        self.credit(t, id, bonus, None, &mut ignored)?
                            .map_err(crate::wallet::rules::signup_bonus_failed)?;
                    }
                    Ok(User {
                        id,
                        username: key,
                        display_name,
                    })
                };
                reply_after_commit(reply, result)
            }
            Op::AddContact { owner, who, reply } => {
                let found = match who {
                    Contact::Name(username) => t
                        .usernames
                        .get(username.to_lowercase().as_str())?
                        .map(|g| g.value()),
                    Contact::Id(id) => t.users.get(id.0)?.map(|_| id.0),
                };
                let result = match found {
                    None => Err(ApiError::user_not_found()),
                    Some(id) if id == owner.0 => Err(rules::cannot_add_yourself()),
                    Some(id) => {
                        let user =
                            user_in(&t.users, UserId(id))?.ok_or_else(ApiError::user_not_found)?;
                        let existed = t.contacts.get((owner.0, id))?.is_some();
                        if !existed {
                            t.contacts.insert((owner.0, id), now_ms())?;
                        }
                        Ok((user, !existed))
                    }
                };
                reply_after_commit(reply, result)
            }
            Op::RemoveContact {
                owner,
                contact,
                reply,
            } => {
                t.contacts.remove((owner.0, contact.0))?;
                reply_after_commit(reply, Ok(()))
            }
            Op::CreateDirect { a, b, reply } => {
                let result = if a == b {
                    Err(rules::direct_needs_another_user())
                } else if t.users.get(b.0)?.is_none() {
                    Err(ApiError::user_not_found())
                } else {
                    let (room, created) = self.ensure_direct(t, a, b)?;
                    let view = room_view(&t.rooms, &t.members, &t.users, &t.messages, room)?
                        .ok_or_else(ApiError::room_not_found)?;
                    Ok((view, created))
                };
                match result {
                    Ok((view, created)) => direct_opened(view, created, reply),
                    Err(e) => reply_after_commit(reply, Err(e)),
                }
            }
            Op::CreateGroup {
                owner,
                name,
                members,
                reply,
            } => {
                let ids = rules::group_members_in_order(owner, members);
                if let Err(e) = rules::check_group_size(ids.len(), self.max_group_members) {
                    return Ok(reply_after_commit(reply, Err(e)));
                }
                for id in &ids {
                    if t.users.get(id.0)?.is_none() {
                        return Ok(reply_after_commit(reply, Err(ApiError::user_not_found())));
                    }
                    if let Err(e) = Self::may_add(t, owner, *id)? {
                        return Ok(reply_after_commit(reply, Err(e)));
                    }
                }
                let mut room = RoomId::new_group();
                while t.rooms.get(room.0)?.is_some() {
                    room = RoomId::new_group();
                }
                let rec = RoomRecord {
                    kind: RoomKind::Group,
                    name: Some(name),
                    owner: Some(owner.0),
                    created_at: now_ms(),
                };
                t.rooms
                    .insert(room.0, seal(Rec::Rooms, room.0, encode(&rec)).as_slice())?;
                for id in ids {
                    self.add_member(t, room, id)?;
                }
                let view = room_view(&t.rooms, &t.members, &t.users, &t.messages, room)?
                    .ok_or_else(ApiError::room_not_found)?;
                announce_and_reply(view, reply)
            }
            Op::AddMember {
                room,
                by,
                user,
                reply,
            } => {
                let result = (|| {
                    let members = self.members(t, room)?;
                    rules::check_member_change(room, &members, by)?;
                    if t.users.get(user.0)?.is_none() {
                        return Err(ApiError::user_not_found());
                    }
                    if members.binary_search(&user).is_err() {
                        rules::check_group_size(members.len() + 1, self.max_group_members)?;
                        Self::may_add(t, by, user)??;
                        self.add_member(t, room, user)?;
                    }
                    room_view(&t.rooms, &t.members, &t.users, &t.messages, room)?
                        .ok_or_else(ApiError::room_not_found)
                })();
                answer_change(result, reply, announce_and_reply)?
            }
            Op::RemoveMember {
                room,
                by,
                user,
                reply,
            } => {
                let result = (|| {
                    let members = self.members(t, room)?;
                    rules::check_member_change(room, &members, by)?;
                    rules::check_is_member(&members, user)?;
                    let rec: RoomRecord = match t.rooms.get(room.0)? {
                        Some(g) => seal::open(Rec::Rooms, room.0, g.value())?,
                        None => return Err(ApiError::room_not_found()),
                    };
                    rules::check_may_remove(by, user, rec.owner.map(UserId))?;
                    t.members.remove((room.0, user.0))?;
                    t.user_rooms.remove((user.0, room.0))?;
                    self.state.members.remove(&room);
                    if rec.owner == Some(user.0) {
                        // The longest-standing remaining member becomes owner.
                        let mut next: Option<(i64, u64)> = None;
                        for e in t.members.range((room.0, 0)..=(room.0, u64::MAX))? {
                            let (k, v) = e?;
                            let m: MemberRecord = seal::open(Rec::Members, k.value(), v.value())?;
                            let cand = (m.joined_at, k.value().1);
                            if next.is_none_or(|n| cand < n) {
                                next = Some(cand);
                            }
                        }
                        let rec = RoomRecord {
                            owner: next.map(|(_, id)| id),
                            ..rec
                        };
                        t.rooms
                            .insert(room.0, seal(Rec::Rooms, room.0, encode(&rec)).as_slice())?;
                    }
                    room_view(&t.rooms, &t.members, &t.users, &t.messages, room)?
                        .ok_or_else(ApiError::room_not_found)
                })();
                answer_change(result, reply, |view, reply| {
                    member_removed(view, user, reply)
                })?
            }
            Op::Revoke { jti, exp, reply } => {
                t.revoked.insert(jti.as_str(), exp)?;
                reply_after_commit(reply, Ok(()))
            }
            Op::SetPrivacy {
                user,
                presence,
                group_adds,
                reply,
            } => {
                let before = privacy_in(&t.privacy, user)?;
                let after = rules::privacy_after(before, presence, group_adds);
                if after != before {
                    t.privacy.insert(
                        user.0,
                        seal(Rec::Privacy, user.0, encode(&after)).as_slice(),
                    )?;
                }
                reply_after_commit(reply, Ok((before, after)))
            }
            Op::LastSeen { user, ts } => {
                t.last_seen.insert(user.0, ts)?;
                Effect::None
            }
            Op::Stop => Effect::None,
        })
    }

    /// Adds a member. Join times are strictly increasing within a room, so
    /// "longest-standing member" (the next owner) is never a tie.
    pub(super) fn add_member(
        &mut self,
        t: &mut Tables,
        room: RoomId,
        user: UserId,
    ) -> Result<(), ApiError> {
        let mut now = now_ms();
        for e in t.members.range((room.0, 0)..=(room.0, u64::MAX))? {
            let (k, v) = e?;
            let m: MemberRecord = seal::open(Rec::Members, k.value(), v.value())?;
            now = now.max(m.joined_at + 1);
        }
        let rec = MemberRecord {
            joined_at: now,
            read_seq: 0,
        };
        t.members.insert(
            (room.0, user.0),
            seal(Rec::Members, (room.0, user.0), encode(&rec)).as_slice(),
        )?;
        t.user_rooms.insert((user.0, room.0), now)?;
        self.state.members.remove(&room);
        Ok(())
    }

    /// Whether `by` may add `user` to a group, by `user`'s `group_adds`
    /// setting: Ok(Err(403 `not_allowed`)) when not.
    pub(super) fn may_add(
        t: &Tables,
        by: UserId,
        user: UserId,
    ) -> Result<Result<(), ApiError>, ApiError> {
        if privacy_in(&t.privacy, user)?
            .group_adds
            .admits(&t.contacts, user, by)?
        {
            return Ok(Ok(()));
        }
        let name = match t.users.get(user.0)? {
            Some(g) => seal::open::<UserRecord, _>(Rec::Users, user.0, g.value())?.username,
            None => user.to_string(),
        };
        Ok(Err(rules::not_allowed_to_add(&name)))
    }
}

/// Moves a member's read position forward; returns whether it moved.
pub(super) fn bump_read(
    members: &mut Table<(u64, u64), &'static [u8]>,
    room: RoomId,
    user: UserId,
    seq: u64,
) -> Result<bool, ApiError> {
    // A damaged member record (reported) keeps its place: a read position
    // is advisory, and failing here would fail the whole batch.
    let rec: Option<MemberRecord> = match members.get((room.0, user.0))? {
        Some(g) => seal::open(Rec::Members, (room.0, user.0), g.value()).ok(),
        None => None,
    };
    match rec {
        Some(mut rec) if rec.read_seq < seq => {
            rec.read_seq = seq;
            members.insert(
                (room.0, user.0),
                seal(Rec::Members, (room.0, user.0), encode(&rec)).as_slice(),
            )?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

pub fn reply_after_commit<T: Send + 'static>(
    reply: Reply<T>,
    result: Result<T, ApiError>,
) -> Effect {
    Effect::Done(Box::new(move |_| {
        let _ = reply.send(result);
    }))
}

/// The effect of a change that may be refused: done, `then`'s (what it
/// tells and answers after the commit); refused (a client error), that
/// answer after the commit; any other error fails the batch.
pub fn answer_change<T, R: Send + 'static>(
    result: Result<T, ApiError>,
    reply: Reply<R>,
    then: impl FnOnce(T, Reply<R>) -> Effect,
) -> Result<Effect, ApiError> {
    match result {
        Ok(done) => Ok(then(done, reply)),
        Err(e) if e.status.is_client_error() => Ok(reply_after_commit(reply, Err(e))),
        Err(e) => Err(e),
    }
}

/// After a commit that opened a direct chat (`created`: it is new): tell
/// both members if it is new, then answer the caller with it.
pub fn direct_opened(view: Room, created: bool, reply: Reply<(Room, bool)>) -> Effect {
    let announce = created.then(|| view.clone());
    Effect::Done(Box::new(move |hub| {
        if let Some(room) = announce {
            announce_room(hub, &room);
        }
        let _ = reply.send(Ok((view, created)));
    }))
}

/// After a commit that removed `user` from a group: tell them, tell the
/// remaining members the room as it is now, then answer the caller.
pub fn member_removed(view: Room, user: UserId, reply: Reply<()>) -> Effect {
    Effect::Done(Box::new(move |hub| {
        let removed = frames::ServerFrame::RoomRemoved { room: view.id }.to_bytes();
        hub.send_to_user(
            user,
            &OutFrame {
                bytes: removed,
                room_seq: None,
                pong: false,
            },
            None,
        );
        announce_room(hub, &view);
        let _ = reply.send(Ok(()));
    }))
}

/// After a commit that created or changed a room: tell its members, then
/// answer the caller with it.
pub fn announce_and_reply(view: Room, reply: Reply<Room>) -> Effect {
    Effect::Done(Box::new(move |hub| {
        announce_room(hub, &view);
        let _ = reply.send(Ok(view));
    }))
}
