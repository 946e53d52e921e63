//! The group-commit engine: the one thread that writes to the store. It
//! knows no domain — what an operation is, how it is applied and who hears
//! of it afterwards belong to the [`Domain`] it runs.
//!
//! Callers queue operations on a bounded channel; the engine takes
//! everything that is queued (up to `commit_batch_max`), has the domain
//! apply it in one write transaction, commits durably (fsync), and only
//! then hands the batch's effects to the domain to publish (acks, answers,
//! fan-out). While a commit is in flight new operations pile up and form
//! the next batch, so batches grow with load and the fsync cost is shared.
//!
//! Faults are the engine's: a batch that fails is answered whole (its
//! effects and every op not yet applied); a full disk releases the reserve
//! file and a failing store is reopened; while the storage is full or
//! failing only the domain's essential operations are tried and the rest
//! are refused at once, until a probe commit succeeds (retried with
//! back-off). A panic inside redb while applying a batch (a damaged page)
//! fails that batch, not the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::db::{Db, StorageHealth, StorageState};
use super::{META, now_ms};
use crate::config::StoreConfig;
use crate::error::ApiError;

/// What the engine runs: a domain's operations, applied inside the
/// engine's transaction, and what becomes of them after the commit.
pub trait Domain: Send + 'static {
    type Op: Send + 'static;
    /// What an applied operation leaves to publish once its batch is
    /// durable (or to answer with the error when it is not).
    type Effect: Send + 'static;

    /// Whether `op` asks the engine to commit what it holds and stop.
    fn is_stop(op: &Self::Op) -> bool;
    /// Operations that still run while the disk is full, on the reserve:
    /// small, and what keeps users' state honest and lets the server stop.
    fn is_essential(op: &Self::Op) -> bool;
    /// Answers an operation that will not be applied.
    fn refuse(&mut self, op: Self::Op, err: &ApiError);
    /// Whether writes the domain deferred are due in this batch even though
    /// more operations are queued.
    fn flush_due(&self) -> bool;
    /// Applies the operations of `batch` (taking them out of it) inside
    /// `txn`, one effect each; `flush` asks for the deferred writes too.
    /// On an error, what is left in `batch` is refused by the engine and
    /// `effects` are handed to [`Domain::failed`].
    fn apply(
        &mut self,
        txn: &redb::WriteTransaction,
        batch: &mut Vec<Self::Op>,
        effects: &mut Vec<Self::Effect>,
        flush: bool,
    ) -> Result<(), ApiError>;
    /// The batch is durable: publish its effects.
    fn committed(&mut self, effects: Vec<Self::Effect>);
    /// The batch was not committed: answer its effects with `err` and
    /// forget whatever the domain cached from it.
    fn failed(&mut self, effects: Vec<Self::Effect>, err: &ApiError);
    /// The storage took writes again after a failure: forget caches.
    fn recovered(&mut self);
    /// One batch was tried: `ops` operations in `secs` seconds.
    fn measured(&mut self, ops: usize, secs: f64);
}

/// The reserve file (`<data_dir>/storage-reserve`, `storage_reserve_mb`).
struct Reserve {
    path: std::path::PathBuf,
    bytes: u64,
}

impl Reserve {
    /// Makes sure the file exists with its size allocated (not sparse).
    fn ensure(&self) -> std::io::Result<()> {
        if self.bytes == 0 {
            return Ok(());
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.bytes) {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)?;
        let len = libc::off_t::try_from(self.bytes).unwrap_or(libc::off_t::MAX);
        // SAFETY: posix_fallocate(3) on a file descriptor we own.
        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
        if rc != 0 {
            let _ = std::fs::remove_file(&self.path);
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        f.sync_all()
    }

    /// Gives the space back (on a full disk). Whether there was any.
    fn release(&self) -> bool {
        std::fs::remove_file(&self.path).is_ok()
    }

    /// Free bytes for an unprivileged writer on the data directory's file
    /// system.
    fn free_bytes(&self) -> Option<u64> {
        let dir = self.path.parent()?;
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs(3) fills the zeroed struct we own.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// The first retry after a storage failure, and the longest wait between
/// retries.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub struct Engine<D: Domain> {
    db: Arc<Db>,
    health: Arc<StorageHealth>,
    config: StoreConfig,
    domain: D,
    /// A preallocated file released when the disk fills up, so that the
    /// essential writes (and the shutdown's last commit) still fit.
    reserve: Reserve,
    /// When to try again to leave the Full or Failing state, and the wait
    /// after that (doubling, capped).
    retry_at: Instant,
    retry_wait: Duration,
}

impl<D: Domain> Engine<D> {
    /// Starts the engine's thread on `rx`: it runs `domain` until an
    /// operation asks it to stop or every sender is dropped, committing what
    /// it holds first.
    pub fn spawn(
        db: Arc<Db>,
        health: Arc<StorageHealth>,
        config: StoreConfig,
        domain: D,
        rx: mpsc::Receiver<D::Op>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let reserve = Reserve {
            path: db.path().with_file_name("storage-reserve"),
            bytes: (config.storage_reserve_mb as u64) << 20,
        };
        if let Err(e) = reserve.ensure() {
            tracing::warn!(error = %e, path = %reserve.path.display(), "cannot keep a storage reserve");
        }
        let mut engine = Engine {
            db,
            health,
            config,
            domain,
            reserve,
            retry_at: Instant::now(),
            retry_wait: RETRY_FIRST,
        };
        // Damage the engine meets is reported into its store's log.
        let damage = engine.db.damage().clone();
        std::thread::Builder::new()
            .name("confab-writer".into())
            .spawn(move || damage.scope(|| engine.run(rx)))
    }

    fn run(&mut self, mut rx: mpsc::Receiver<D::Op>) {
        let mut batch: Vec<D::Op> = Vec::with_capacity(self.config.commit_batch_max);
        let wait = Duration::from_micros(self.config.commit_wait_us);
        loop {
            let first = if self.health.state() == StorageState::Ok {
                match rx.blocking_recv() {
                    Some(op) => op,
                    None => return,
                }
            } else {
                // Full or failing: try to recover when due, and meanwhile
                // answer what comes at once.
                if Instant::now() >= self.retry_at {
                    self.try_recover();
                }
                match rx.try_recv() {
                    Ok(op) => op,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            };
            let mut stop = D::is_stop(&first);
            if !stop {
                batch.push(first);
            }
            let mut waited = wait.is_zero();
            // Whether the queue ran dry: then this batch also carries the
            // domain's deferred writes.
            let mut idle = false;
            while !stop && batch.len() < self.config.commit_batch_max {
                match rx.try_recv() {
                    Ok(op) if D::is_stop(&op) => stop = true,
                    Ok(op) => batch.push(op),
                    Err(mpsc::error::TryRecvError::Empty) if !waited => {
                        std::thread::sleep(wait);
                        waited = true;
                    }
                    Err(_) => {
                        idle = true;
                        break;
                    }
                }
            }
            if let Some(err) = self.health.refusal() {
                // Only the essential ops are tried (on the reserve); the
                // others are answered now, without touching the disk.
                let mut keep = Vec::with_capacity(batch.len());
                for op in batch.drain(..) {
                    if D::is_essential(&op) {
                        keep.push(op);
                    } else {
                        self.domain.refuse(op, &err);
                    }
                }
                batch = keep;
            }
            if !batch.is_empty() {
                let flush = idle || stop || self.domain.flush_due();
                self.commit_batch(&mut batch, flush);
            }
            if stop {
                tracing::info!("writer stopped after its last commit");
                return;
            }
        }
    }

    fn commit_batch(&mut self, batch: &mut Vec<D::Op>, flush: bool) {
        let started = Instant::now();
        let n = batch.len();
        let mut effects = Vec::with_capacity(n);
        // A panic inside redb (a damaged page on the way to where this
        // batch writes) fails the batch as `storage_damaged` instead of
        // ending the engine: the write transaction is dropped (nothing of
        // it is committed), ops already taken from the batch are answered
        // by the domain, and other rooms go on.
        let result = super::guard("the pages this batch writes to", || {
            let mut txn = self.db.begin_write()?;
            txn.set_quick_repair(self.config.quick_repair);
            self.domain.apply(&txn, batch, &mut effects, flush)?;
            txn.commit()?;
            Ok(())
        });
        let commit_secs = started.elapsed().as_secs_f64();
        metrics::histogram!("confab_commit_batch_size").record(n as f64);
        metrics::histogram!("confab_commit_duration_seconds").record(commit_secs);
        self.domain.measured(n, commit_secs);
        match result {
            Ok(()) => self.domain.committed(effects),
            Err(e) => {
                tracing::error!(error = %e, ops = n, "commit failed; the batch is rejected");
                metrics::counter!("confab_commit_failures_total").increment(1);
                // Everything in the batch is answered, also what was never
                // applied.
                let e = self.storage_failed(e);
                self.health.batch_failed(&e);
                for op in batch.drain(..) {
                    self.domain.refuse(op, &e);
                }
                self.domain.failed(effects, &e);
            }
        }
    }

    /// A commit failed with `e`: if the storage is the cause, move to Full
    /// (releasing the reserve) or Failing, reopen the database (redb fails
    /// every operation after an I/O error until then), and schedule a retry.
    /// Returns the error to answer the batch with.
    fn storage_failed(&mut self, e: ApiError) -> ApiError {
        let state = match e.code {
            "storage_full" => StorageState::Full,
            "storage_error" => StorageState::Failing,
            _ => return e,
        };
        if state == StorageState::Full && self.reserve.release() {
            tracing::warn!(path = %self.reserve.path.display(), "disk full: released the storage reserve");
        }
        let detail = if state == StorageState::Full {
            "the disk is full"
        } else {
            "writing to the store failed"
        };
        self.health.set(state, detail);
        if let Err(why) = self.db.reopen() {
            tracing::error!(error = %why, "cannot reopen the store");
            self.health.set(StorageState::Failing, &why);
        }
        self.retry_wait = RETRY_FIRST;
        self.retry_at = Instant::now() + self.retry_wait;
        self.health.refusal().unwrap_or(e)
    }

    /// Full or Failing: is the storage usable again? Full ends when the
    /// file system has room for the reserve twice over and the reserve is
    /// allocated again; both end with a successful probe commit. Otherwise
    /// the next try is scheduled, waiting twice as long (at most
    /// [`RETRY_MAX`]).
    fn try_recover(&mut self) {
        let health = self.health.clone();
        let ready = match health.state() {
            StorageState::Ok => return,
            StorageState::Full => {
                let need = self.reserve.bytes.saturating_mul(2).max(1 << 20);
                self.reserve.free_bytes().is_some_and(|free| free >= need)
                    && self.reserve.ensure().is_ok()
            }
            StorageState::Failing => match self.db.reopen() {
                Ok(()) => true,
                Err(why) => {
                    health.set(StorageState::Failing, &why);
                    false
                }
            },
        };
        if ready {
            match self.probe() {
                Ok(()) => {
                    self.domain.recovered();
                    health.set(StorageState::Ok, "");
                    self.retry_wait = RETRY_FIRST;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the storage is not writable yet");
                    let _ = self.storage_failed(e);
                }
            }
        }
        self.retry_wait = (self.retry_wait * 2).min(RETRY_MAX);
        self.retry_at = Instant::now() + self.retry_wait;
    }

    /// One small durable commit: proof that the storage takes writes.
    fn probe(&self) -> Result<(), ApiError> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert("storage_probe_ms", now_ms().max(0) as u64)?;
        }
        txn.commit()?;
        Ok(())
    }
}
