//! Where the [`Indexer`](super::Indexer) reads the message stream from: a
//! [`Source`]. The embedded store is one (its `CommitFeed` wakes the
//! indexer the moment a batch commits); a storage backend that other
//! processes also write (PostgreSQL, shared by the cluster's nodes) is
//! [`Polled`]: its head is asked of the database a few times a second, so
//! every node's index follows every node's messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ApiError;
use crate::frames::Message;
use crate::storage::Storage;
use crate::store::Store;

/// The message stream, as the indexer reads it.
pub trait Source: Send + Sync + 'static {
    /// The last committed position.
    fn committed(&self) -> u64;
    /// Up to `max` messages after position `after`, in stream order.
    fn log_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Message)>, ApiError>;
    /// Waits until the committed position passes `pos`, or `timeout`.
    fn wait_beyond(&self, pos: u64, timeout: Duration);
    /// Wakes a waiter without a new position (to stop, or to rebuild).
    fn nudge(&self);
}

impl Source for Store {
    fn committed(&self) -> u64 {
        self.feed.committed()
    }

    fn log_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Message)>, ApiError> {
        Store::log_after(self, after, max)
    }

    fn wait_beyond(&self, pos: u64, timeout: Duration) {
        self.feed.wait_beyond(pos, timeout)
    }

    fn nudge(&self) {
        self.feed.nudge()
    }
}

/// How often [`Polled`] asks the database for its head.
pub const POLL: Duration = Duration::from_millis(100);

/// A storage backend's message stream, read from the indexer's thread
/// through the server's runtime, its head polled every [`POLL`].
pub struct Polled {
    storage: Arc<dyn Storage>,
    runtime: tokio::runtime::Handle,
    /// The head last seen (at least what this process committed).
    head: AtomicU64,
}

impl Polled {
    pub fn new(storage: Arc<dyn Storage>, runtime: tokio::runtime::Handle) -> Polled {
        let head = AtomicU64::new(storage.committed());
        Polled {
            storage,
            runtime,
            head,
        }
    }

    /// Asks the database for its head (keeping the last one on an error:
    /// the indexer just reads nothing new until it answers again).
    fn poll(&self) -> u64 {
        if let Ok(h) = self.runtime.block_on(self.storage.head()) {
            self.head.fetch_max(h, Ordering::AcqRel);
        }
        self.committed()
    }
}

impl Source for Polled {
    fn committed(&self) -> u64 {
        self.head
            .load(Ordering::Acquire)
            .max(self.storage.committed())
    }

    fn log_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Message)>, ApiError> {
        self.runtime.block_on(self.storage.log_after(after, max))
    }

    fn wait_beyond(&self, pos: u64, timeout: Duration) {
        let until = std::time::Instant::now() + timeout;
        loop {
            if self.poll() > pos {
                return;
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(POLL));
        }
    }

    fn nudge(&self) {}
}
