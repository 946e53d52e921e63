//! `confab check` with no server running: [`check_offline`], and
//! [`engine_check`], redb's own page checksums, read through an in-memory
//! overlay so that the file checked is never written to.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use super::super::seal;
use super::check::{Finding, LedgerCheck, Progress, Report, check};
use super::visit::{catch, s};

// ---------------------------------------------------------------------------
// redb's page checksums, without writing to the file
// ---------------------------------------------------------------------------

/// A storage backend that reads the store file and keeps every write in
/// memory: redb's `check_integrity` needs a writable database (it repairs
/// what it finds), and a check must not change the file it checks.
#[derive(Debug)]
struct Overlay {
    file: std::fs::File,
    state: Mutex<OverlayState>,
}

#[derive(Debug)]
struct OverlayState {
    len: u64,
    file_len: u64,
    /// Written blocks by block number.
    blocks: HashMap<u64, Box<[u8]>>,
}

const BLOCK: u64 = 4096;

impl Overlay {
    fn open(path: &Path) -> std::io::Result<Overlay> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Overlay {
            file,
            state: Mutex::new(OverlayState {
                len,
                file_len: len,
                blocks: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OverlayState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One block as it is now (from memory, else the file, else zeros).
    fn block(&self, st: &OverlayState, n: u64) -> std::io::Result<Box<[u8]>> {
        use std::os::unix::fs::FileExt;
        if let Some(b) = st.blocks.get(&n) {
            return Ok(b.clone());
        }
        let mut buf = vec![0u8; BLOCK as usize].into_boxed_slice();
        let start = n * BLOCK;
        if start < st.file_len {
            let end = (start + BLOCK).min(st.file_len);
            self.file
                .read_exact_at(&mut buf[..(end - start) as usize], start)?;
        }
        Ok(buf)
    }
}

fn io_err(e: std::io::Error) -> std::io::Error {
    e
}

impl redb::StorageBackend for Overlay {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        use std::os::unix::fs::FileExt;
        let st = self.lock();
        if offset + out.len() as u64 > st.len {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end",
            )));
        }
        // Untouched ranges inside the file are read in one call.
        let first = offset / BLOCK;
        let last = (offset + out.len() as u64).div_ceil(BLOCK);
        let touched = (first..last).any(|b| st.blocks.contains_key(&b));
        if !touched && offset + out.len() as u64 <= st.file_len {
            return self.file.read_exact_at(out, offset).map_err(io_err);
        }
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let n = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let take = (BLOCK as usize - within).min(out.len() - done);
            let b = self.block(&st, n).map_err(io_err)?;
            out[done..done + take].copy_from_slice(&b[within..within + take]);
            done += take;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut st = self.lock();
        if len < st.len {
            // Whatever lies past the new end reads as zeros if it grows again.
            st.blocks.retain(|&b, _| b * BLOCK < len);
            if let Some(b) = st.blocks.get_mut(&(len / BLOCK)) {
                b[(len % BLOCK) as usize..].fill(0);
            } else if len < st.file_len && !len.is_multiple_of(BLOCK) {
                let n = len / BLOCK;
                let mut b = self.block(&st, n).map_err(io_err)?;
                b[(len % BLOCK) as usize..].fill(0);
                st.blocks.insert(n, b);
            }
            st.file_len = st.file_len.min(len);
        }
        st.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut st = self.lock();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let n = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let take = (BLOCK as usize - within).min(data.len() - done);
            let mut b = self.block(&st, n).map_err(io_err)?;
            b[within..within + take].copy_from_slice(&data[done..done + take]);
            st.blocks.insert(n, b);
            done += take;
        }
        st.len = st.len.max(offset + data.len() as u64);
        Ok(())
    }
}

/// redb's own integrity check (every page checksum of the committed trees)
/// on `<data_dir>/confab.redb`, with every write it would make kept in
/// memory: the file is not changed. Only for a store no server holds (a
/// running server's pages move under it). "verified" or "damaged: …".
pub fn engine_check(data_dir: &Path) -> String {
    let path = data_dir.join("confab.redb");
    let overlay = match Overlay::open(&path) {
        Ok(o) => o,
        Err(e) => return format!("not checked: cannot open {}: {e}", path.display()),
    };
    let r = catch(|| {
        let mut db = redb::Database::builder()
            .set_cache_size(16 << 20)
            .create_with_backend(overlay)
            .map_err(|e| format!("redb cannot open the file: {e}"))?;
        db.check_integrity().map_err(s)
    });
    match r {
        Ok(true) => "verified".into(),
        Ok(false) => "damaged: page checksums do not match (redb would repair the file by going back to an earlier commit)".into(),
        Err(e) => format!("damaged: {e}"),
    }
}

/// `confab check` with no server running: the file opened read-only (held
/// for the whole check, so no server starts on it meanwhile) — or, when it
/// needs redb's repair after an unclean stop, through the in-memory overlay
/// so that it is still not written to — then [`check`], then
/// [`engine_check`].
pub fn check_offline(
    data_dir: &Path,
    ledger: LedgerCheck<'_>,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Report, String> {
    use redb::ReadableDatabase;
    let path = data_dir.join("confab.redb");
    if !path.exists() {
        return Err(format!("no confab store at {}", path.display()));
    }
    let opened = catch(|| {
        match redb::Database::builder()
            .set_cache_size(16 << 20)
            .open_read_only(&path)
        {
            Ok(db) => Ok(Opened::ReadOnly(db)),
            Err(redb::DatabaseError::RepairAborted) => {
                let overlay = Overlay::open(&path).map_err(s)?;
                redb::Database::builder()
                    .set_cache_size(16 << 20)
                    .create_with_backend(overlay)
                    .map(Opened::Repaired)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(format!(
                "{} is open in another process (a server whose admin socket does not answer?)",
                path.display()
            )),
            Err(e) => Err(format!("cannot open {}: {e}", path.display())),
        }
    });
    let opened = match opened {
        Ok(o) => o,
        // The file cannot even be opened: that is damage to report, not a
        // check that could not run — unless it is not ours to open.
        Err(e)
            if e.contains("another process")
                || e.starts_with("cannot open") && e.contains("os error") =>
        {
            return Err(e);
        }
        Err(e) => {
            let mut report = Report {
                engine: engine_check(data_dir),
                ..Default::default()
            };
            report.add(Finding::new(
                "engine",
                "(file)",
                format!("the store cannot be opened: {e}"),
            ));
            return Ok(report);
        }
    };
    let txn = match &opened {
        Opened::ReadOnly(db) => db.begin_read(),
        Opened::Repaired(db) => db.begin_read(),
    }
    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // The damage this check meets, each record reported once.
    let mut report =
        std::sync::Arc::new(seal::DamageLog::default()).scope(|| check(&txn, ledger, on_progress));
    drop(txn);
    let started = Instant::now();
    report.engine = engine_check(data_dir);
    if report.engine.starts_with("damaged") {
        let what = report.engine.clone();
        report.add(Finding::new("engine", "(file)", what));
    }
    report.seconds += started.elapsed().as_secs_f64();
    drop(opened);
    Ok(report)
}

/// The store as [`check_offline`] opened it.
enum Opened {
    ReadOnly(redb::ReadOnlyDatabase),
    Repaired(redb::Database),
}
