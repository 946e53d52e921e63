//! The writer as the engine's [`Domain`]: starting it (`spawn`,
//! `spawn_with`), applying a batch inside one write transaction, and what
//! the engine tells it (committed, failed, recovered, measured).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::base::*;
use super::chat::bump_read;
use super::deliver::Delivery;
use super::publish::{Committed, Indexing, Subscriber};
use crate::config::StoreConfig;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::store::engine::{Domain, Engine};
use crate::store::*;
use crate::telemetry::LiveStats;

impl GroupCommitWriter {
    /// Starts the writer thread; it stops after [`Op::Stop`] or when every
    /// handle is dropped, committing what it holds first.
    pub fn spawn(
        store: Store,
        hub: Arc<Hub>,
        config: StoreConfig,
        max_group_members: usize,
    ) -> std::io::Result<(WriterHandle, std::thread::JoinHandle<()>)> {
        Self::spawn_with(
            store,
            hub,
            Default::default(),
            config,
            max_group_members,
            WalletWiring::default(),
        )
    }

    /// [`GroupCommitWriter::spawn`] with the server's live totals, the
    /// wallet's settings and scheduler wake-up.
    pub fn spawn_with(
        store: Store,
        hub: Arc<Hub>,
        live: Arc<LiveStats>,
        config: StoreConfig,
        max_group_members: usize,
        wallet: WalletWiring,
    ) -> std::io::Result<(WriterHandle, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(config.writer_queue);
        let health = store.health.clone();
        let db = store.db.clone();
        // After each commit, in this order: the search feed, then acks and
        // fan-out.
        let subscribers: Vec<Box<dyn Subscriber<Effect>>> = vec![
            Box::new(Indexing(store.feed.clone())),
            Box::new(Delivery { hub, live }),
        ];
        let writer = GroupCommitWriter {
            store,
            subscribers,
            max_group_members,
            state: WriterState::default(),
            pending_reads: HashMap::new(),
            reads_flushed: Instant::now(),
            wallet,
            in_flight: None,
        };
        let join = Engine::spawn(db, health.clone(), config, writer, rx)?;
        Ok((WriterHandle { tx, health }, join))
    }

    /// [`Domain::apply`]: the batch's ops in turn on the transaction's
    /// tables, then (with `flush_reads`) the senders' deferred read positions.
    fn apply_all(
        &mut self,
        txn: &redb::WriteTransaction,
        batch: &mut Vec<Op>,
        effects: &mut Vec<Effect>,
        flush_reads: bool,
    ) -> Result<(), ApiError> {
        {
            let mut t = Tables {
                users: txn.open_table(USERS)?,
                usernames: txn.open_table(USERNAMES)?,
                contacts: txn.open_table(CONTACTS)?,
                rooms: txn.open_table(ROOMS)?,
                members: txn.open_table(MEMBERS)?,
                user_rooms: txn.open_table(USER_ROOMS)?,
                messages: txn.open_table(MESSAGES)?,
                client_ids: txn.open_table(CLIENT_IDS)?,
                revoked: txn.open_table(REVOKED)?,
                last_seen: txn.open_table(LAST_SEEN)?,
                message_log: txn.open_table(MESSAGE_LOG)?,
                meta: txn.open_table(META)?,
                wallet_accounts: txn.open_table(WALLET_ACCOUNTS)?,
                wallet_entries: txn.open_table(WALLET_ENTRIES)?,
                wallet_transfers: txn.open_table(WALLET_TRANSFERS)?,
                wallet_keys: txn.open_table(WALLET_KEYS)?,
                wallet_user_transfers: txn.open_table(WALLET_USER_TRANSFERS)?,
                wallet_schedule: txn.open_table(WALLET_SCHEDULE)?,
                wallet_pending: txn.open_table(WALLET_PENDING)?,
                privacy: txn.open_table(PRIVACY)?,
            };
            let mut ops = std::mem::take(batch).into_iter();
            for op in ops.by_ref() {
                // A session's send whose own write fails must still be
                // answered (the op is consumed by `apply`).
                // (Kept outside too, so that it is answered also when redb
                // panics inside `apply`.)
                self.in_flight = match &op {
                    Op::Send {
                        origin: Origin::Session(s),
                        client_id,
                        room,
                        ..
                    } => Some((s.clone(), client_id.clone(), *room)),
                    _ => None,
                };
                match self.apply(op, &mut t) {
                    Ok(effect) => {
                        self.in_flight = None;
                        effects.push(effect)
                    }
                    Err(e) => {
                        if let Some((s, client_id, room)) = self.in_flight.take() {
                            effects.push(Effect::Rejected {
                                origin: Origin::Session(s),
                                err: e.clone(),
                                client_id,
                                room,
                            });
                        }
                        // The rest of the batch is answered by the caller.
                        batch.extend(ops);
                        return Err(e);
                    }
                }
            }
            if flush_reads {
                for ((room, user), seq) in std::mem::take(&mut self.pending_reads) {
                    bump_read(&mut t.members, room, user, seq)?;
                }
                self.reads_flushed = Instant::now();
            }
        }
        Ok(())
    }
}

impl Domain for GroupCommitWriter {
    type Op = Op;
    type Effect = Effect;

    fn is_stop(op: &Op) -> bool {
        matches!(op, Op::Stop)
    }

    fn is_essential(op: &Op) -> bool {
        op.is_essential()
    }

    fn refuse(&mut self, op: Op, err: &ApiError) {
        op.refuse(err);
    }

    fn flush_due(&self) -> bool {
        self.reads_flushed.elapsed() >= READ_FLUSH_INTERVAL
            || self.pending_reads.len() >= READ_PENDING_MAX
    }

    fn apply(
        &mut self,
        txn: &redb::WriteTransaction,
        batch: &mut Vec<Op>,
        effects: &mut Vec<Effect>,
        flush: bool,
    ) -> Result<(), ApiError> {
        self.apply_all(txn, batch, effects, flush)
    }

    fn committed(&mut self, effects: Vec<Effect>) {
        let mut batch = Committed {
            log_pos: self.state.log_pos,
            effects,
        };
        for s in &mut self.subscribers {
            s.committed(&mut batch);
        }
    }

    fn failed(&mut self, mut effects: Vec<Effect>, e: &ApiError) {
        if let Some((s, client_id, room)) = self.in_flight.take() {
            // The op being applied when redb panicked.
            effects.push(Effect::Rejected {
                origin: Origin::Session(s),
                err: e.clone(),
                client_id,
                room,
            });
        }
        // The caches may hold what the batch did; a sender's own read
        // positions of this batch are lost (they are advisory).
        self.state = WriterState::default();
        fail_effects(effects, e);
    }

    fn recovered(&mut self) {
        self.state = WriterState::default();
    }

    fn measured(&mut self, ops: usize, secs: f64) {
        for s in &mut self.subscribers {
            s.measured(ops, secs);
        }
    }
}
