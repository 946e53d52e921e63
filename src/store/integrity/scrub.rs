//! The server's background scrub ([`spawn_scrub`], [`Scrub`]): the record
//! check of [`check`](super::check::check) in small read transactions with
//! pauses, on a low-priority thread, pass after pass.

use std::ops::Bound;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::TableDefinition;
use serde::Serialize;

use super::super::MESSAGES;
use super::super::seal::{self, Rec, SealKey};
use super::super::verify_value;
use super::check::Finding;
use super::visit::{catch, s};

// ---------------------------------------------------------------------------
// The background scrub
// ---------------------------------------------------------------------------

/// What the scrub has found so far (for `/api/v1/status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubStatus {
    pub every_secs: u64,
    pub passes: u64,
    pub running: bool,
    pub last_started_at: Option<i64>,
    pub last_finished_at: Option<i64>,
    pub last_seconds: Option<f64>,
    /// Records checked in the last whole pass.
    pub last_records: u64,
    /// Findings of the last whole pass (the first 20).
    pub last_damage: Vec<Finding>,
    pub last_damage_total: u64,
}

/// The scrub's status, written by its thread and read by `/api/v1/status`:
/// the server makes one for the scrub it starts ([`spawn_scrub`]).
#[derive(Debug, Default)]
pub struct Scrub(Mutex<ScrubStatus>);

impl Scrub {
    /// The status of a scrub that runs every `every`.
    pub fn new(every: Duration) -> Scrub {
        Scrub(Mutex::new(ScrubStatus {
            every_secs: every.as_secs(),
            ..Default::default()
        }))
    }

    fn status(&self) -> std::sync::MutexGuard<'_, ScrubStatus> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The status now, for `/api/v1/status`.
    pub fn snapshot(&self) -> ScrubStatus {
        self.status().clone()
    }
}

/// Records per read transaction, and the pause between two.
const SCRUB_CHUNK: usize = 256;
const SCRUB_PAUSE: Duration = Duration::from_millis(20);

macro_rules! scrub_fn {
    ($name:ident, $k:ty, $skip:expr) => {
        /// One table, a chunk per read transaction. Returns records read.
        fn $name(
            db: &super::super::db::Db,
            def: TableDefinition<$k, &'static [u8]>,
            rec: Rec,
            stop: &dyn Fn() -> bool,
            found: &mut Vec<Finding>,
        ) -> u64 {
            let skip: fn($k) -> Option<$k> = $skip;
            let mut from: Bound<$k> = Bound::Unbounded;
            let mut n = 0u64;
            loop {
                if stop() {
                    return n;
                }
                let mut last: Option<$k> = None;
                let mut seen = 0usize;
                let r = catch(|| {
                    let txn = db.begin_read().map_err(s)?;
                    let t = match txn.open_table(def) {
                        Ok(t) => t,
                        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                        Err(e) => return Err(s(e)),
                    };
                    for e in t.range::<$k>((from, Bound::Unbounded)).map_err(s)?.take(SCRUB_CHUNK) {
                        let (k, v) = e.map_err(s)?;
                        let key = k.value();
                        let kb = key.key_bytes();
                        if let Err(why) = verify_value(rec.table(), super::super::SCHEMA_VERSION, kb.as_slice(), v.value()) {
                            seal::report(rec, kb.as_slice(), &why);
                            found.push(Finding::record(rec, kb.as_slice(), why));
                        }
                        last = Some(key);
                        seen += 1;
                    }
                    Ok(())
                });
                n += seen as u64;
                match r {
                    Ok(()) if seen < SCRUB_CHUNK => return n,
                    Ok(()) => {
                        if let Some(k) = last {
                            from = Bound::Excluded(k);
                        }
                    }
                    Err(why) => {
                        let at = match last {
                            Some(k) => Some(k),
                            None => match from {
                                Bound::Excluded(k) => Some(k),
                                _ => None,
                            },
                        };
                        let after = at.map(|k| rec.describe(k.key_bytes().as_slice()));
                        tracing::warn!(table = rec.table(), after = ?after, why, "scrub: a damaged page");
                        metrics::counter!("confab_store_damaged_pages_total", "table" => rec.table()).increment(1);
                        found.push(Finding::page(rec.table(), after, &why));
                        // Past it where the key allows (the next room), else
                        // the table's check ends here for this pass.
                        match at.and_then(skip) {
                            Some(next) => from = Bound::Included(next),
                            None => return n,
                        }
                    }
                }
                std::thread::sleep(SCRUB_PAUSE);
            }
        }
    };
}
scrub_fn!(scrub_u64, u64, |_| None);
scrub_fn!(scrub_pair, (u64, u64), |k: (u64, u64)| k
    .0
    .checked_add(1)
    .map(|r| (r, 0)));

/// One whole scrub pass over every sealed table.
fn scrub_pass(db: &super::super::db::Db, stop: &dyn Fn() -> bool) -> (u64, Vec<Finding>) {
    let mut found = Vec::new();
    let mut n = 0;
    n += scrub_pair(db, MESSAGES, Rec::Messages, stop, &mut found);
    n += scrub_u64(db, super::super::USERS, Rec::Users, stop, &mut found);
    n += scrub_u64(db, super::super::ROOMS, Rec::Rooms, stop, &mut found);
    n += scrub_pair(db, super::super::MEMBERS, Rec::Members, stop, &mut found);
    n += scrub_pair(
        db,
        super::super::WALLET_ENTRIES,
        Rec::WalletEntries,
        stop,
        &mut found,
    );
    n += scrub_u64(
        db,
        super::super::WALLET_TRANSFERS,
        Rec::WalletTransfers,
        stop,
        &mut found,
    );
    n += scrub_u64(db, super::super::PRIVACY, Rec::Privacy, stop, &mut found);
    n += scrub_u64(
        db,
        super::super::CLUSTER_OUTBOX,
        Rec::ClusterOutbox,
        stop,
        &mut found,
    );
    (n, found)
}

/// Lowers this thread's CPU and I/O priority as far as they go (nice 19,
/// the idle I/O class), so that the scrub takes only what nothing else wants.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid, setpriority and ioprio_set on this thread only; they
    // take plain integers and change nothing but its scheduling.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        // IOPRIO_WHO_PROCESS = 1 (a thread id works), IOPRIO_CLASS_IDLE = 3.
        libc::syscall(libc::SYS_ioprio_set, 1, tid as libc::c_long, 3 << 13);
    }
}

/// Starts the background scrub: a pass over every record every `every`
/// (the first after one interval), on a low-priority thread, until `stop`.
pub fn spawn_scrub(
    db: std::sync::Arc<super::super::db::Db>,
    every: Duration,
    status: std::sync::Arc<Scrub>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("confab-scrub".into())
        .spawn(move || {
            let damage = db.damage().clone();
            damage.scope(|| scrub_every(&db, every, &status, &stop))
        })
}

/// The scrub thread's loop (see [`spawn_scrub`]).
fn scrub_every(
    db: &super::super::db::Db,
    every: Duration,
    status: &Scrub,
    stop: &std::sync::atomic::AtomicBool,
) {
    lower_priority();
    let stopped = || stop.load(std::sync::atomic::Ordering::Acquire);
    loop {
        // Sleep in short steps, so that a shutdown is not held up.
        let until = Instant::now() + every;
        while Instant::now() < until {
            if stopped() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200).min(until - Instant::now()));
        }
        let started = Instant::now();
        {
            let mut st = status.status();
            st.running = true;
            st.last_started_at = Some(super::super::now_ms());
        }
        let (n, found) = scrub_pass(db, &stopped);
        if stopped() {
            return;
        }
        let secs = started.elapsed().as_secs_f64();
        metrics::counter!("confab_store_scrub_passes_total").increment(1);
        metrics::gauge!("confab_store_scrub_damage").set(found.len() as f64);
        if found.is_empty() {
            tracing::info!(records = n, seconds = secs, "scrub: every record verified");
        } else {
            tracing::warn!(
                records = n,
                damaged = found.len(),
                seconds = secs,
                "scrub: damage found (`confab check` names all of it)"
            );
        }
        let mut st = status.status();
        st.running = false;
        st.passes += 1;
        st.last_finished_at = Some(super::super::now_ms());
        st.last_seconds = Some(secs);
        st.last_records = n;
        st.last_damage_total = found.len() as u64;
        st.last_damage = found.into_iter().take(20).collect();
    }
}
