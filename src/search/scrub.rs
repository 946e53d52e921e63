//! The background checksum scrub (`spawn_scrub`, `index_scrub_secs`): a
//! thread of its own at the lowest CPU and I/O priority that verifies the
//! index's files and hands damage to the `Indexer`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::checksums::{CheckError, FileCheck, check_files};
use super::index::SearchIndex;
use super::source::Source;
use super::status::ScrubReport;
use crate::store::now_ms;

/// Starts the background scrub (`index_scrub_secs`): every `every`, the
/// checksums of all of the index's files are verified ([`check_files`]) on
/// a thread of its own at the lowest CPU and I/O priority. Damage is handed
/// to the [`Indexer`] (woken through `wake`, its feed), which rebuilds the
/// index from the store while the server keeps serving. Ends when
/// `status.stop` is set.
pub fn spawn_scrub(
    index: Arc<SearchIndex>,
    wake: Arc<dyn Source>,
    every: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("confab-index-scrub".into())
        .spawn(move || {
            lower_priority();
            loop {
                let until = Instant::now() + every;
                loop {
                    if index.status.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(100)));
                }
                index.scrub(wake.as_ref());
            }
        })
}

/// Nice 19 and the idle I/O class for the calling thread (on Linux both are
/// per thread), so a scrub of a large index yields to everything else.
pub(super) fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority(2) and ioprio_set(2) with who = 0 change only the
    // calling thread's scheduling; no memory is passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        // IOPRIO_WHO_PROCESS = 1, IOPRIO_CLASS_IDLE = 3 (shifted by 13).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
    }
}

impl SearchIndex {
    /// One scrub pass over the index in use.
    pub(super) fn scrub(&self, wake: &dyn Source) {
        // A rebuild replaces these files anyway.
        if self.status.rebuilding().is_some() || self.status.damage_pending() {
            return;
        }
        let live = self.live();
        let result = check_files(&live.index, &self.dir, Some(&self.status.stop));
        let report = |outcome, check: Option<&FileCheck>, detail: Option<String>| ScrubReport {
            at: now_ms(),
            outcome,
            files: check.map_or(0, |c| c.files),
            bytes: check.map_or(0, |c| c.bytes),
            ms: check.map_or(0, |c| c.ms),
            detail,
        };
        match result {
            Err(CheckError::Stopped) => {}
            Err(CheckError::Io(e)) => {
                tracing::warn!(error = %e, "search index scrub could not read the index; trying again at the next scrub");
                self.status.scrubbed(report("error", None, Some(e)));
            }
            Ok(check) if check.damaged.is_empty() => {
                tracing::debug!(
                    files = check.files,
                    bytes = check.bytes,
                    ms = check.ms,
                    "search index scrub: checksums verified"
                );
                self.status.scrubbed(report("ok", Some(&check), None));
            }
            Ok(check) => {
                // Damage in files a rebuild already replaced does not matter.
                if !Arc::ptr_eq(&live, &self.live()) {
                    return;
                }
                let what = format!("damaged files: {}", check.describe());
                self.status
                    .scrubbed(report("damaged", Some(&check), Some(what.clone())));
                self.status.report_damage(what);
                wake.nudge();
            }
        }
    }
}
