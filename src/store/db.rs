//! The open redb database, which can be reopened, and the storage's health.
//!
//! redb latches an I/O error: after one failed write (a full disk, EIO)
//! every later operation on that `Database` answers `PreviousIo`, even once
//! the cause is gone. So the store holds its database in a [`Db`] that the
//! writer can close and open again, while readers keep using whatever is
//! open through the same handle. [`StorageHealth`] is what the writer knows
//! about the storage — fine, full, or failing — for the answers to writes,
//! the readiness endpoint, `/status` and `/metrics`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};

use super::seal::DamageLog;
use crate::error::ApiError;
pub use crate::error::{is_disk_full, storage_error, storage_full};

/// The store's database, reopenable, and the damage found in it.
pub struct Db {
    current: RwLock<Option<Database>>,
    path: PathBuf,
    cache_bytes: usize,
    /// The damaged records this process has met in the store, each
    /// reported once (see [`super::seal::report`]).
    damage: Arc<DamageLog>,
}

impl Db {
    pub(crate) fn new(db: Database, path: &Path, cache_bytes: usize, damage: Arc<DamageLog>) -> Db {
        Db {
            current: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            cache_bytes,
            damage,
        }
    }

    /// The damage found in this store. Every read of it runs in
    /// `damage().scope(…)` (the store's guard, the writer thread, a backup,
    /// an export, the scrub), so that damage is reported once.
    pub fn damage(&self) -> &Arc<DamageLog> {
        &self.damage
    }

    fn closed() -> redb::TransactionError {
        redb::TransactionError::Storage(redb::StorageError::DatabaseClosed)
    }

    /// A snapshot of what is committed now.
    pub fn begin_read(&self) -> Result<ReadTransaction, redb::TransactionError> {
        match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Some(db) => db.begin_read(),
            None => Err(Db::closed()),
        }
    }

    /// The one write transaction (only the writer, and start-up, write).
    pub fn begin_write(&self) -> Result<WriteTransaction, redb::TransactionError> {
        match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            Some(db) => db.begin_write(),
            None => Err(Db::closed()),
        }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the database and opens the file again, clearing redb's latched
    /// I/O error. Read transactions still open on the old one fail with
    /// "database closed" from then on; new ones see the reopened file. Only
    /// the writer calls this, between write transactions.
    pub fn reopen(&self) -> Result<(), String> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = current.take()
            && let Err(e) = old.close()
        {
            tracing::warn!(error = %e, "closing the database before reopening it");
        }
        let db = Database::builder()
            .set_cache_size(self.cache_bytes)
            .create(&self.path)
            .map_err(|e| format!("cannot reopen {}: {e}", self.path.display()))?;
        *current = Some(db);
        Ok(())
    }
}

/// What the storage can do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StorageState {
    Ok = 0,
    /// The disk is full: only the small writes the reserve is kept for
    /// (read positions, last seen, logouts, outbox confirmations) are made.
    Full = 1,
    /// Writes fail for another reason (an I/O error); the writer reopens the
    /// database and retries with back-off.
    Failing = 2,
}

impl StorageState {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageState::Ok => "ok",
            StorageState::Full => "full",
            StorageState::Failing => "failing",
        }
    }
}

/// The storage's health, written by the writer, read by everyone.
#[derive(Default)]
pub struct StorageHealth {
    state: AtomicU8,
    /// Unix ms since the current state began.
    since_ms: AtomicI64,
    /// The last error, for people.
    detail: Mutex<String>,
    /// What the writer answered its last failed batch with: the answer to
    /// an op of that batch whose reply it dropped (see
    /// [`StorageHealth::refusal_or_failure`]).
    last_failure: Mutex<Option<ApiError>>,
}

impl StorageHealth {
    pub fn state(&self) -> StorageState {
        match self.state.load(Ordering::Acquire) {
            1 => StorageState::Full,
            2 => StorageState::Failing,
            _ => StorageState::Ok,
        }
    }

    /// Moves to `state` (logging the change) with `detail` for people.
    pub fn set(&self, state: StorageState, detail: &str) {
        let before = self.state.swap(state as u8, Ordering::AcqRel);
        if before != state as u8 {
            self.since_ms.store(now_ms(), Ordering::Release);
            match state {
                StorageState::Ok => tracing::info!("storage recovered: writes are accepted again"),
                StorageState::Full => {
                    tracing::error!(detail, "storage full: refusing writes until space is freed")
                }
                StorageState::Failing => {
                    tracing::error!(detail, "storage failing: refusing writes while retrying")
                }
            }
        }
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = detail.to_string();
        metrics::gauge!("confab_storage_state").set(f64::from(state as u8));
    }

    /// Since when (Unix ms) the storage is in its current state.
    pub fn since_ms(&self) -> i64 {
        self.since_ms.load(Ordering::Acquire)
    }

    pub fn detail(&self) -> String {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records what the writer's failed batch was answered with.
    pub fn batch_failed(&self, err: &ApiError) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.clone());
    }

    /// Why the writer dropped an op's reply: the current state's refusal,
    /// else what its last failed batch was answered with (a damaged page).
    pub fn refusal_or_failure(&self) -> Option<ApiError> {
        self.refusal().or_else(|| {
            self.last_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// The answer to a write refused in the current state (None when Ok).
    pub fn refusal(&self) -> Option<ApiError> {
        match self.state() {
            StorageState::Ok => None,
            StorageState::Full => Some(storage_full()),
            StorageState::Failing => Some(storage_error()),
        }
    }
}

/// Whether `e` is a storage failure (I/O, or redb refusing after one)
/// rather than a bug or bad data.
pub fn is_storage_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        if let Some(s) = err.downcast_ref::<redb::StorageError>()
            && matches!(
                s,
                redb::StorageError::Io(_)
                    | redb::StorageError::PreviousIo
                    | redb::StorageError::DatabaseClosed
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Now, in Unix milliseconds (the store's clock: `store::now_ms`).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
