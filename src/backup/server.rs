//! The server's backups: the one backup at a time ([`Backups`],
//! [`BackupSlot`]) run on its own thread ([`run_on_thread`]), the periodic
//! backups and their retention ([`periodic`], [`prune`]), their metrics
//! ([`record`]), and the automatic backup taken before a migration
//! ([`before_migration`]).

use std::path::{Path, PathBuf};

use redb::ReadTransaction;

use super::format::{
    OnDamage, PERIODIC_PREFIX, PRE_MIGRATION_PREFIX, SUFFIX, Summary, timestamped_name,
};
use super::writer::{WRITEBACK_EVERY, secret_file, write};
use crate::store;

/// The store's [`store::BeforeMigration`] for a server or an offline
/// command on `data_dir`: a copy of exactly what is there (the way back)
/// in `<data_dir>/backups/`, records unchecked (the older format has no
/// checksums to check).
pub fn before_migration(
    data_dir: &Path,
) -> impl Fn(&ReadTransaction, u64) -> Result<(), String> + use<'_> {
    move |snapshot, v| {
        let to = data_dir
            .join("backups")
            .join(timestamped_name(&format!("{PRE_MIGRATION_PREFIX}{v}")));
        let summary = write(
            snapshot,
            secret_file(data_dir).as_deref(),
            &to,
            OnDamage::Copy,
            |_| {},
        )
        .map_err(|e| format!("cannot back up the store before migrating it: {e}"))?;
        tracing::info!(path = %summary.path, from = v, to = store::SCHEMA_VERSION, "store backed up before migration");
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Periodic backups
// ---------------------------------------------------------------------------

/// Deletes the oldest `<prefix>-*.cfbk` files in `dir` beyond `keep`.
pub fn prune(dir: &Path, prefix: &str, keep: usize) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{prefix}-")) && n.ends_with(SUFFIX))
        })
        .collect();
    found.sort();
    let excess = found.len().saturating_sub(keep);
    let removed: Vec<PathBuf> = found.into_iter().take(excess).collect();
    for p in &removed {
        remove_gently(p);
    }
    removed
}

/// Deletes a large file a slice at a time: freeing a few hundred MB at once
/// holds up the server's own commit fsyncs for tens of milliseconds.
fn remove_gently(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path)
        && let Ok(meta) = f.metadata()
    {
        let mut len = meta.len();
        while len > WRITEBACK_EVERY {
            len -= WRITEBACK_EVERY;
            if f.set_len(len).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Counts a backup taken by the server in the metrics.
pub fn record(result: Result<&Summary, &String>) {
    match result {
        Ok(_) => {
            metrics::counter!("confab_backups_total", "outcome" => "ok").increment(1);
            metrics::gauge!("confab_backup_last_success_timestamp_seconds")
                .set(store::now_ms() as f64 / 1000.0);
        }
        Err(_) => metrics::counter!("confab_backups_total", "outcome" => "error").increment(1),
    }
}

/// A server's one backup at a time. Two at once would only compete for the
/// same disk (and a second snapshot): an operator's `confab backup` while
/// another runs is refused, and a periodic backup that comes due during one
/// waits for it. The application state holds it; clones share it.
#[derive(Clone, Default)]
pub struct Backups {
    /// Whether a backup is being taken now (a [`BackupSlot`] is out).
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Backups {
    /// The slot, unless a backup is running.
    pub fn try_take(&self) -> Option<BackupSlot> {
        use std::sync::atomic::Ordering;
        self.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| BackupSlot(self.running.clone()))
    }

    /// Whether a backup is running now.
    pub fn taken(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The right to take the server's one backup (see [`Backups`]), given back
/// when dropped.
pub struct BackupSlot(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for BackupSlot {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Runs a backup `job` on its own named OS thread, holding `slot` until it
/// ends; the returned future gives its result. Not on tokio's blocking
/// pool: a backup of a large store takes minutes, and the pool is what
/// every search runs on, so a backup must not take one of its threads (nor
/// wait behind searches for one).
pub fn run_on_thread<T: Send + 'static>(
    slot: BackupSlot,
    job: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("confab-backup".into())
        .spawn(move || {
            let result = job();
            // Free before answering: whoever sees the result may start the
            // next backup at once.
            drop(slot);
            let _ = tx.send(result);
        });
    async move {
        spawned.map_err(|e| format!("cannot start a backup thread: {e}"))?;
        rx.await
            .map_err(|_| "the backup thread failed".to_string())?
    }
}

/// Takes a backup every `every` into `dir`, keeping the newest `keep`.
pub async fn periodic(
    db: std::sync::Arc<crate::store::db::Db>,
    data_dir: PathBuf,
    dir: PathBuf,
    every: std::time::Duration,
    keep: usize,
    backups: Backups,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // An operator's backup may be running: this one waits for it.
        let slot = loop {
            if let Some(slot) = backups.try_take() {
                break slot;
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        };
        let (db, data_dir, dir) = (db.clone(), data_dir.clone(), dir.clone());
        let done = run_on_thread(slot, move || {
            let to = dir.join(timestamped_name(PERIODIC_PREFIX));
            let summary = db.damage().scope(|| {
                let txn = db.begin_read().map_err(|e| e.to_string())?;
                write(
                    &txn,
                    secret_file(&data_dir).as_deref(),
                    &to,
                    OnDamage::Refuse,
                    |_| {},
                )
            })?;
            Ok((summary, prune(&dir, PERIODIC_PREFIX, keep)))
        })
        .await;
        match done {
            Ok((s, removed)) => {
                record(Ok(&s));
                tracing::info!(path = %s.path, bytes = s.bytes, messages = s.messages, seconds = s.seconds, pruned = removed.len(), "periodic backup written");
            }
            Err(e) => {
                record(Err(&e));
                tracing::error!(error = %e, "periodic backup failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_backup_at_a_time_and_the_slot_is_free_when_the_result_arrives() {
        let backups = Backups::default();
        let slot = backups.try_take().expect("free at first");
        assert!(backups.try_take().is_none(), "a second backup is refused");
        assert!(backups.taken());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let name = rt
            .block_on(run_on_thread(slot, || {
                Ok(std::thread::current().name().map(str::to_string))
            }))
            .expect("job");
        assert_eq!(name.as_deref(), Some("confab-backup"));
        assert!(!backups.taken());
        let slot = backups.try_take().expect("free again");
        let failed = rt.block_on(run_on_thread(slot, || -> Result<(), String> {
            panic!("a bug in a backup")
        }));
        assert!(failed.is_err());
        assert!(backups.try_take().is_some(), "a panic frees the slot");
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in [
            "confab-20260101-000000",
            "confab-20260102-000000",
            "confab-20260103-000000",
        ] {
            std::fs::write(dir.path().join(format!("{n}{SUFFIX}")), b"x").expect("write");
        }
        std::fs::write(dir.path().join("other.txt"), b"x").expect("write");
        let removed = prune(dir.path(), "confab", 2);
        assert_eq!(removed.len(), 1);
        assert!(removed[0].to_string_lossy().contains("20260101"));
        assert!(dir.path().join("other.txt").exists());
    }
}
