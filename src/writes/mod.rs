//! The writes of confab's domains — messages, rooms, contacts, accounts,
//! tokens, privacy, the wallet — as the [`Domain`] that
//! the group-commit [`Engine`] runs: the [`Op`]s callers queue, how each is
//! applied inside the engine's write transaction, and what happens once its
//! batch is durable (acks, answers, fan-out through the [`Hub`], receipts).
//!
//! Invariants kept here: a message is acked only after its commit; each
//! room's `seq` is assigned here, starting at 1, without gaps (a failed
//! commit discards the cached counters); a repeated `client_id` stores
//! nothing and answers the original message.

mod base;
mod chat;
mod deliver;
mod domain;
pub mod publish;
pub mod rules;
mod wallet;

pub use base::{
    Contact, Effect, GroupCommitWriter, Op, Origin, Reply, WalletOp, WalletWiring, WriterHandle,
    announce_room, fail_effects, fail_origin,
};
pub use chat::{
    announce_and_reply, answer_change, direct_opened, member_removed, reply_after_commit,
};
pub use deliver::Delivery;
pub use wallet::{Notices, announce_wallet};
