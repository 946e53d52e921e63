//! What every write of the domains shares: the operations ([`Op`]) and
//! their answers, the writer's state and tables, and the chat's core that
//! other domains build on (members, seqs, the message log, direct rooms).
//! Below `writes/mod.rs` (the chat's operations, the engine's `Domain`) and
//! `writes/wallet.rs` (the ledger's), which both import it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{ReadableTable, Table};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::frames::{self, ServerFrame};
use crate::hub::{Hub, OutFrame, SessionOutbox};
use crate::ids::{RoomId, UserId};
use crate::store::seal::seal;
use crate::store::*;
use crate::wallet::{TransferRequest, TransferView};

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// Where the answer to a send goes.
pub enum Origin {
    /// `POST /rooms/{id}/messages`: the message, and whether it was a retry.
    Http(Reply<(Message, bool)>),
    /// A WebSocket session: an `ack` (or `error`) frame in its outbox.
    Session(Arc<SessionOutbox>),
}

/// Who to add as a contact.
pub enum Contact {
    Name(String),
    /// By id: any user this node has a record of (on a cluster node, also a
    /// profile from another node).
    Id(UserId),
}

pub enum Op {
    Send {
        room: RoomId,
        from: UserId,
        client_id: String,
        text: String,
        origin: Origin,
        received: Instant,
    },
    Read {
        room: RoomId,
        user: UserId,
        seq: u64,
    },
    CreateUser {
        username: String,
        display_name: String,
        password_hash: String,
        reply: Reply<User>,
    },
    AddContact {
        owner: UserId,
        who: Contact,
        reply: Reply<(User, bool)>,
    },
    RemoveContact {
        owner: UserId,
        contact: UserId,
        reply: Reply<()>,
    },
    CreateDirect {
        a: UserId,
        b: UserId,
        reply: Reply<(Room, bool)>,
    },
    CreateGroup {
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        reply: Reply<Room>,
    },
    AddMember {
        room: RoomId,
        by: UserId,
        user: UserId,
        reply: Reply<Room>,
    },
    RemoveMember {
        room: RoomId,
        by: UserId,
        user: UserId,
        reply: Reply<()>,
    },
    Revoke {
        jti: String,
        exp: i64,
        reply: Reply<()>,
    },
    LastSeen {
        user: UserId,
        ts: i64,
    },
    /// Changes what of `user`'s settings is Some; answers (before, after).
    SetPrivacy {
        user: UserId,
        presence: Option<Audience>,
        group_adds: Option<Audience>,
        reply: Reply<(Privacy, Privacy)>,
    },
    /// A wallet operation (ledger, transfers, schedule).
    Wallet(WalletOp),
    /// Commit what is queued before this and stop (graceful shutdown).
    Stop,
}

/// The async side: queue operations, await answers.
#[derive(Clone)]
pub struct WriterHandle {
    pub(super) tx: mpsc::Sender<Op>,
    /// Why an op may have been answered by dropping its reply.
    pub(super) health: Arc<crate::store::db::StorageHealth>,
}

impl WriterHandle {
    /// Queues an op (waiting while the queue is full).
    pub async fn submit(&self, op: Op) -> Result<(), ApiError> {
        self.tx
            .send(op)
            .await
            .map_err(|_| ApiError::busy("the server is shutting down"))
    }

    /// Queues an op built around a reply channel and waits for its answer,
    /// which comes after the op's commit.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx)).await?;
        rx.await.map_err(|_| {
            // The writer drops the reply of an op it could not apply: say
            // why when the storage is the reason.
            self.health
                .refusal_or_failure()
                .unwrap_or_else(|| ApiError::internal("the write was not committed"))
        })?
    }
}

impl Op {
    /// Ops that still run while the disk is full, on the reserve: small,
    /// and what a server needs to keep its users' state honest and to stop
    /// (read positions, last seen, logouts).
    pub fn is_essential(&self) -> bool {
        matches!(
            self,
            Op::Read { .. } | Op::LastSeen { .. } | Op::Revoke { .. } | Op::Stop
        )
    }

    /// Answers an op that will not be applied with `err`: a session's send
    /// gets an `error` frame; every other op's reply is dropped, which its
    /// caller ([`WriterHandle::call`]) reports as the storage's refusal.
    pub fn refuse(self, err: &ApiError) {
        if let Op::Send {
            origin,
            client_id,
            room,
            ..
        } = self
        {
            metrics::counter!("confab_messages_rejected_total", "reason" => err.code).increment(1);
            fail_origin(origin, err, &client_id, room);
        }
    }
}

/// Post-commit work for one op.
pub enum Effect {
    Sent {
        msg: Message,
        members: Arc<[UserId]>,
        origin: Origin,
        duplicate: bool,
        received: Instant,
    },
    Rejected {
        origin: Origin,
        err: ApiError,
        client_id: String,
        room: RoomId,
    },
    Read {
        room: RoomId,
        user: UserId,
        seq: u64,
        members: Arc<[UserId]>,
    },
    Done(Box<dyn FnOnce(&Hub) + Send>),
    None,
}

pub(super) struct Tables<'t> {
    pub(super) users: Table<'t, u64, &'static [u8]>,
    pub(super) usernames: Table<'t, &'static str, u64>,
    pub(super) contacts: Table<'t, (u64, u64), i64>,
    pub(super) rooms: Table<'t, u64, &'static [u8]>,
    pub(super) members: Table<'t, (u64, u64), &'static [u8]>,
    pub(super) user_rooms: Table<'t, (u64, u64), i64>,
    pub(super) messages: Table<'t, (u64, u64), &'static [u8]>,
    pub(super) client_ids: Table<'t, (u64, u64, &'static str), u64>,
    pub(super) revoked: Table<'t, &'static str, i64>,
    pub(super) last_seen: Table<'t, u64, i64>,
    pub(super) message_log: Table<'t, u64, (u64, u64)>,
    pub(super) meta: Table<'t, &'static str, u64>,
    pub(super) wallet_accounts: Table<'t, u64, u64>,
    pub(super) wallet_entries: Table<'t, (u64, u64), &'static [u8]>,
    pub(super) wallet_transfers: Table<'t, u64, &'static [u8]>,
    pub(super) wallet_keys: Table<'t, (u64, &'static str), u64>,
    pub(super) wallet_user_transfers: Table<'t, (u64, u64), ()>,
    pub(super) wallet_schedule: Table<'t, (i64, u64), ()>,
    pub(super) wallet_pending: Table<'t, (u64, u64), ()>,
    pub(super) privacy: Table<'t, u64, &'static [u8]>,
}

/// What the writer caches between batches. Only the writer changes the
/// tables these mirror, so the caches stay exact; a failed commit clears them.
#[derive(Default)]
pub(super) struct WriterState {
    /// Last assigned seq per room.
    pub(super) seqs: HashMap<RoomId, u64>,
    /// Members per room (sorted), shared with fan-out.
    pub(super) members: HashMap<RoomId, Arc<[UserId]>>,
    /// Last `message_log` position used (None: read it from the table).
    pub(super) log_pos: Option<u64>,
}

/// Bounds on the writer's caches (entries); past them a cache starts over
/// and refills from the store.
pub(super) const MEMBER_CACHE_MAX: usize = 200_000;
pub(super) const SEQ_CACHE_MAX: usize = 1_000_000;

pub struct GroupCommitWriter {
    pub(super) store: Store,
    /// Who hears of each committed batch, in order (`writes/publish.rs`).
    pub(super) subscribers: Vec<Box<dyn super::publish::Subscriber<Effect>>>,
    pub(super) max_group_members: usize,
    pub(super) state: WriterState,
    /// Senders' read positions, moved to their own newest message. Under
    /// load they are written at most once per READ_FLUSH_INTERVAL (a member
    /// page write per message would otherwise dominate the commit); when the
    /// queue runs dry they go into that batch. A crash can lose at most one
    /// interval of them: they only affect unread counts, never messages.
    pub(super) pending_reads: HashMap<(RoomId, UserId), u64>,
    pub(super) reads_flushed: Instant,
    pub(super) wallet: WalletWiring,
    /// The session send being applied, so that it is answered also when
    /// redb panics inside `apply` (the op is consumed by then).
    pub(super) in_flight: Option<(Arc<SessionOutbox>, String, RoomId)>,
}

pub(super) const READ_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
pub(super) const READ_PENDING_MAX: usize = 100_000;

impl GroupCommitWriter {
    pub(super) fn members(&mut self, t: &Tables, room: RoomId) -> Result<Arc<[UserId]>, ApiError> {
        if let Some(m) = self.state.members.get(&room) {
            return Ok(m.clone());
        }
        if self.state.members.len() >= MEMBER_CACHE_MAX {
            self.state.members.clear();
        }
        let list: Arc<[UserId]> = members_in(&t.members, room)?.into();
        self.state.members.insert(room, list.clone());
        Ok(list)
    }

    pub(super) fn check_member(
        &mut self,
        t: &Tables,
        room: RoomId,
        user: UserId,
    ) -> Result<Arc<[UserId]>, ApiError> {
        let members = self.members(t, room)?;
        if members.binary_search(&user).is_ok() {
            return Ok(members);
        }
        Err(ApiError::room_not_found())
    }

    pub(super) fn last_seq(&mut self, t: &Tables, room: RoomId) -> Result<u64, ApiError> {
        if let Some(&s) = self.state.seqs.get(&room) {
            return Ok(s);
        }
        let last = last_seq_in(&t.messages, room)?;
        if self.state.seqs.len() >= SEQ_CACHE_MAX {
            self.state.seqs.clear();
        }
        self.state.seqs.insert(room, last);
        Ok(last)
    }

    pub(super) fn next_log_pos(&mut self, t: &Tables) -> Result<u64, ApiError> {
        let last = match self.state.log_pos {
            Some(p) => p,
            None => t.message_log.last()?.map(|(k, _)| k.value()).unwrap_or(0),
        };
        self.state.log_pos = Some(last + 1);
        Ok(last + 1)
    }

    pub(super) fn next_seq(&mut self, t: &Tables, room: RoomId) -> Result<u64, ApiError> {
        let seq = self.last_seq(t, room)? + 1;
        self.state.seqs.insert(room, seq);
        Ok(seq)
    }

    /// The direct room of `a` and `b`, created (with both as members) if new.
    pub(super) fn ensure_direct(
        &mut self,
        t: &mut Tables,
        a: UserId,
        b: UserId,
    ) -> Result<(RoomId, bool), ApiError> {
        let room = RoomId::direct(a, b);
        let created = t.rooms.get(room.0)?.is_none();
        if created {
            let rec = RoomRecord {
                kind: RoomKind::Direct,
                name: None,
                owner: None,
                created_at: now_ms(),
            };
            t.rooms
                .insert(room.0, seal(Rec::Rooms, room.0, encode(&rec)).as_slice())?;
            self.add_member(t, room, a)?;
            self.add_member(t, room, b)?;
        }
        Ok((room, created))
    }
}

/// Answers the effects of a batch that was not committed with `e`: each
/// send gets its error; every other op's reply is dropped, which its caller
/// reports as the storage's refusal.
pub fn fail_effects(effects: Vec<Effect>, e: &ApiError) {
    for effect in effects {
        match effect {
            Effect::Sent { origin, msg, .. } => fail_origin(origin, e, &msg.client_id, msg.room),
            Effect::Rejected {
                origin,
                client_id,
                room,
                ..
            } => fail_origin(origin, e, &client_id, room),
            // Dropping a reply channel answers its caller with an error.
            _ => {}
        }
    }
}

pub fn fail_origin(origin: Origin, err: &ApiError, client_id: &str, room: RoomId) {
    match origin {
        Origin::Http(tx) => {
            let _ = tx.send(Err(err.clone()));
        }
        Origin::Session(s) => {
            s.push_bytes(frames::error(
                err.code,
                &err.message,
                Some(client_id),
                Some(room),
            ));
        }
    }
}

/// Tells every member's sessions about a room they are in (new or changed).
pub fn announce_room(hub: &Hub, room: &Room) {
    let frame = OutFrame {
        bytes: ServerFrame::Room { room }.to_bytes(),
        room_seq: None,
        pong: false,
    };
    for m in &room.members {
        hub.send_to_user(m.id, &frame, None);
    }
    // A new direct chat: each side learns whether the other is online now
    // (later changes arrive as they happen).
    if room.kind == "direct" {
        for a in &room.members {
            for b in room.members.iter().filter(|b| b.id != a.id) {
                if hub.is_online(b.id) {
                    let presence = OutFrame {
                        bytes: ServerFrame::Presence {
                            user: b.id,
                            online: true,
                            last_seen: None,
                        }
                        .to_bytes(),
                        room_seq: None,
                        pong: false,
                    };
                    hub.send_to_user(a.id, &presence, None);
                }
            }
        }
    }
}

/// Wallet operations for the writer.
pub enum WalletOp {
    /// Pay someone now, or schedule it (`execute_at` in the future or `repeat`).
    Transfer {
        from: UserId,
        req: TransferRequest,
        /// The transfer, and whether it was a replay of the same idempotency key.
        reply: Reply<(TransferView, bool)>,
    },
    /// Cancel a scheduled (or recurring) transfer of `by`.
    Cancel {
        by: UserId,
        id: u64,
        reply: Reply<TransferView>,
    },
    /// Run everything due at `now`; answers the next due time, if any.
    RunDue { now: i64, reply: Reply<Option<i64>> },
    /// Operator credit from the issuer; answers the new balance. With a
    /// `key` (a cluster's signup bonus), a second credit with the same key
    /// changes nothing.
    Credit {
        user: UserId,
        amount: u64,
        key: Option<String>,
        reply: Reply<u64>,
    },
}

/// The writer's wallet configuration plus the scheduler's wake-up.
#[derive(Clone, Default)]
pub struct WalletWiring {
    pub settings: crate::wallet::WalletSettings,
    pub wake: Arc<tokio::sync::Notify>,
}
