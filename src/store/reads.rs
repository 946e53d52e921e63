//! `Store`, the read side (cheap to clone), and its read queries, each
//! serving read inside `Store::guard`; the `CommitFeed` of committed
//! `message_log` positions; the helpers that read inside a given
//! transaction (`user_in`, `members_in`, `last_seq_in`, `room_view`, …).

use std::sync::Arc;

use redb::ReadableTable;

use super::db;
use super::guard::guard;
use super::records::{MemberRecord, Privacy, RoomKind, RoomRecord, UserRecord, privacy_in};
use super::seal;
use super::seal::Rec;
use super::tables::{
    CONTACTS, LAST_SEEN, MEMBERS, MESSAGE_LOG, MESSAGES, PRIVACY, REVOKED, ROOMS, USER_ROOMS,
    USERNAMES, USERS,
};
use super::transfer_ids;
use crate::error::ApiError;
use crate::frames::{Message, Room, User};
use crate::ids::{RoomId, UserId};

/// One room of `user`'s room list: its view with `last_message`, the
/// user's `unread` count and `reads` (every member's read position by user
/// id, from `reads`: the caller's gives `unread`, the others' let a client
/// show read ticks right after a reload); and its activity, which orders
/// the list: the last message's time, else the room's creation (an
/// unreadable last message has no time of its own).
pub fn room_list_entry(
    view: &Room,
    last: Option<&Message>,
    reads: &[(UserId, u64)],
    user: UserId,
) -> Result<(i64, serde_json::Value), ApiError> {
    let mut by_user = serde_json::Map::new();
    let mut read_seq = 0;
    for &(member, seq) in reads {
        if member == user {
            read_seq = seq;
        }
        by_user.insert(member.to_string(), seq.into());
    }
    let activity = last
        .filter(|m| !m.unreadable)
        .map(|m| m.ts)
        .unwrap_or(view.created_at);
    let mut v = serde_json::to_value(view).map_err(ApiError::internal)?;
    v["last_message"] = serde_json::to_value(last).map_err(ApiError::internal)?;
    v["unread"] = view.last_seq.saturating_sub(read_seq).into();
    v["reads"] = by_user.into();
    Ok((activity, v))
}

/// A room list of [`room_list_entry`]s, most recent activity first; the
/// sort is stable (equal activity keeps the order given: room ids').
pub fn by_activity(mut entries: Vec<(i64, serde_json::Value)>) -> Vec<serde_json::Value> {
    entries.sort_by_key(|x| std::cmp::Reverse(x.0));
    entries.into_iter().map(|(_, v)| v).collect()
}

/// The read side of the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// The database, reopenable after an I/O error (see [`db::Db`]).
    pub db: Arc<db::Db>,
    /// What the writer knows of the storage (full, failing).
    pub health: Arc<db::StorageHealth>,
    /// How far `message_log` is committed; the writer publishes, the search
    /// indexer waits on it.
    pub feed: Arc<CommitFeed>,
    /// How transfer ids (and the wallet's currency) are shown to clients.
    /// Here because every reader and the writer already hold the store, and
    /// payment messages are built from records in its read queries. The
    /// default (from an empty secret, in KRW) is for tools that show no ids;
    /// a server sets its own with [`Store::with_transfer_ids`] before
    /// anything reads.
    pub transfer_ids: transfer_ids::TransferIds,
}

/// What runs on a snapshot of an older store (with its schema version)
/// before it is migrated; an error stops the migration.
pub type BeforeMigration<'a> = &'a dyn Fn(&redb::ReadTransaction, u64) -> Result<(), String>;

/// The highest committed `message_log` position, with a wake-up for waiters.
#[derive(Default)]
pub struct CommitFeed {
    pub(super) committed: std::sync::atomic::AtomicU64,
    pub(super) lock: std::sync::Mutex<()>,
    pub(super) wake: std::sync::Condvar,
}

impl CommitFeed {
    pub fn committed(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Called by the writer after a durable commit.
    pub fn publish(&self, pos: u64) {
        self.committed
            .fetch_max(pos, std::sync::atomic::Ordering::AcqRel);
        let _guard = self.lock.lock();
        self.wake.notify_all();
    }

    /// Wakes up other waiters (e.g. to stop) without a new position.
    pub fn nudge(&self) {
        let _guard = self.lock.lock();
        self.wake.notify_all();
    }

    /// Waits until the committed position passes `pos`, or `timeout`.
    pub fn wait_beyond(&self, pos: u64, timeout: std::time::Duration) {
        let Ok(guard) = self.lock.lock() else {
            return;
        };
        if self.committed() > pos {
            return;
        }
        let _ = self.wake.wait_timeout(guard, timeout);
    }
}

impl Store {
    /// This store, showing transfer ids under `ids` (the server's key).
    pub fn with_transfer_ids(mut self, ids: transfer_ids::TransferIds) -> Store {
        self.transfer_ids = ids;
        self
    }

    pub(super) fn read(&self) -> Result<redb::ReadTransaction, ApiError> {
        Ok(self.db.begin_read()?)
    }

    /// [`guard`] for a read of this store: the damage it meets is reported
    /// into the store's log ([`db::Db::damage`]).
    pub fn guard<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.db.damage().scope(|| guard(what, f))
    }

    /// True until the first user signs up.
    pub fn has_no_users(&self) -> Result<bool, ApiError> {
        self.guard("has_no_users", || {
            let txn = self.read()?;
            let users = txn.open_table(USERS)?;
            Ok(users.first()?.is_none())
        })
    }

    pub fn user(&self, id: UserId) -> Result<Option<User>, ApiError> {
        self.guard("user", || {
            let txn = self.read()?;
            let users = txn.open_table(USERS)?;
            user_in(&users, id)
        })
    }

    /// The user record (with password hash) for a username, case-insensitive.
    pub fn user_by_name(&self, username: &str) -> Result<Option<(UserId, UserRecord)>, ApiError> {
        self.guard("user_by_name", || {
            let txn = self.read()?;
            let names = txn.open_table(USERNAMES)?;
            let Some(id) = names
                .get(username.to_lowercase().as_str())?
                .map(|g| g.value())
            else {
                return Ok(None);
            };
            let users = txn.open_table(USERS)?;
            match users.get(id)? {
                Some(g) => Ok(Some((UserId(id), seal::open(Rec::Users, id, g.value())?))),
                None => Ok(None),
            }
        })
    }

    pub fn search_users(&self, prefix: &str, limit: usize) -> Result<Vec<User>, ApiError> {
        self.guard("search_users", || {
            let prefix = prefix.to_lowercase();
            let txn = self.read()?;
            let names = txn.open_table(USERNAMES)?;
            let users = txn.open_table(USERS)?;
            let mut out = Vec::new();
            for entry in names.range(prefix.as_str()..)? {
                let (name, id) = entry?;
                if !name.value().starts_with(&prefix) || out.len() >= limit {
                    break;
                }
                if let Some(u) = user_in(&users, UserId(id.value()))? {
                    out.push(u);
                }
            }
            Ok(out)
        })
    }

    pub fn contacts(&self, owner: UserId) -> Result<Vec<User>, ApiError> {
        self.guard("contacts", || {
            let txn = self.read()?;
            let contacts = txn.open_table(CONTACTS)?;
            let users = txn.open_table(USERS)?;
            let mut out = Vec::new();
            for entry in contacts.range((owner.0, 0)..=(owner.0, u64::MAX))? {
                let (k, _) = entry?;
                if let Some(u) = user_in(&users, UserId(k.value().1))? {
                    out.push(u);
                }
            }
            out.sort_by(|a, b| a.username.cmp(&b.username));
            Ok(out)
        })
    }

    /// The room, if `user` is a member of it.
    pub fn room_for(&self, room: RoomId, user: UserId) -> Result<Room, ApiError> {
        self.guard("room_for", || {
            let txn = self.read()?;
            check_member(&txn, room, user)?;
            room_in(&txn, room)?.ok_or_else(ApiError::room_not_found)
        })
    }

    /// Up to `max` logged messages after log position `after`, in log order.
    pub fn log_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Message)>, ApiError> {
        self.guard("log_after", || {
            let txn = self.read()?;
            let log = txn.open_table(MESSAGE_LOG)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::with_capacity(max.min(4096));
            for entry in log.range(after.saturating_add(1)..)? {
                if out.len() >= max {
                    break;
                }
                let (k, v) = entry?;
                let (room, seq) = v.value();
                // One message on a damaged page does not stop the log: it is
                // unreadable, and the reader (the indexer) moves past it.
                let got = self
                    .guard("a logged message", || {
                        Ok(messages.get((room, seq))?.map(|g| {
                            Message::from_stored(RoomId(room), seq, g.value(), &self.transfer_ids)
                        }))
                    })
                    .unwrap_or_else(|_| Some(Message::unreadable(RoomId(room), seq)));
                if let Some(m) = got {
                    out.push((k.value(), m));
                }
            }
            Ok(out)
        })
    }

    /// The stored messages at these keys (missing ones are skipped).
    pub fn messages_at(&self, keys: &[(RoomId, u64)]) -> Result<Vec<Message>, ApiError> {
        self.guard("messages_at", || {
            let txn = self.read()?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::with_capacity(keys.len());
            for &(room, seq) in keys {
                let got = self
                    .guard("a message", || {
                        Ok(messages.get((room.0, seq))?.map(|g| {
                            Message::from_stored(room, seq, g.value(), &self.transfer_ids)
                        }))
                    })
                    .unwrap_or_else(|_| Some(Message::unreadable(room, seq)));
                out.extend(got);
            }
            Ok(out)
        })
    }

    /// The rooms `user` is a member of.
    pub fn room_ids_of(&self, user: UserId) -> Result<Vec<RoomId>, ApiError> {
        self.guard("room_ids_of", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                out.push(RoomId(entry?.0.value().1));
            }
            Ok(out)
        })
    }

    /// Every room of `user` with its highest seq (what a proxy's new session
    /// counts as already past).
    pub fn room_heads(&self, user: UserId) -> Result<Vec<(RoomId, u64)>, ApiError> {
        self.guard("room_heads", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                let room = entry?.0.value().1;
                let head = match messages.range((room, 0)..=(room, u64::MAX))?.next_back() {
                    Some(e) => e?.0.value().1,
                    None => 0,
                };
                out.push((RoomId(room), head));
            }
            Ok(out)
        })
    }

    /// Every room of `user`, with its last message and the user's unread count,
    /// most recent activity first.
    pub fn rooms_of(&self, user: UserId) -> Result<Vec<serde_json::Value>, ApiError> {
        self.guard("rooms_of", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let members = txn.open_table(MEMBERS)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                let (k, _) = entry?;
                let room = RoomId(k.value().1);
                let Some(view) = room_in(&txn, room)? else {
                    continue;
                };
                let last = last_message(&messages, room, &self.transfer_ids)?;
                let mut reads = Vec::new();
                for entry in members.range((room.0, 0)..=(room.0, u64::MAX))? {
                    let (k, g) = entry?;
                    let rec: MemberRecord = seal::open(Rec::Members, k.value(), g.value())?;
                    reads.push((UserId(k.value().1), rec.read_seq));
                }
                out.push(room_list_entry(&view, last.as_ref(), &reads, user)?);
            }
            Ok(by_activity(out))
        })
    }

    /// Messages of a room for a member: `after` → the first `limit` with a
    /// greater seq; `before` → the last `limit` with a smaller seq; neither →
    /// the latest `limit`. Always ascending.
    pub fn history(
        &self,
        room: RoomId,
        user: UserId,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>, ApiError> {
        self.guard("history", || {
            let txn = self.read()?;
            check_member(&txn, room, user)?;
            let messages = txn.open_table(MESSAGES)?;
            let lo = after.map(|a| a.saturating_add(1)).unwrap_or(1);
            let hi = before.map(|b| b.saturating_sub(1)).unwrap_or(u64::MAX);
            if lo > hi {
                return Ok(Vec::new());
            }
            let range = messages.range((room.0, lo)..=(room.0, hi))?;
            let mut out = Vec::with_capacity(limit.min(256));
            if after.is_some() {
                for entry in range.take(limit) {
                    let (k, v) = entry?;
                    out.push(Message::from_stored(
                        room,
                        k.value().1,
                        v.value(),
                        &self.transfer_ids,
                    ));
                }
            } else {
                for entry in range.rev().take(limit) {
                    let (k, v) = entry?;
                    out.push(Message::from_stored(
                        room,
                        k.value().1,
                        v.value(),
                        &self.transfer_ids,
                    ));
                }
                out.reverse();
            }
            Ok(out)
        })
    }

    /// Fails with `room_not_found` unless `user` is in `room` (whether or not
    /// the room exists).
    pub fn check_member(&self, room: RoomId, user: UserId) -> Result<(), ApiError> {
        self.guard("check_member", || {
            let txn = self.read()?;
            check_member(&txn, room, user)
        })
    }

    pub fn members(&self, room: RoomId) -> Result<Vec<UserId>, ApiError> {
        self.guard("members", || {
            let txn = self.read()?;
            let members = txn.open_table(MEMBERS)?;
            members_in(&members, room)
        })
    }

    /// Users who share a direct room with `user` (they see its presence).
    pub fn direct_peers(&self, user: UserId) -> Result<Vec<UserId>, ApiError> {
        self.guard("direct_peers", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let members = txn.open_table(MEMBERS)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                let (k, _) = entry?;
                let room = RoomId(k.value().1);
                if room.is_direct() {
                    out.extend(
                        members_in(&members, room)?
                            .into_iter()
                            .filter(|&u| u != user),
                    );
                }
            }
            Ok(out)
        })
    }

    /// `user`'s privacy settings.
    pub fn privacy(&self, user: UserId) -> Result<Privacy, ApiError> {
        self.guard("privacy", || {
            let txn = self.read()?;
            privacy_in(&txn.open_table(PRIVACY)?, user)
        })
    }

    /// Of `viewers`, those who may see `owner`'s presence.
    pub fn presence_audience(
        &self,
        owner: UserId,
        viewers: &[UserId],
    ) -> Result<Vec<UserId>, ApiError> {
        self.guard("presence_audience", || {
            let txn = self.read()?;
            let audience = privacy_in(&txn.open_table(PRIVACY)?, owner)?.presence;
            let contacts = txn.open_table(CONTACTS)?;
            let mut out = Vec::with_capacity(viewers.len());
            for &v in viewers {
                if audience.admits(&contacts, owner, v)? {
                    out.push(v);
                }
            }
            Ok(out)
        })
    }

    /// Of `owners`, those whose presence `viewer` may see.
    pub fn presences_seen_by(
        &self,
        viewer: UserId,
        owners: &[UserId],
    ) -> Result<Vec<UserId>, ApiError> {
        self.guard("presences_seen_by", || {
            let txn = self.read()?;
            let privacy = txn.open_table(PRIVACY)?;
            let contacts = txn.open_table(CONTACTS)?;
            let mut out = Vec::with_capacity(owners.len());
            for &o in owners {
                if privacy_in(&privacy, o)?
                    .presence
                    .admits(&contacts, o, viewer)?
                {
                    out.push(o);
                }
            }
            Ok(out)
        })
    }

    pub fn last_seen(&self, user: UserId) -> Result<Option<i64>, ApiError> {
        self.guard("last_seen", || {
            let txn = self.read()?;
            let t = txn.open_table(LAST_SEEN)?;
            Ok(t.get(user.0)?.map(|g| g.value()))
        })
    }

    /// Revoked token ids that have not expired yet (loaded at start-up).
    pub fn revoked_tokens(&self, now_secs: i64) -> Result<Vec<(String, i64)>, ApiError> {
        let txn = self.read()?;
        let t = txn.open_table(REVOKED)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            if v.value() > now_secs {
                out.push((k.value().to_string(), v.value()));
            }
        }
        Ok(out)
    }
}

pub fn user_in(
    users: &impl ReadableTable<u64, &'static [u8]>,
    id: UserId,
) -> Result<Option<User>, ApiError> {
    match users.get(id.0)? {
        Some(g) => {
            let r: UserRecord = seal::open(Rec::Users, id.0, g.value())?;
            Ok(Some(User {
                id,
                username: r.username,
                display_name: r.display_name,
            }))
        }
        None => Ok(None),
    }
}

pub fn members_in(
    members: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
) -> Result<Vec<UserId>, ApiError> {
    let mut out = Vec::new();
    for entry in members.range((room.0, 0)..=(room.0, u64::MAX))? {
        let (k, _) = entry?;
        out.push(UserId(k.value().1));
    }
    Ok(out)
}

/// The room's last seq: the last key of its range (0 when empty).
pub fn last_seq_in(
    messages: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
) -> Result<u64, ApiError> {
    match messages
        .range((room.0, 0)..=(room.0, u64::MAX))?
        .next_back()
    {
        Some(e) => Ok(e?.0.value().1),
        None => Ok(0),
    }
}

pub fn last_message(
    messages: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
    ids: &transfer_ids::TransferIds,
) -> Result<Option<Message>, ApiError> {
    match messages
        .range((room.0, 0)..=(room.0, u64::MAX))?
        .next_back()
    {
        Some(entry) => {
            let (k, v) = entry?;
            Ok(Some(Message::from_stored(
                room,
                k.value().1,
                v.value(),
                ids,
            )))
        }
        None => Ok(None),
    }
}

pub(super) fn check_member(
    txn: &redb::ReadTransaction,
    room: RoomId,
    user: UserId,
) -> Result<(), ApiError> {
    let members = txn.open_table(MEMBERS)?;
    if members.get((room.0, user.0))?.is_some() {
        return Ok(());
    }
    Err(ApiError::room_not_found())
}

pub(super) fn room_in(txn: &redb::ReadTransaction, room: RoomId) -> Result<Option<Room>, ApiError> {
    let rooms = txn.open_table(ROOMS)?;
    let members = txn.open_table(MEMBERS)?;
    let users = txn.open_table(USERS)?;
    let messages = txn.open_table(MESSAGES)?;
    room_view(&rooms, &members, &users, &messages, room)
}

/// Builds the client view of a room from any set of (read or write) tables.
pub fn room_view(
    rooms: &impl ReadableTable<u64, &'static [u8]>,
    members: &impl ReadableTable<(u64, u64), &'static [u8]>,
    users: &impl ReadableTable<u64, &'static [u8]>,
    messages: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
) -> Result<Option<Room>, ApiError> {
    let Some(g) = rooms.get(room.0)? else {
        return Ok(None);
    };
    let rec: RoomRecord = seal::open(Rec::Rooms, room.0, g.value())?;
    let mut list = Vec::new();
    for id in members_in(members, room)? {
        if let Some(u) = user_in(users, id)? {
            list.push(u);
        }
    }
    let last_seq = last_seq_in(messages, room)?;
    Ok(Some(Room {
        id: room,
        kind: match rec.kind {
            RoomKind::Direct => "direct",
            RoomKind::Group => "group",
        },
        name: rec.name,
        owner: rec.owner.map(UserId),
        members: list,
        created_at: rec.created_at,
        last_seq,
    }))
}
