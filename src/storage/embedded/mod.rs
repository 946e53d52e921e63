//! The embedded backend of [`Storage`]: the single node's redb store
//! (`store/`) read on the caller's thread (MVCC snapshots, so reads never
//! wait for the writer), and its group-commit writer (`writes/`) for every
//! operation. Nothing to install; what `confab serve` runs unless it is a
//! cluster node.

pub mod ledger;

pub use ledger::{ledger_check, verify, verify_in};

use super::{Pending, Storage, ready};
use crate::frames::{Message, Room, User};
use crate::ids::{RoomId, UserId};
use crate::store::db::StorageHealth;
use crate::store::{Privacy, Store, UserRecord};
use crate::wallet::{TransferIds, TransferView, Verification};
use crate::writes::{Op, WriterHandle};

/// The redb store and its writer, as a [`Storage`].
pub struct Embedded {
    store: Store,
    writer: WriterHandle,
}

impl Embedded {
    pub fn new(store: Store, writer: WriterHandle) -> Embedded {
        Embedded { store, writer }
    }
}

impl Storage for Embedded {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn submit(&self, op: Op) -> Pending<'_, ()> {
        Box::pin(self.writer.submit(op))
    }

    fn health(&self) -> &StorageHealth {
        &self.store.health
    }

    fn committed(&self) -> u64 {
        self.store.feed.committed()
    }

    fn head(&self) -> Pending<'_, u64> {
        // Only this process writes it.
        ready(Ok(self.store.feed.committed()))
    }

    fn damaged_records(&self) -> u64 {
        self.store.db.damage().count()
    }

    fn transfer_ids(&self) -> &TransferIds {
        &self.store.transfer_ids
    }

    fn has_no_users(&self) -> Pending<'_, bool> {
        ready(self.store.has_no_users())
    }

    fn user(&self, id: UserId) -> Pending<'_, Option<User>> {
        ready(self.store.user(id))
    }

    fn user_by_name<'a>(&'a self, username: &'a str) -> Pending<'a, Option<(UserId, UserRecord)>> {
        ready(self.store.user_by_name(username))
    }

    fn search_users<'a>(&'a self, prefix: &'a str, limit: usize) -> Pending<'a, Vec<User>> {
        ready(self.store.search_users(prefix, limit))
    }

    fn contacts(&self, owner: UserId) -> Pending<'_, Vec<User>> {
        ready(self.store.contacts(owner))
    }

    fn privacy(&self, user: UserId) -> Pending<'_, Privacy> {
        ready(self.store.privacy(user))
    }

    fn last_seen(&self, user: UserId) -> Pending<'_, Option<i64>> {
        ready(self.store.last_seen(user))
    }

    fn presence_audience<'a>(
        &'a self,
        owner: UserId,
        viewers: &'a [UserId],
    ) -> Pending<'a, Vec<UserId>> {
        ready(self.store.presence_audience(owner, viewers))
    }

    fn presences_seen_by<'a>(
        &'a self,
        viewer: UserId,
        owners: &'a [UserId],
    ) -> Pending<'a, Vec<UserId>> {
        ready(self.store.presences_seen_by(viewer, owners))
    }

    fn revoked_tokens(&self, now_secs: i64) -> Pending<'_, Vec<(String, i64)>> {
        ready(self.store.revoked_tokens(now_secs))
    }

    fn room_for(&self, room: RoomId, user: UserId) -> Pending<'_, Room> {
        ready(self.store.room_for(room, user))
    }

    fn rooms_of(&self, user: UserId) -> Pending<'_, Vec<serde_json::Value>> {
        ready(self.store.rooms_of(user))
    }

    fn room_ids_of(&self, user: UserId) -> Pending<'_, Vec<RoomId>> {
        ready(self.store.room_ids_of(user))
    }

    fn room_heads(&self, user: UserId) -> Pending<'_, Vec<(RoomId, u64)>> {
        ready(self.store.room_heads(user))
    }

    fn check_member(&self, room: RoomId, user: UserId) -> Pending<'_, ()> {
        ready(self.store.check_member(room, user))
    }

    fn members(&self, room: RoomId) -> Pending<'_, Vec<UserId>> {
        ready(self.store.members(room))
    }

    fn direct_peers(&self, user: UserId) -> Pending<'_, Vec<UserId>> {
        ready(self.store.direct_peers(user))
    }

    fn history(
        &self,
        room: RoomId,
        user: UserId,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Pending<'_, Vec<Message>> {
        ready(self.store.history(room, user, after, before, limit))
    }

    fn log_after(&self, after: u64, max: usize) -> Pending<'_, Vec<(u64, Message)>> {
        ready(self.store.log_after(after, max))
    }

    fn messages_at<'a>(&'a self, keys: &'a [(RoomId, u64)]) -> Pending<'a, Vec<Message>> {
        ready(self.store.messages_at(keys))
    }

    fn balance(&self, user: UserId) -> Pending<'_, u64> {
        ready(ledger::balance(&self.store, user))
    }

    fn transactions<'a>(
        &'a self,
        user: UserId,
        before: Option<u64>,
        limit: usize,
        currency: &'a str,
    ) -> Pending<'a, (Vec<TransferView>, Option<String>)> {
        ready(ledger::transactions(
            &self.store,
            user,
            before,
            limit,
            currency,
        ))
    }

    fn transfer<'a>(
        &'a self,
        id: u64,
        viewer: UserId,
        currency: &'a str,
    ) -> Pending<'a, Option<TransferView>> {
        ready(ledger::transfer(&self.store, id, viewer, currency))
    }

    fn verify_ledger(&self) -> Pending<'_, Verification> {
        ready(ledger::verify(&self.store))
    }

    fn export(
        &self,
        scope: crate::export::Scope,
        slot: crate::export::Slot,
    ) -> Pending<'_, tokio::sync::mpsc::Receiver<bytes::Bytes>> {
        let store = &self.store;
        ready(
            store
                .db
                .begin_read()
                .map_err(crate::error::ApiError::from)
                .and_then(|txn| crate::export::check(&txn, &scope))
                .and_then(|()| {
                    crate::export::spawn(store.db.clone(), scope, store.transfer_ids.clone(), slot)
                }),
        )
    }
}
