//! The scheduler: a task that sleeps until the next scheduled transfer is
//! due (or until the schedule changes), then asks the writer to run
//! everything due. Exactly-once comes from the writer: a due transfer's
//! state change and ledger entries are one transaction, and a transfer that
//! is no longer `scheduled` is skipped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::error::ApiError;
use crate::store::now_ms;

/// Longest sleep between checks on a single node (a safety net; its own
/// changes wake it at once).
pub const MAX_SLEEP: Duration = Duration::from_secs(30);
/// On a cluster's node: transfers scheduled through another node are due
/// here too (every node runs what is due; the database's claims make each
/// run once), so a node looks at least this often — what bounds how late a
/// transfer runs when the node that scheduled it died.
pub const MAX_SLEEP_CLUSTER: Duration = Duration::from_secs(1);

/// Runs until shutdown. `run_due(now)` runs what is due at `now` through
/// the storage (`WalletOp::RunDue`) and answers the next due time; it is
/// asked again after `max_sleep` at the latest. `offset_ms` shifts the
/// scheduler's clock (drills, tests).
pub async fn run<F, Fut>(
    run_due: F,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    offset_ms: i64,
    max_sleep: Duration,
) where
    F: Fn(i64) -> Fut,
    Fut: std::future::Future<Output = Result<Option<i64>, ApiError>>,
{
    let now = || now_ms() + offset_ms;
    loop {
        let next = run_due(now()).await;
        let sleep = match next {
            Ok(Some(at)) => {
                Duration::from_millis((at - now()).clamp(0, max_sleep.as_millis() as i64) as u64)
            }
            Ok(None) => max_sleep,
            Err(e) => {
                tracing::warn!(error = %e.message, "running due transfers failed; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
