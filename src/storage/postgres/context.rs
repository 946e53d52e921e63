//! What the writer's operations work with: the options a store is opened
//! with, what the writer shares with the readers ([`Shared`]), the ops'
//! settings ([`Ctx`]) and what the batch being applied has done so far
//! ([`BatchState`]). Below every module that applies ops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::config::StoreConfig;
use crate::hub::Hub;
use crate::ids::{RoomId, UserId};
use crate::store::db::StorageHealth;
use crate::telemetry::LiveStats;
use crate::wallet::TransferIds;
use crate::writes::WalletWiring;

/// What opening a PostgreSQL store needs.
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq-style connection string (`host=… port=… user=… dbname=…`;
    /// several hosts with `target_session_attrs=read-write` for failover).
    pub url: String,
    pub hub: Arc<Hub>,
    pub live: Arc<LiveStats>,
    /// The writer's queue and batch bounds.
    pub store: StoreConfig,
    pub max_group_members: usize,
    pub wallet: WalletWiring,
    /// How transfer ids are shown (the server's key and currency).
    pub transfer_ids: TransferIds,
    /// Connections for reads.
    pub pool_size: usize,
}

/// What the writer and the readers share.
pub struct Shared {
    pub health: Arc<StorageHealth>,
    /// The last message-stream position this node saw committed.
    pub committed: AtomicU64,
    pub ids: TransferIds,
    /// The database server this node writes to and its standbys, as last
    /// sampled ([`super::Postgres::watch_replication`]); None before the
    /// first sample or while it cannot be asked.
    pub replication: std::sync::Mutex<Option<serde_json::Value>>,
}

/// What every op of the writer may consult.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub max_group_members: usize,
    pub wallet: WalletWiring,
}

/// What the batch being applied has done so far.
#[derive(Default)]
pub struct BatchState {
    /// The last message-stream position it took.
    pub last_pos: Option<u64>,
    /// Senders' read positions, moved to their own newest message.
    pub reads: HashMap<(RoomId, UserId), u64>,
    /// Read positions members reported (`Op::Read`), the highest per
    /// member and room: applied together at the end of the batch.
    pub read_ops: HashMap<(RoomId, UserId), u64>,
}

/// Why a PostgreSQL store did not open.
#[derive(Debug)]
pub enum OpenError {
    /// The database did not answer (down, failing over, not reachable):
    /// worth trying again.
    Unreachable(String),
    /// It answered no, or cannot be used as configured (wrong credentials,
    /// no such database, a newer schema, a bad connection string): trying
    /// again changes nothing.
    Refused(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Unreachable(why) | OpenError::Refused(why) => f.write_str(why),
        }
    }
}

impl From<OpenError> for String {
    fn from(e: OpenError) -> String {
        e.to_string()
    }
}
