//! Read positions (`read` frames), merged before they reach the writer.
//!
//! A `read` only ever moves a user's read position in a room forward, so of
//! many reads of one user in one room only the highest matters. Sessions
//! hand theirs to the [`ReadMerger`], which keeps the highest pending seq per
//! (user, room) and passes them to the writer at most every
//! [`FLUSH_EVERY`]: a flood of `read` frames costs its sender a map update
//! each and everyone else nothing, instead of one writer operation (and
//! receipt fan-out) each. A quiet user's read still goes out at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::ids::{RoomId, UserId};
use crate::storage::Storage;
use crate::writes::Op;

/// The writer sees a user's reads at most this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct ReadMerger {
    pending: Mutex<HashMap<(UserId, RoomId), u64>>,
    wake: Notify,
}

impl ReadMerger {
    /// Records that `user` has read `room` up to `seq`.
    pub fn add(&self, user: UserId, room: RoomId, seq: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let e = pending.entry((user, room)).or_insert(0);
        if seq > *e {
            *e = seq;
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// Passes the pending reads to the writer until `shutdown`, then once
    /// more.
    pub async fn run(
        self: Arc<Self>,
        storage: Arc<dyn Storage>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let stop = tokio::select! {
                _ = self.wake.notified() => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if stop {
                self.flush(&*storage).await;
                return;
            }
            self.flush(&*storage).await;
            tokio::time::sleep(FLUSH_EVERY).await;
        }
    }

    async fn flush(&self, storage: &dyn Storage) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for ((user, room), seq) in batch {
            // The writer checks membership and ignores reads that do not
            // move a position forward.
            if storage.submit(Op::Read { room, user, seq }).await.is_err() {
                return;
            }
        }
    }
}
