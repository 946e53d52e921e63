//! The storage interface: everything the surfaces (HTTP, WebSocket) and the
//! services above them need from a durable store, and nothing of how one
//! keeps it. [`Storage`] is that interface; [`embedded`] implements it on
//! the redb engine (`store/`) and the group-commit writer (`writes/`), the
//! single node's backend. A new backend (PostgreSQL for the cluster) is a
//! sibling of `embedded/` implementing the same trait, and passes the same
//! contract (`tests/store_contract.rs`, run against every backend).
//!
//! The contract every backend keeps:
//! - **Writes are operations** ([`Op`], defined with the domains in
//!   `writes/`). [`Storage::submit`] queues one; its answer (its reply
//!   channel, or a WebSocket session's `ack`) comes only after the backend
//!   reports the batch holding it committed, and an answer that will not
//!   come (its reply dropped) means it was not committed. A backend may
//!   batch as it likes.
//! - **Read your writes**: once an operation is answered, every read below
//!   sees it.
//! - **Seqs** are gap-free per room, 1, 2, 3, … in commit order, and a
//!   send repeated with its `client_id` is answered with the first one's
//!   message (`duplicate`), never stored twice.
//! - **The ledger** keeps its invariants ([`Storage::verify_ledger`]
//!   finds no breach), also under concurrent transfers.
//! - **A newer schema** than the binary knows is refused at open, naming
//!   both versions; nothing is changed.
//!
//! Reads are asynchronous so that a networked backend can await its
//! database; the embedded one answers at once.

pub mod embedded;
pub mod postgres;

use std::future::Future;
use std::pin::Pin;

use crate::error::ApiError;
use crate::frames::{Message, Room, User};
use crate::ids::{RoomId, UserId};
use crate::store::db::StorageHealth;
use crate::store::{Privacy, UserRecord};
use crate::wallet::{TransferIds, TransferView, Verification};
use crate::writes::{Op, Reply};

/// An answer the storage gives later.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// What the domains' operations and the surfaces' reads need from a durable
/// store (see the module docs for the contract).
pub trait Storage: Send + Sync + 'static {
    /// Which backend this is: `"embedded"` or `"postgres"` (`/status`).
    fn backend(&self) -> &'static str;
    /// Figures of a database server behind the storage, for `/status`
    /// (None: there is none).
    fn database(&self) -> Option<serde_json::Value> {
        None
    }

    // --- writes ---------------------------------------------------------

    /// Queues `op` (waiting while the backend's queue is full). Its answer
    /// comes after its commit (see the module docs).
    fn submit(&self, op: Op) -> Pending<'_, ()>;
    /// Whether the storage takes writes (full, failing), for `/status` and
    /// for saying why an operation went unanswered.
    fn health(&self) -> &StorageHealth;
    /// The last committed position of the message stream (every stored
    /// message has one, in commit order); the search indexer follows it.
    fn committed(&self) -> u64;
    /// The last committed position of the whole store's message stream,
    /// whoever wrote it (other nodes too, on a shared database).
    fn head(&self) -> Pending<'_, u64>;
    /// Stored records found damaged since the start.
    fn damaged_records(&self) -> u64;
    /// How transfer ids are shown to clients and parsed from them.
    fn transfer_ids(&self) -> &TransferIds;

    // --- accounts -------------------------------------------------------

    fn has_no_users(&self) -> Pending<'_, bool>;
    fn user(&self, id: UserId) -> Pending<'_, Option<User>>;
    /// By username, case-insensitively, with the stored record (the
    /// password hash included: login checks it).
    fn user_by_name<'a>(&'a self, username: &'a str) -> Pending<'a, Option<(UserId, UserRecord)>>;
    /// Users whose username starts with `prefix`, at most `limit`.
    fn search_users<'a>(&'a self, prefix: &'a str, limit: usize) -> Pending<'a, Vec<User>>;
    fn contacts(&self, owner: UserId) -> Pending<'_, Vec<User>>;
    fn privacy(&self, user: UserId) -> Pending<'_, Privacy>;
    fn last_seen(&self, user: UserId) -> Pending<'_, Option<i64>>;
    /// Those of `viewers` who may see `owner`'s presence.
    fn presence_audience<'a>(
        &'a self,
        owner: UserId,
        viewers: &'a [UserId],
    ) -> Pending<'a, Vec<UserId>>;
    /// Those of `owners` whose presence `viewer` may see.
    fn presences_seen_by<'a>(
        &'a self,
        viewer: UserId,
        owners: &'a [UserId],
    ) -> Pending<'a, Vec<UserId>>;
    /// Revoked token ids (`jti`) with their expiry, those not yet expired
    /// at `now_secs`.
    fn revoked_tokens(&self, now_secs: i64) -> Pending<'_, Vec<(String, i64)>>;

    // --- rooms and messages ---------------------------------------------

    /// The room, if `user` is a member (else `room_not_found`).
    fn room_for(&self, room: RoomId, user: UserId) -> Pending<'_, Room>;
    /// `user`'s rooms as the room list shows them (last message, unread).
    fn rooms_of(&self, user: UserId) -> Pending<'_, Vec<serde_json::Value>>;
    fn room_ids_of(&self, user: UserId) -> Pending<'_, Vec<RoomId>>;
    /// `user`'s rooms with their last seq.
    fn room_heads(&self, user: UserId) -> Pending<'_, Vec<(RoomId, u64)>>;
    /// `room_not_found` unless `user` is a member of `room`.
    fn check_member(&self, room: RoomId, user: UserId) -> Pending<'_, ()>;
    fn members(&self, room: RoomId) -> Pending<'_, Vec<UserId>>;
    /// The other members of `user`'s direct rooms.
    fn direct_peers(&self, user: UserId) -> Pending<'_, Vec<UserId>>;
    /// Messages of a room for a member: `after` → the first `limit` with a
    /// greater seq; `before` → the last `limit` with a smaller seq; neither
    /// → the latest `limit`. Always ascending.
    fn history(
        &self,
        room: RoomId,
        user: UserId,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Pending<'_, Vec<Message>>;
    /// Up to `max` messages after stream position `after`, in stream order.
    fn log_after(&self, after: u64, max: usize) -> Pending<'_, Vec<(u64, Message)>>;
    /// The stored messages at these keys (missing ones are skipped).
    fn messages_at<'a>(&'a self, keys: &'a [(RoomId, u64)]) -> Pending<'a, Vec<Message>>;

    // --- wallet ---------------------------------------------------------

    fn balance(&self, user: UserId) -> Pending<'_, u64>;
    /// A page of `user`'s transfers, newest first, below the stored id
    /// `before`; with the cursor for the next page.
    fn transactions<'a>(
        &'a self,
        user: UserId,
        before: Option<u64>,
        limit: usize,
        currency: &'a str,
    ) -> Pending<'a, (Vec<TransferView>, Option<String>)>;
    /// One transfer as `viewer` sees it (None when missing or not theirs).
    fn transfer<'a>(
        &'a self,
        id: u64,
        viewer: UserId,
        currency: &'a str,
    ) -> Pending<'a, Option<TransferView>>;
    /// The ledger's invariants, checked in one consistent snapshot.
    fn verify_ledger(&self) -> Pending<'_, Verification>;

    // --- exports --------------------------------------------------------

    /// Starts the export of `scope` (`crate::export`: JSON Lines, written
    /// from one consistent snapshot while the server keeps writing) and
    /// answers the receiver of its chunks; `user_not_found` /
    /// `room_not_found` before anything is sent. `slot` is held until the
    /// export ends.
    fn export(
        &self,
        scope: crate::export::Scope,
        slot: crate::export::Slot,
    ) -> Pending<'_, tokio::sync::mpsc::Receiver<bytes::Bytes>>;
}

impl dyn Storage {
    /// Queues an op built around a reply channel and waits for its answer,
    /// which comes after the op's commit. An op the backend could not apply
    /// is answered by dropping its reply: then the storage's state says why.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(make(tx)).await?;
        rx.await.map_err(|_| {
            self.health()
                .refusal_or_failure()
                .unwrap_or_else(|| ApiError::internal("the write was not committed"))
        })?
    }
}

/// An answer that is ready now (for backends that read synchronously).
pub fn ready<'a, T: Send + 'a>(r: Result<T, ApiError>) -> Pending<'a, T> {
    Box::pin(std::future::ready(r))
}
