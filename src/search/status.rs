//! `IndexStatus`: the progress and health of the index (indexed position,
//! rebuilds, failures, damage waiting for a rebuild, the last scrub),
//! shared by the indexer, the scrub, the API, the status page and metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::store::now_ms;

/// Progress and health of the index, shared by the indexer, the scrub, the
/// API, the status page and metrics.
#[derive(Default)]
pub struct IndexStatus {
    /// Last `message_log` position searchable: committed to tantivy (its
    /// payload says so) and reloaded. Never ahead of what the index holds.
    pub indexed: AtomicU64,
    /// When the index last had everything committed in the store (ms).
    pub caught_up_at: AtomicI64,
    pub stop: AtomicBool,
    /// While `indexed` is below this, the index is being rebuilt from the
    /// store (0: no rebuild running).
    pub(super) rebuild_until: AtomicU64,
    /// Whether searches are refused during the running rebuild: after
    /// damage, yes — the damaged index answered wrongly, and the new one is
    /// missing most messages until it catches up while its answers look
    /// complete. A rebuild for another reason (no index after a restore or
    /// an upgrade, another format) answers from what is indexed so far, as
    /// the lag after a restart does.
    pub(super) refuse_during_rebuild: AtomicBool,
    /// Failed indexer steps since start (every stage).
    pub(super) failures: AtomicU64,
    /// Rebuilds since start.
    pub(super) rebuilds: AtomicU64,
    /// Checks (on open, scrubs, the document count after a commit) that
    /// found the index damaged.
    pub(super) damage_found: AtomicU64,
    pub(super) detail: Mutex<Detail>,
}

/// The parts of [`IndexStatus`] that are more than a number.
#[derive(Default)]
pub(super) struct Detail {
    /// The failure streak in progress (None: the last step worked).
    pub(super) failing: Option<Failing>,
    /// Damage found by the scrub, for the indexer to act on.
    pub(super) damage: Option<String>,
    /// Why the index was last rebuilt, and when that began.
    pub(super) rebuild: Option<(String, i64, Instant)>,
    pub(super) last_scrub: Option<ScrubReport>,
}

/// What the status page says while the indexer fails.
#[derive(Clone, Serialize)]
pub(super) struct Failing {
    pub(super) stage: &'static str,
    pub(super) message: String,
    /// When the streak began (ms).
    pub(super) since: i64,
    pub(super) attempts: u64,
    pub(super) retry_in_ms: u64,
}

/// The outcome of the last checksum scrub.
#[derive(Clone, Serialize)]
pub(super) struct ScrubReport {
    /// When it ended (ms).
    pub(super) at: i64,
    /// `ok`, `damaged` or `error` (the files could not be read: not damage).
    pub(super) outcome: &'static str,
    pub(super) files: usize,
    pub(super) bytes: u64,
    pub(super) ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) detail: Option<String>,
}

impl IndexStatus {
    /// How far the index is behind a store committed up to `committed`:
    /// messages, and seconds since it last had everything.
    pub fn lag(&self, committed: u64) -> (u64, f64) {
        let lag = committed.saturating_sub(self.indexed.load(Ordering::Acquire));
        let secs = if lag == 0 {
            0.0
        } else {
            (now_ms() - self.caught_up_at.load(Ordering::Acquire)).max(0) as f64 / 1000.0
        };
        (lag, secs)
    }

    pub(super) fn detail(&self) -> std::sync::MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(indexed, target)` while a rebuild runs.
    pub(super) fn rebuilding(&self) -> Option<(u64, u64)> {
        let until = self.rebuild_until.load(Ordering::Acquire);
        let done = self.indexed.load(Ordering::Acquire);
        (until > 0 && done < until).then_some((done, until))
    }

    /// Neither failing nor damaged nor rebuilding.
    pub fn healthy(&self) -> bool {
        let d = self.detail();
        d.failing.is_none() && d.damage.is_none() && self.rebuilding().is_none()
    }

    /// The index is being rebuilt from a store committed up to `store_pos`.
    pub(super) fn begin_rebuild(&self, why: &str, store_pos: u64, refuse_searches: bool) {
        self.refuse_during_rebuild
            .store(refuse_searches, Ordering::Release);
        self.indexed.store(0, Ordering::Release);
        self.rebuild_until.store(store_pos, Ordering::Release);
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_rebuilds_total").increment(1);
        self.detail().rebuild = Some((why.to_string(), now_ms(), Instant::now()));
    }

    /// Called after each commit: ends a rebuild that has caught up.
    pub(super) fn check_rebuild_done(&self) {
        let until = self.rebuild_until.load(Ordering::Acquire);
        if until > 0 && self.indexed.load(Ordering::Acquire) >= until {
            self.rebuild_until.store(0, Ordering::Release);
            self.refuse_during_rebuild.store(false, Ordering::Release);
            if let Some((why, _, started)) = &self.detail().rebuild {
                tracing::info!(
                    messages = until,
                    secs = started.elapsed().as_secs_f64(),
                    reason = %why,
                    "search index rebuilt from the store; searches answered again"
                );
            }
        }
    }

    /// Damage found (by a check or the scrub): counted, logged, and left
    /// for the indexer, which rebuilds the index from the store.
    /// Searches are refused from here on (see [`SearchIndex::search`]).
    pub(super) fn report_damage(&self, what: String) {
        tracing::error!(damage = %what, "search index damaged; rebuilding it from the store");
        self.detail().damage = Some(what);
        self.damage_found.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_damage_total").increment(1);
    }

    /// The damage waiting for a rebuild, if any (left in place: searches
    /// stay refused until the rebuild has begun).
    pub(super) fn pending_damage(&self) -> Option<String> {
        self.detail().damage.clone()
    }

    pub(super) fn damage_pending(&self) -> bool {
        self.detail().damage.is_some()
    }

    /// One failed step: counted, logged (once per back-off step, as the
    /// indexer waits `retry_in` before the next), shown on the status page.
    pub(super) fn failed(&self, stage: &'static str, error: &str, retry_in: Duration) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_search_index_failures_total", "stage" => stage).increment(1);
        metrics::gauge!("confab_search_index_healthy").set(0.0);
        let mut d = self.detail();
        let (since, attempts) = match &d.failing {
            Some(f) => (f.since, f.attempts + 1),
            None => (now_ms(), 1),
        };
        tracing::error!(
            stage,
            error,
            attempt = attempts,
            retry_in_ms = retry_in.as_millis() as u64,
            indexed = self.indexed.load(Ordering::Acquire),
            "search index failing; will retry (nothing is lost: the store has every message)"
        );
        d.failing = Some(Failing {
            stage,
            message: error.to_string(),
            since,
            attempts,
            retry_in_ms: retry_in.as_millis() as u64,
        });
    }

    /// The step after a failure streak worked: logs the recovery once.
    pub(super) fn recovered(&self) {
        let mut d = self.detail();
        if let Some(f) = d.failing.take() {
            tracing::info!(
                attempts = f.attempts,
                secs = (now_ms() - f.since).max(0) as f64 / 1000.0,
                indexed = self.indexed.load(Ordering::Acquire),
                "search index recovered"
            );
        }
    }

    pub(super) fn scrubbed(&self, report: ScrubReport) {
        metrics::counter!("confab_search_index_scrubs_total", "outcome" => report.outcome)
            .increment(1);
        self.detail().last_scrub = Some(report);
    }
}
