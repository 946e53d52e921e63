//! Writing a backup: the checksummed file writer, the dump of every table
//! of one snapshot (with what it does with damaged records), [`write`] and
//! [`write_cancellable`], and the offline backup of a store no server holds
//! ([`open_reader`], [`offline`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use super::format::{
    CANCELLED, Col, FORMAT_VERSION, MAGIC, MAX_NAMED, OnDamage, Progress, Summary, check_value,
    for_each_table, table_names,
};
use super::partial::{open_partial, partial_path, sync_dir};
use crate::store;
use crate::store::integrity::{self, Finding, Item, catch};
use crate::store::seal::{self, Rec, SealKey};

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Write-back is started every this many bytes (see [`HashWriter::writeback`]).
pub(super) const WRITEBACK_EVERY: u64 = 8 << 20;

pub(super) struct HashWriter {
    out: BufWriter<File>,
    hash: Sha256,
    pub(super) bytes: u64,
    /// Bytes handed to the kernel's write-back so far, and the start of the
    /// range still in flight.
    started: u64,
    in_flight: u64,
}

impl HashWriter {
    pub(super) fn new(file: File) -> HashWriter {
        HashWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            bytes: 0,
            started: 0,
            in_flight: 0,
        }
    }

    pub(super) fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b)?;
        if self.bytes - self.started >= WRITEBACK_EVERY {
            self.writeback()?;
        }
        Ok(())
    }

    /// Starts writing the newest range to disk and waits for the one before.
    /// Without it, the final fsync of a large backup writes everything at
    /// once and the server's own commit fsyncs queue behind it (a ~55 ms
    /// stall of the message path for a 227 MB backup, docs/PERFORMANCE.md);
    /// this way at most two ranges are ever dirty.
    fn writeback(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = self.out.get_ref().as_raw_fd();
            let off = |v: u64| v as libc::off64_t;
            // SAFETY: sync_file_range(2) on our own open file descriptor with
            // in-range offsets; it only affects when data reaches the disk.
            unsafe {
                if self.started > self.in_flight {
                    libc::sync_file_range(
                        fd,
                        off(self.in_flight),
                        off(self.started - self.in_flight),
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
                libc::sync_file_range(
                    fd,
                    off(self.started),
                    off(self.bytes - self.started),
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.in_flight = self.started;
        self.started = self.bytes;
        Ok(())
    }

    pub(super) fn name(&mut self, tag: u8, name: &str) -> std::io::Result<()> {
        self.write(&[tag])?;
        self.write(&(name.len() as u16).to_le_bytes())?;
        self.write(name.as_bytes())
    }
}

/// Progress is reported at least every this many records of a table ...
const REPORT_RECORDS: u64 = 4096;
/// ... and every this many bytes: a table of large records (long messages)
/// would otherwise go for seconds without a report, and the report is what
/// tells `confab backup` (and its timeout) that the backup is moving.
const REPORT_BYTES: u64 = 1 << 20;

struct Dump<'a, P: FnMut(Progress)> {
    w: HashWriter,
    rec: Vec<u8>,
    progress: Progress,
    on_progress: &'a mut P,
    counts: serde_json::Map<String, Json>,
    cancel: &'a AtomicBool,
    /// `w.bytes` at the last report.
    reported_at: u64,
    on_damage: OnDamage,
    schema: u64,
    damaged: Vec<Finding>,
    damaged_total: u64,
    /// Tables with records left out.
    damaged_tables: std::collections::BTreeSet<String>,
}

impl<P: FnMut(Progress)> Dump<'_, P> {
    fn found(&mut self, f: Finding) {
        self.damaged_total += 1;
        self.damaged_tables.insert(f.table.clone());
        if self.damaged.len() < MAX_NAMED {
            self.damaged.push(f);
        }
    }

    /// Writes `self.rec` (a record: key then value) to the file.
    fn put(&mut self) -> std::io::Result<()> {
        self.w.write(&[1])?;
        self.w.write(&(self.rec.len() as u32).to_le_bytes())?;
        let rec = std::mem::take(&mut self.rec);
        let r = self.w.write(&rec);
        self.rec = rec;
        r
    }

    fn table<K: Col + redb::Key, V: Col>(
        &mut self,
        txn: &ReadTransaction,
        def: TableDefinition<K, V>,
    ) -> Result<(), String> {
        let name = def.name().to_string();
        if name == store::MESSAGES.name() {
            return self.messages(txn);
        }
        let table = match txn.open_table(def) {
            Ok(t) => Some(t),
            // An older store may lack a table added later.
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(format!("cannot read table {name}: {e}")),
        };
        self.w.name(b'T', &name).map_err(io)?;
        let mut count = 0u64;
        let sealed = Rec::by_table(&name).filter(|_| self.on_damage != OnDamage::Copy);
        let mut failed_io = None;
        let mut last_key = None;
        let mut bad = Vec::new();
        let mut cancelled = false;
        if let Some(table) = table {
            // A page redb cannot read (an error, or a panic inside it) ends
            // this table; the records before it are in the file.
            let read = catch(|| {
                for entry in table.iter().map_err(|e| e.to_string())? {
                    let (k, v) = entry.map_err(|e| e.to_string())?;
                    self.rec.clear();
                    K::put(&k.value(), &mut self.rec);
                    let klen = self.rec.len();
                    V::put(&v.value(), &mut self.rec);
                    if let Some(rec) = sealed {
                        // A value is its u32 length, then its bytes.
                        let (key, value) = self.rec.split_at(klen);
                        let value = value.get(4..).unwrap_or_default();
                        if let Err(why) = check_value(&name, self.schema, key, value) {
                            seal::report(rec, key, &why);
                            bad.push(Finding::record(rec, key, why));
                            if self.on_damage == OnDamage::Skip {
                                continue;
                            }
                        }
                        last_key = Some(rec.describe(key));
                    }
                    if let Err(e) = self.put() {
                        failed_io = Some(e);
                        return Ok(());
                    }
                    count += 1;
                    if count.is_multiple_of(REPORT_RECORDS)
                        || self.w.bytes - self.reported_at >= REPORT_BYTES
                    {
                        self.report();
                    }
                    // One relaxed load per record: a cancelled backup stops
                    // within a record, whatever the size of its tables.
                    if self.cancel.load(Ordering::Relaxed) {
                        cancelled = true;
                        return Ok(());
                    }
                }
                Ok(())
            });
            for f in bad {
                self.found(f);
            }
            if cancelled {
                return Err(CANCELLED.to_string());
            }
            if let Some(e) = failed_io {
                return Err(io(e));
            }
            if let Err(why) = read {
                let after = last_key.unwrap_or_else(|| format!("{count} records"));
                self.found(Finding {
                    kind: "page".into(),
                    table: name.clone(),
                    key: Some(after.clone()),
                    room: None,
                    seq: None,
                    what: format!("cannot read on after {after}: {why}"),
                });
            }
        }
        self.w.write(&[0]).map_err(io)?;
        self.w.write(&count.to_le_bytes()).map_err(io)?;
        self.counts.insert(name, count.into());
        Ok(())
    }

    fn report(&mut self) {
        self.progress.bytes = self.w.bytes;
        self.reported_at = self.w.bytes;
        (self.on_progress)(self.progress);
    }

    /// `messages`, past damage (see [`integrity::visit_messages`]): with
    /// [`OnDamage::Skip`] every message it cannot read is written as a
    /// lost-message placeholder (schema 4 and later; an older store's are
    /// left out), so that restored rooms keep their seq chains.
    fn messages(&mut self, txn: &ReadTransaction) -> Result<(), String> {
        let name = store::MESSAGES.name().to_string();
        self.w.name(b'T', &name).map_err(io)?;
        let mut count = 0u64;
        let mut bad = Vec::new();
        let check = self.on_damage != OnDamage::Copy;
        let skip = self.on_damage == OnDamage::Skip;
        let placeholders = self.schema >= 4;
        let r = integrity::visit_messages::<std::io::Error>(txn, None, &mut |item| {
            let (kb, value) = match item {
                Item::Record { room, seq, value } => {
                    let kb = (room, seq).key_bytes();
                    match check.then(|| check_value(&name, self.schema, kb.as_slice(), value)) {
                        Some(Err(why)) => {
                            seal::report(Rec::Messages, kb.as_slice(), &why);
                            bad.push(Finding::record(Rec::Messages, kb.as_slice(), why));
                            if !skip {
                                (kb, value.to_vec())
                            } else if placeholders {
                                (kb, seal::lost(kb.as_slice()))
                            } else {
                                return Ok(());
                            }
                        }
                        _ => (kb, value.to_vec()),
                    }
                }
                Item::Unreachable { room, seq } => {
                    let kb = (room, seq).key_bytes();
                    let mut f = Finding::record(
                        Rec::Messages,
                        kb.as_slice(),
                        "on a damaged page: cannot be read",
                    );
                    f.kind = "unreachable".into();
                    bad.push(f);
                    if !(skip && placeholders) {
                        return Ok(());
                    }
                    (kb, seal::lost(kb.as_slice()))
                }
                Item::Page { after, why } => {
                    let after = after.map(|(r, q)| format!("room {r:016x} seq {q}"));
                    bad.push(Finding {
                        kind: "page".into(),
                        table: "messages".into(),
                        what: format!(
                            "cannot read on {}: {why}",
                            after
                                .as_deref()
                                .map_or("from its start".into(), |k| format!("after {k}"))
                        ),
                        key: after,
                        room: None,
                        seq: None,
                    });
                    return Ok(());
                }
            };
            self.rec.clear();
            self.rec.extend_from_slice(kb.as_slice());
            <&[u8] as Col>::put(&value.as_slice(), &mut self.rec);
            self.put()?;
            count += 1;
            self.progress.messages += 1;
            if count.is_multiple_of(REPORT_RECORDS)
                || self.w.bytes - self.reported_at >= REPORT_BYTES
            {
                self.report();
            }
            if self.cancel.load(Ordering::Relaxed) {
                return Err(std::io::Error::other(CANCELLED));
            }
            Ok(())
        });
        for f in bad {
            self.found(f);
        }
        r.map_err(|e| {
            if e.to_string() == CANCELLED {
                CANCELLED.to_string()
            } else {
                io(e)
            }
        })?;
        self.w.write(&[0]).map_err(io)?;
        self.w.write(&count.to_le_bytes()).map_err(io)?;
        self.counts.insert(name, count.into());
        Ok(())
    }
}

/// The `message_log` position a snapshot has reached (0 for an empty or
/// schema-1 store).
fn snapshot_pos(txn: &ReadTransaction) -> u64 {
    txn.open_table(store::MESSAGE_LOG)
        .ok()
        .and_then(|t| t.last().ok().flatten().map(|(k, _)| k.value()))
        .unwrap_or(0)
}

/// Writes a backup of the snapshot `txn` to `to` (via `to.partial`, renamed
/// when complete and synced), with the JWT secret when there is one.
pub fn write(
    txn: &ReadTransaction,
    secret: Option<&[u8]>,
    to: &Path,
    on_damage: OnDamage,
    on_progress: impl FnMut(Progress),
) -> Result<Summary, String> {
    write_cancellable(
        txn,
        secret,
        to,
        on_damage,
        &AtomicBool::new(false),
        on_progress,
    )
}

/// [`write`], stopped when `cancel` becomes true (the server's online
/// backup sets it when its `confab backup` client goes away: nobody would
/// receive the result, and the snapshot it holds keeps redb from reusing
/// pages). A cancelled backup fails with [`CANCELLED`] and removes its
/// partial file. `on_progress` is called once when the tables start, then
/// every few thousand records or MiB, then at the end.
pub fn write_cancellable(
    txn: &ReadTransaction,
    secret: Option<&[u8]>,
    to: &Path,
    on_damage: OnDamage,
    cancel: &AtomicBool,
    mut on_progress: impl FnMut(Progress),
) -> Result<Summary, String> {
    into_file(to, |file| {
        let pos = snapshot_pos(txn);
        let schema = store::schema_version(txn)?.unwrap_or(0);
        let mut dump = Dump {
            w: HashWriter::new(file),
            rec: Vec::with_capacity(512),
            progress: Progress {
                total_messages: pos,
                ..Default::default()
            },
            on_progress: &mut on_progress,
            counts: serde_json::Map::new(),
            cancel,
            reported_at: 0,
            on_damage,
            schema,
            damaged: Vec::new(),
            damaged_total: 0,
            damaged_tables: Default::default(),
        };
        begin(&mut dump.w, schema, pos).map_err(io)?;
        // The first report: the backup has its snapshot and its file.
        dump.report();
        macro_rules! dump_table {
            ($t:expr) => {
                dump.table(txn, $t)?
            };
        }
        for_each_table!(dump_table);
        if dump.damaged_total > 0 && on_damage != OnDamage::Skip {
            return Err(refusal(&dump.damaged, dump.damaged_total));
        }
        let messages = count(&dump.counts, "messages");
        let mut summary = json!({"tables": dump.counts, "messages": messages});
        if dump.damaged_total > 0 {
            // Restore reads this: a ledger with records left out cannot
            // balance, and says so as a warning instead of refusing.
            summary["damaged"] = dump.damaged_total.into();
            summary["damaged_tables"] = json!(dump.damaged_tables);
        }
        let (bytes, file) = end(dump.w, secret, &summary)?;
        dump.progress.bytes = bytes;
        (dump.on_progress)(dump.progress);
        if cancel.load(Ordering::Relaxed) {
            return Err(CANCELLED.to_string());
        }
        file.sync_all().map_err(io)?;
        let mut s = summary_of(to, bytes, &dump.counts, schema, pos, secret.is_some());
        s.damaged = std::mem::take(&mut dump.damaged);
        s.damaged_total = dump.damaged_total;
        Ok(s)
    })
}

/// Records of `table` written, from a backup's counts.
pub(super) fn count(counts: &serde_json::Map<String, Json>, table: &str) -> u64 {
    counts.get(table).and_then(Json::as_u64).unwrap_or(0)
}

/// What a backup written to `to` holds (no damage; `seconds` is filled
/// in by [`into_file`]).
pub(super) fn summary_of(
    to: &Path,
    bytes: u64,
    counts: &serde_json::Map<String, Json>,
    schema: u64,
    pos: u64,
    with_secret: bool,
) -> Summary {
    Summary {
        path: to.display().to_string(),
        bytes,
        messages: count(counts, "messages"),
        users: count(counts, "users"),
        rooms: count(counts, "rooms"),
        schema_version: schema,
        snapshot_pos: pos,
        with_secret,
        seconds: 0.0,
        damaged: Vec::new(),
        damaged_total: 0,
    }
}

fn io(e: std::io::Error) -> String {
    format!("cannot write the backup: {e}")
}

/// Writes a backup file at `to`: `body` writes it into `to.partial`
/// (created, locked), which is renamed to `to` once `body` has succeeded
/// (and synced it), and removed if it fails. The summary's `seconds` is
/// the time it all took.
pub(super) fn into_file(
    to: &Path,
    body: impl FnOnce(File) -> Result<Summary, String>,
) -> Result<Summary, String> {
    let started = std::time::Instant::now();
    let partial = partial_path(to);
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let file = open_partial(&partial)?;
    // The lock belongs to the open file, which the writer consumes: this
    // second handle keeps it until the partial file is renamed or removed,
    // so no other backup can take the name over in between.
    let _lock = file.try_clone().map_err(io)?;
    match body(file) {
        Ok(mut summary) => {
            std::fs::rename(&partial, to)
                .map_err(|e| format!("cannot rename to {}: {e}", to.display()))?;
            sync_dir(to);
            summary.seconds = started.elapsed().as_secs_f64();
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// The file's start: magic, format and the header of a snapshot of a
/// store of `schema` at stream position `pos`.
pub(super) fn begin(w: &mut HashWriter, schema: u64, pos: u64) -> std::io::Result<()> {
    let header = json!({
        "format": "confab-backup",
        "version": FORMAT_VERSION,
        "created_at": store::now_ms(),
        "confab": crate::telemetry::VERSION,
        "schema_version": schema,
        "snapshot_pos": pos,
        "tables": table_names(),
    })
    .to_string();
    w.write(MAGIC)?;
    w.write(&FORMAT_VERSION.to_le_bytes())?;
    w.write(&(header.len() as u32).to_le_bytes())?;
    w.write(header.as_bytes())
}

/// The file's end, after the tables: the secret file (if any), the
/// summary, the end marker and the checksum. Returns the file's size and
/// the file, written but not synced.
pub(super) fn end(
    mut w: HashWriter,
    secret: Option<&[u8]>,
    summary: &Json,
) -> Result<(u64, File), String> {
    if let Some(s) = secret {
        w.name(b'F', "jwt_secret").map_err(io)?;
        w.write(&(s.len() as u32).to_le_bytes()).map_err(io)?;
        w.write(s).map_err(io)?;
    }
    let summary = summary.to_string();
    w.write(b"S").map_err(io)?;
    w.write(&(summary.len() as u32).to_le_bytes()).map_err(io)?;
    w.write(summary.as_bytes()).map_err(io)?;
    w.write(b"E").map_err(io)?;
    let digest = w.hash.clone().finalize();
    w.out.write_all(&digest).map_err(io)?;
    let bytes = w.bytes + digest.len() as u64;
    let file = w.out.into_inner().map_err(|e| io(e.into_error()))?;
    Ok((bytes, file))
}

/// Why a backup of a damaged store was refused, naming the damage.
fn refusal(found: &[Finding], total: u64) -> String {
    let mut out = format!(
        "the store has {total} damaged record(s) or page(s); no backup was written (a backup is never kept unless it restores). `confab check` names all of it; `confab backup --skip-damaged` saves everything that can be read, without them:"
    );
    for f in found.iter().take(20) {
        out.push_str("\n  ");
        out.push_str(&f.line());
    }
    if total > 20 {
        out.push_str(&format!("\n  … and {} more", total - 20));
    }
    out
}

/// The JWT secret kept in the data dir, if any (a configured one is not
/// backed up: it lives in the config).
pub fn secret_file(data_dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(data_dir.join("jwt_secret"))
        .ok()
        .filter(|s| !s.is_empty())
}

/// A store opened only to read it, when no server holds it.
pub enum Reader {
    ReadOnly(redb::ReadOnlyDatabase),
    /// After an unclean stop redb must repair the file before reading it.
    Repaired(Database),
}

impl Reader {
    pub fn begin_read(&self) -> Result<ReadTransaction, String> {
        match self {
            Reader::ReadOnly(db) => db.begin_read(),
            Reader::Repaired(db) => db.begin_read(),
        }
        .map_err(|e| e.to_string())
    }
}

/// Opens `<data_dir>/confab.redb` to read it in one pass (backup, export):
/// read-only with a small page cache (a scan would otherwise fill redb's
/// default 1 GiB), or with a repair after an unclean stop.
pub fn open_reader(data_dir: &Path) -> Result<Reader, String> {
    let path = data_dir.join("confab.redb");
    if !path.exists() {
        return Err(format!("no confab store at {}", path.display()));
    }
    let busy = |e: &dyn std::fmt::Display| {
        format!(
            "cannot open {}: {e} (a server is running on it but its admin socket does not answer?)",
            path.display()
        )
    };
    match Database::builder()
        .set_cache_size(16 << 20)
        .open_read_only(&path)
    {
        Ok(db) => Ok(Reader::ReadOnly(db)),
        Err(redb::DatabaseError::RepairAborted) => Database::builder()
            .set_cache_size(16 << 20)
            .open(&path)
            .map(Reader::Repaired)
            .map_err(|e| busy(&e)),
        Err(e) => Err(busy(&e)),
    }
}

/// Backs up the store in `data_dir` when no server holds it.
pub fn offline(
    data_dir: &Path,
    to: &Path,
    on_damage: OnDamage,
    on_progress: impl FnMut(Progress),
) -> Result<Summary, String> {
    let reader = open_reader(data_dir)?;
    let txn = reader.begin_read()?;
    // The damage this backup meets, each record reported once.
    Arc::new(store::seal::DamageLog::default()).scope(|| {
        write(
            &txn,
            secret_file(data_dir).as_deref(),
            to,
            on_damage,
            on_progress,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::restore::verify;
    use super::*;

    #[test]
    fn a_cancelled_backup_stops_and_removes_its_partial_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store::Store::open(dir.path()).expect("open");
        let txn = store.db.begin_read().expect("read");
        let to = dir.path().join("out.cfbk");
        let cancel = AtomicBool::new(false);
        let mut reports = 0;
        let r = write_cancellable(&txn, None, &to, OnDamage::Refuse, &cancel, |_| {
            reports += 1;
            // Cancelled as soon as it starts (when the tables begin).
            cancel.store(true, Ordering::Relaxed);
        });
        assert_eq!(r.expect_err("cancelled"), CANCELLED);
        assert_eq!(reports, 1);
        assert!(!to.exists() && !partial_path(&to).exists());
        // A stale partial is taken over by the next backup to the same file.
        std::fs::write(partial_path(&to), b"left by a killed server").expect("write");
        write(&txn, None, &to, OnDamage::Refuse, |_| {}).expect("backup");
        assert!(to.exists() && !partial_path(&to).exists());
        verify(&to, &mut |_| {}).expect("a complete backup");
    }
}
