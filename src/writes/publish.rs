//! What a committed batch is published to: the writer's subscribers, in the
//! order they were given. The engine hands the domain a batch's effects
//! only after its durable commit; the domain hands them on as a
//! [`Committed`] to each [`Subscriber`] in turn — the search feed (its new
//! `message_log` position), and last the
//! delivery (acks, answers, fan-out, receipts, the live totals), which takes
//! the effects. Nothing here runs for a batch that was not committed.

use std::sync::Arc;

use crate::store::CommitFeed;

/// One committed batch, as its subscribers see it.
pub struct Committed<E> {
    /// The last `message_log` position the batch used (None: it logged
    /// no message, or the writer does not know it yet).
    pub log_pos: Option<u64>,
    /// What each applied op asks for; a subscriber that acts on them takes
    /// them (the delivery, last).
    pub effects: Vec<E>,
}

/// Hears of every committed batch.
/// (`E`: the domain's effects, `writes::Effect`.)
pub trait Subscriber<E>: Send {
    fn committed(&mut self, batch: &mut Committed<E>);
    /// One batch was tried (committed or not): `ops` operations in `secs`.
    fn measured(&mut self, _ops: usize, _secs: f64) {}
}

/// The search indexer's feed: the new committed position.
pub struct Indexing(pub Arc<CommitFeed>);

impl<E> Subscriber<E> for Indexing {
    fn committed(&mut self, batch: &mut Committed<E>) {
        if let Some(pos) = batch.log_pos {
            self.0.publish(pos);
        }
    }
}
