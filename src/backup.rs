//! Backups: a consistent logical copy of the whole store, taken from one
//! redb read transaction (an MVCC snapshot), so it can be taken while the
//! server keeps writing: everything committed before the snapshot is in it,
//! nothing committed after is, not even partly.
//!
//! The file (format 1, `docs/STORAGE.md`):
//!
//! ```text
//! "CONFABBK" · u32 format · u32 n · n bytes of header JSON
//! per table:  'T' · u16 n · name · { 0x01 · u32 n · record }* · 0x00 · u64 count
//! per file:   'F' · u16 n · name · u32 n · bytes          (the JWT secret)
//! summary:    'S' · u32 n · JSON {"tables": {name: count}, "messages": n}
//! end:        'E' · SHA-256 of every byte before it (including the 'E')
//! ```
//!
//! Integers are little-endian. A record is its key then its value, each
//! field encoded by [`Col`]: u64/i64 as 8 bytes, strings and byte strings as
//! u32 length + bytes, tuples as their fields in order. The search index is
//! not included: it is derived and rebuilds itself.
//!
//! Restore reads the whole file twice: first to check the checksum, the
//! structure and every record (nothing is written until this passes), then
//! to load it into a fresh store beside the target, which is checked
//! (`wallet verify`) before it is moved into place.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
};
use serde::Serialize;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

use crate::store::integrity::{self, Finding, Item, catch};
use crate::store::seal::{self, Rec, SealKey};
use crate::store::{self, SCHEMA_VERSION};

pub const MAGIC: &[u8; 8] = b"CONFABBK";
pub const FORMAT_VERSION: u32 = 1;
/// The file name suffix used for automatic and periodic backups.
pub const SUFFIX: &str = ".cfbk";
/// What is appended to a backup's name while it is being written; the file
/// is renamed to its real name only when complete and synced.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// The name prefix of periodic backups (`<prefix>-YYYYMMDD-HHMMSS.cfbk`).
pub const PERIODIC_PREFIX: &str = "confab";
/// The name prefix of the automatic backup taken before a migration, followed
/// by the schema version it was taken from.
pub const PRE_MIGRATION_PREFIX: &str = "pre-migration-schema";
/// The error of a backup stopped through its cancellation flag.
pub const CANCELLED: &str = "the backup was cancelled";
/// Records per write transaction when restoring.
const RESTORE_BATCH: u64 = 100_000;
/// Largest single record or header we accept (a record is at most a few KiB).
const MAX_CHUNK: usize = 64 << 20;

/// How far a backup or restore has got.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Progress {
    pub bytes: u64,
    pub messages: u64,
    /// Messages in the snapshot, when known up front.
    pub total_messages: u64,
}

/// What a finished backup holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub path: String,
    pub bytes: u64,
    pub messages: u64,
    pub users: u64,
    pub rooms: u64,
    pub schema_version: u64,
    /// The `message_log` position of the snapshot: every message with a
    /// position up to this one is in the backup, none after.
    pub snapshot_pos: u64,
    pub with_secret: bool,
    pub seconds: f64,
    /// Damaged records met (the first [`MAX_NAMED`]): left out of the
    /// backup (`--skip-damaged`; a message as a lost-message placeholder).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<Finding>,
    /// How many damaged records (and unreadable pages) were met.
    pub damaged_total: u64,
}

/// What a backup does with damaged records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamage {
    /// Checks every record and fails, naming the damage, if any is found
    /// (the file is not kept): a backup is never reported good unless it
    /// restores.
    Refuse,
    /// Checks every record and leaves the damaged ones out — a damaged
    /// message becomes a lost-message placeholder, so the room's seq chain
    /// stays whole — and says so in the summary.
    Skip,
    /// Copies the records as they are, unchecked (the pre-migration backup:
    /// the way back to exactly what was there). Unreadable pages still fail.
    Copy,
}

/// Damaged records named in a backup's summary and error.
pub const MAX_NAMED: usize = 100;

// ---------------------------------------------------------------------------
// Field encoding
// ---------------------------------------------------------------------------

/// How one key or value type of a table is written to and read from a
/// backup; implemented for exactly the types confab's tables use.
pub trait Col: redb::Value + 'static {
    type Owned;
    fn put(v: &Self::SelfType<'_>, out: &mut Vec<u8>);
    fn take(r: &mut &[u8]) -> Result<Self::Owned, String>;
    fn borrow(o: &Self::Owned) -> Self::SelfType<'_>;
}

fn take_n<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if r.len() < n {
        return Err("record ends early".into());
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Ok(head)
}

fn take_u64(r: &mut &[u8]) -> Result<u64, String> {
    let b = take_n(r, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

fn take_len(r: &mut &[u8]) -> Result<usize, String> {
    let b = take_n(r, 4)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    Ok(u32::from_le_bytes(a) as usize)
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

impl Col for u64 {
    type Owned = u64;
    fn put(v: &u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn take(r: &mut &[u8]) -> Result<u64, String> {
        take_u64(r)
    }
    fn borrow(o: &u64) -> u64 {
        *o
    }
}

impl Col for i64 {
    type Owned = i64;
    fn put(v: &i64, out: &mut Vec<u8>) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn take(r: &mut &[u8]) -> Result<i64, String> {
        Ok(take_u64(r)? as i64)
    }
    fn borrow(o: &i64) -> i64 {
        *o
    }
}

impl Col for () {
    type Owned = ();
    fn put(_: &(), _: &mut Vec<u8>) {}
    fn take(_: &mut &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn borrow(_: &()) {}
}

impl Col for &'static str {
    type Owned = String;
    fn put(v: &&str, out: &mut Vec<u8>) {
        put_bytes(v.as_bytes(), out);
    }
    fn take(r: &mut &[u8]) -> Result<String, String> {
        let n = take_len(r)?;
        String::from_utf8(take_n(r, n)?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }
    fn borrow(o: &String) -> &str {
        o
    }
}

impl Col for &'static [u8] {
    type Owned = Vec<u8>;
    fn put(v: &&[u8], out: &mut Vec<u8>) {
        put_bytes(v, out);
    }
    fn take(r: &mut &[u8]) -> Result<Vec<u8>, String> {
        let n = take_len(r)?;
        Ok(take_n(r, n)?.to_vec())
    }
    fn borrow(o: &Vec<u8>) -> &[u8] {
        o
    }
}

macro_rules! tuple_col {
    ($($t:ident $i:tt),+) => {
        impl<$($t: Col),+> Col for ($($t,)+) {
            type Owned = ($($t::Owned,)+);
            fn put(v: &Self::SelfType<'_>, out: &mut Vec<u8>) {
                $( $t::put(&v.$i, out); )+
            }
            fn take(r: &mut &[u8]) -> Result<Self::Owned, String> {
                Ok(($($t::take(r)?,)+))
            }
            fn borrow(o: &Self::Owned) -> Self::SelfType<'_> {
                ($($t::borrow(&o.$i),)+)
            }
        }
    };
}
tuple_col!(A 0, B 1);
tuple_col!(A 0, B 1, C 2);

// ---------------------------------------------------------------------------
// The tables
// ---------------------------------------------------------------------------

/// Checks that a stored value is what its table holds: for a store of
/// schema 4 or later its checksum (under `key`, the key's bytes) and then
/// its decoding; for older ones its decoding (a full read of the backup,
/// not just the file's own checksum).
fn check_value(table: &str, schema: u64, key: &[u8], v: &[u8]) -> Result<(), String> {
    store::verify_value(table, schema, key, v).map(drop)
}

/// Tables a backup leaves out: derived from the others, rebuilt by
/// `Store::open` when missing (so a backup stays readable by a confab of
/// the same schema that does not know them).
pub const DERIVED_TABLES: &[&str] = &["wallet_pending"];

/// Calls `$m!(DEFINITION)` for every table of the store but the
/// [`DERIVED_TABLES`], in file order.
macro_rules! for_each_table {
    ($m:ident) => {{
        $m!(store::META);
        $m!(store::USERS);
        $m!(store::USERNAMES);
        $m!(store::CONTACTS);
        $m!(store::ROOMS);
        $m!(store::MEMBERS);
        $m!(store::USER_ROOMS);
        $m!(store::MESSAGES);
        $m!(store::MESSAGE_LOG);
        $m!(store::CLIENT_IDS);
        $m!(store::REVOKED);
        $m!(store::LAST_SEEN);
        $m!(store::WALLET_ACCOUNTS);
        $m!(store::WALLET_ENTRIES);
        $m!(store::WALLET_TRANSFERS);
        $m!(store::WALLET_KEYS);
        $m!(store::WALLET_USER_TRANSFERS);
        $m!(store::WALLET_SCHEDULE);
        $m!(store::CLUSTER_OUTBOX);
        $m!(store::PRIVACY);
    }};
}

/// The names of every table a backup holds.
pub fn table_names() -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! name {
        ($t:expr) => {
            out.push($t.name().to_string())
        };
    }
    for_each_table!(name);
    out
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Write-back is started every this many bytes (see [`HashWriter::writeback`]).
const WRITEBACK_EVERY: u64 = 8 << 20;

struct HashWriter {
    out: BufWriter<File>,
    hash: Sha256,
    bytes: u64,
    /// Bytes handed to the kernel's write-back so far, and the start of the
    /// range still in flight.
    started: u64,
    in_flight: u64,
}

impl HashWriter {
    fn new(file: File) -> HashWriter {
        HashWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            bytes: 0,
            started: 0,
            in_flight: 0,
        }
    }

    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
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

    fn name(&mut self, tag: u8, name: &str) -> std::io::Result<()> {
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
        let io = |e: std::io::Error| format!("cannot write the backup: {e}");
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
        let io = |e: std::io::Error| format!("cannot write the backup: {e}");
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
    let started = std::time::Instant::now();
    let partial = partial_path(to);
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let file = open_partial(&partial)?;
    // The lock belongs to the open file, which the writer below consumes:
    // this second handle keeps it until the partial file is renamed or
    // removed, so no other backup can take the name over in between.
    let _lock = file
        .try_clone()
        .map_err(|e| format!("cannot write the backup: {e}"))?;
    let result = (|| {
        let pos = snapshot_pos(txn);
        let schema = store::schema_version(txn)?.unwrap_or(0);
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
        let io = |e: std::io::Error| format!("cannot write the backup: {e}");
        dump.w.write(MAGIC).map_err(io)?;
        dump.w.write(&FORMAT_VERSION.to_le_bytes()).map_err(io)?;
        dump.w
            .write(&(header.len() as u32).to_le_bytes())
            .map_err(io)?;
        dump.w.write(header.as_bytes()).map_err(io)?;
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
        if let Some(s) = secret {
            dump.w.name(b'F', "jwt_secret").map_err(io)?;
            dump.w.write(&(s.len() as u32).to_le_bytes()).map_err(io)?;
            dump.w.write(s).map_err(io)?;
        }
        let count = |t: &str| dump.counts.get(t).and_then(Json::as_u64).unwrap_or(0);
        let (messages, users, rooms) = (count("messages"), count("users"), count("rooms"));
        let mut summary = json!({"tables": dump.counts, "messages": messages});
        if dump.damaged_total > 0 {
            // Restore reads this: a ledger with records left out cannot
            // balance, and says so as a warning instead of refusing.
            summary["damaged"] = dump.damaged_total.into();
            summary["damaged_tables"] = json!(dump.damaged_tables);
        }
        let summary = summary.to_string();
        dump.w.write(b"S").map_err(io)?;
        dump.w
            .write(&(summary.len() as u32).to_le_bytes())
            .map_err(io)?;
        dump.w.write(summary.as_bytes()).map_err(io)?;
        dump.w.write(b"E").map_err(io)?;
        let digest = dump.w.hash.clone().finalize();
        dump.w.out.write_all(&digest).map_err(io)?;
        let bytes = dump.w.bytes + digest.len() as u64;
        dump.progress.bytes = bytes;
        (dump.on_progress)(dump.progress);
        let file = dump.w.out.into_inner().map_err(|e| io(e.into_error()))?;
        if cancel.load(Ordering::Relaxed) {
            return Err(CANCELLED.to_string());
        }
        file.sync_all().map_err(io)?;
        Ok(Summary {
            path: to.display().to_string(),
            bytes,
            messages,
            users,
            rooms,
            schema_version: schema,
            snapshot_pos: pos,
            with_secret: secret.is_some(),
            seconds: 0.0,
            damaged: std::mem::take(&mut dump.damaged),
            damaged_total: dump.damaged_total,
        })
    })();
    match result {
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

/// Where the backup to `to` is written until it is complete.
pub fn partial_path(to: &Path) -> PathBuf {
    let mut name = to.file_name().unwrap_or_default().to_os_string();
    name.push(PARTIAL_SUFFIX);
    to.with_file_name(name)
}

/// Takes an exclusive `flock` on `file` without waiting: Ok(true) when
/// taken, Ok(false) when another open file holds it (in this process or
/// another). The lock lives as long as the file is open, and dies with its
/// process, so a partial file whose lock can be taken has no live writer.
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor owned by `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether `file` (open) is still the file at `path`: a file can be
/// unlinked (by [`remove_stale_partials`]) between being opened and locked.
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Opens `partial` for a new backup, holding its lock for as long as the
/// backup writes it. A partial left by a backup that did not finish (its
/// process was killed) is taken over and emptied, and the takeover logged;
/// one that a running backup holds is refused rather than overwritten.
fn open_partial(partial: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let busy = || {
        format!(
            "{} is being written by another backup that is still running; wait for it, or choose another file",
            partial.display()
        )
    };
    // A few tries: a start-up cleanup may hold the lock for a moment, or
    // unlink the file between our open and our lock.
    for _ in 0..20 {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(partial)
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        match try_lock(&file) {
            Ok(true) if still_at(&file, partial) => {
                let stale = file.metadata().map(|m| m.len()).unwrap_or(0);
                if stale > 0 {
                    tracing::warn!(path = %partial.display(), bytes = stale, "replacing a partial backup left by a backup that did not finish");
                }
                file.set_len(0)
                    .map_err(|e| format!("cannot empty {}: {e}", partial.display()))?;
                return Ok(file);
            }
            Ok(true) => continue,
            Ok(false) => std::thread::sleep(std::time::Duration::from_millis(5)),
            // A file system without flock: write as before, unguarded.
            Err(e) => {
                tracing::debug!(path = %partial.display(), error = %e, "cannot lock a partial backup");
                file.set_len(0)
                    .map_err(|e| format!("cannot empty {}: {e}", partial.display()))?;
                return Ok(file);
            }
        }
    }
    Err(busy())
}

/// Whether `name` is a partial file of a backup confab names itself
/// (periodic and pre-migration: [`timestamped_name`] + `.partial`), the only
/// partial files the start-up cleanup may delete: a partial next to an
/// operator's `--to FILE` is replaced when that file is next backed up to.
pub fn is_own_partial(name: &str) -> bool {
    let Some(stem) = name
        .strip_suffix(PARTIAL_SUFFIX)
        .and_then(|n| n.strip_suffix(SUFFIX))
    else {
        return false;
    };
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let Some((rest, time)) = stem.rsplit_once('-') else {
        return false;
    };
    let Some((prefix, date)) = rest.rsplit_once('-') else {
        return false;
    };
    let schema = prefix.strip_prefix(PRE_MIGRATION_PREFIX);
    digits(date, 8)
        && digits(time, 6)
        && (prefix == PERIODIC_PREFIX
            || schema.is_some_and(|v| !v.is_empty() && digits(v, v.len())))
}

/// Removes the partial files of confab's own backups in `dir` that no
/// running backup holds (see [`try_lock`]): left by a process killed while
/// writing one, they would otherwise stay for ever. Returns what it removed.
/// Called at server start, before any backup of its own runs.
pub fn remove_stale_partials(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if !entry.file_name().to_str().is_some_and(is_own_partial)
            || !entry.file_type().is_ok_and(|t| t.is_file())
        {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match try_lock(&file) {
            Ok(true) if still_at(&file, &path) => {
                if std::fs::remove_file(&path).is_ok() {
                    removed.push(path);
                }
            }
            Ok(_) => {
                tracing::info!(path = %path.display(), "a partial backup is being written by a running backup; left alone")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot tell whether a partial backup is still being written; left alone")
            }
        }
    }
    removed.sort();
    removed
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
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

// ---------------------------------------------------------------------------
// Reading and restoring
// ---------------------------------------------------------------------------

struct HashReader {
    inp: BufReader<File>,
    hash: Sha256,
    bytes: u64,
}

impl HashReader {
    fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        if n > MAX_CHUNK {
            return Err(format!("corrupt backup: a {n}-byte field"));
        }
        let mut buf = vec![0u8; n];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.inp.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the backup is truncated (it ends early)".to_string()
            } else {
                format!("cannot read the backup: {e}")
            }
        })?;
        self.hash.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.fill(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let mut b = [0u8; 2];
        self.fill(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn name(&mut self) -> Result<String, String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.exact(n)?).map_err(|_| "corrupt backup: a name is not UTF-8".into())
    }
}

/// What a backup file holds, from a full read.
#[derive(Debug, Clone, Serialize)]
pub struct Contents {
    pub header: Json,
    pub schema_version: u64,
    pub tables: std::collections::BTreeMap<String, u64>,
    pub messages: u64,
    pub bytes: u64,
    pub with_secret: bool,
    /// Damaged records the backup left out (`confab backup --skip-damaged`),
    /// and the tables they were in.
    pub damaged: u64,
    pub damaged_tables: Vec<String>,
}

/// Where records go while reading: nowhere (verification) or a database.
struct Sink<'a> {
    db: Option<&'a Database>,
    on_progress: &'a mut dyn FnMut(Progress),
    progress: Progress,
    /// The schema of the store in the backup (how its values are checked).
    schema: u64,
}

fn load_table<K: Col + redb::Key, V: Col>(
    def: TableDefinition<K, V>,
    r: &mut HashReader,
    sink: &mut Sink<'_>,
) -> Result<u64, String> {
    let name = def.name().to_string();
    let messages = name == store::MESSAGES.name();
    let mut txn = None;
    let mut count = 0u64;
    let mut batch: Vec<(K::Owned, V::Owned)> = Vec::new();
    let flush = |batch: &mut Vec<(K::Owned, V::Owned)>,
                 txn: &mut Option<redb::WriteTransaction>|
     -> Result<(), String> {
        let Some(db) = sink.db else {
            batch.clear();
            return Ok(());
        };
        if txn.is_none() {
            let mut t = db.begin_write().map_err(|e| e.to_string())?;
            t.set_durability(redb::Durability::None)
                .map_err(|e| e.to_string())?;
            *txn = Some(t);
        }
        if let Some(t) = txn.as_ref() {
            let mut table = t.open_table(def).map_err(|e| e.to_string())?;
            for (k, v) in batch.drain(..) {
                table
                    .insert(K::borrow(&k), V::borrow(&v))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    };
    loop {
        match r.byte()? {
            0 => break,
            1 => {}
            b => {
                return Err(format!(
                    "corrupt backup: unexpected byte {b:#04x} in {name}"
                ));
            }
        }
        let n = r.u32()? as usize;
        let rec = r.exact(n)?;
        let mut cur = rec.as_slice();
        let bad = |e: String| format!("corrupt backup: table {name}, record {}: {e}", count + 1);
        let k = K::take(&mut cur).map_err(bad)?;
        let value_bytes = cur;
        let key_bytes = &rec[..rec.len() - value_bytes.len()];
        let v = V::take(&mut cur).map_err(bad)?;
        if !cur.is_empty() {
            return Err(bad("trailing bytes".into()));
        }
        // The verify pass checks every stored value (checksum, decoding);
        // the load pass reads the same bytes (the file's checksum is
        // compared again at the end).
        if sink.db.is_none() && value_bytes.len() >= 4 {
            check_value(&name, sink.schema, key_bytes, &value_bytes[4..]).map_err(bad)?;
        }
        count += 1;
        if messages {
            sink.progress.messages += 1;
        }
        if sink.db.is_some() {
            batch.push((k, v));
            if batch.len() >= 4096 {
                flush(&mut batch, &mut txn)?;
            }
            if count.is_multiple_of(RESTORE_BATCH) {
                flush(&mut batch, &mut txn)?;
                if let Some(t) = txn.take() {
                    t.commit().map_err(|e| e.to_string())?;
                }
            }
        }
        if count.is_multiple_of(4096) {
            sink.progress.bytes = r.bytes;
            (sink.on_progress)(sink.progress);
        }
    }
    flush(&mut batch, &mut txn)?;
    if let Some(t) = txn.take() {
        t.commit().map_err(|e| e.to_string())?;
    }
    let stated = r.u64()?;
    if stated != count {
        return Err(format!(
            "corrupt backup: table {name} has {count} records but says {stated}"
        ));
    }
    Ok(count)
}

/// Reads a whole backup: checks its structure, every record and the
/// checksum; loads the records into `db` when given. Returns what it holds
/// and the secret file, if any.
fn read(
    from: &Path,
    db: Option<&Database>,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<(Contents, Option<Vec<u8>>), String> {
    let file = File::open(from).map_err(|e| format!("cannot open {}: {e}", from.display()))?;
    let mut r = HashReader {
        inp: BufReader::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let magic = r
        .exact(8)
        .map_err(|_| format!("{} is not a confab backup", from.display()))?;
    if magic != MAGIC {
        return Err(format!("{} is not a confab backup", from.display()));
    }
    let version = r.u32()?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "the backup has format {version}; this confab reads format {FORMAT_VERSION}"
        ));
    }
    let n = r.u32()? as usize;
    let header: Json = serde_json::from_slice(&r.exact(n)?)
        .map_err(|e| format!("corrupt backup: bad header: {e}"))?;
    let schema = header["schema_version"].as_u64().unwrap_or(0);
    if schema > SCHEMA_VERSION {
        return Err(format!(
            "the backup holds a store of schema {schema}, written by a newer confab ({}); this confab understands schema {SCHEMA_VERSION} and older",
            header["confab"].as_str().unwrap_or("unknown version")
        ));
    }
    let mut sink = Sink {
        db,
        on_progress,
        progress: Progress {
            total_messages: header["snapshot_pos"].as_u64().unwrap_or(0),
            ..Default::default()
        },
        schema,
    };
    let mut tables = std::collections::BTreeMap::new();
    let mut secret = None;
    let summary: Json = loop {
        match r.byte()? {
            b'T' => {
                let name = r.name()?;
                if tables.contains_key(&name) {
                    return Err(format!("corrupt backup: table {name} twice"));
                }
                let mut count = None;
                macro_rules! load {
                    ($t:expr) => {
                        if count.is_none() && name == $t.name() {
                            count = Some(load_table($t, &mut r, &mut sink)?);
                        }
                    };
                }
                for_each_table!(load);
                let Some(count) = count else {
                    return Err(format!(
                        "the backup has a table `{name}` this confab does not know (written by a newer confab?)"
                    ));
                };
                tables.insert(name, count);
            }
            b'F' => {
                let name = r.name()?;
                let n = r.u32()? as usize;
                let data = r.exact(n)?;
                if name != "jwt_secret" {
                    return Err(format!("the backup has an unknown file `{name}`"));
                }
                secret = Some(data);
            }
            b'S' => {
                let n = r.u32()? as usize;
                break serde_json::from_slice(&r.exact(n)?)
                    .map_err(|e| format!("corrupt backup: bad summary: {e}"))?;
            }
            b => return Err(format!("corrupt backup: unexpected section {b:#04x}")),
        }
    };
    if r.byte()? != b'E' {
        return Err("corrupt backup: no end marker".into());
    }
    let computed = r.hash.clone().finalize();
    let mut stored = [0u8; 32];
    r.inp
        .read_exact(&mut stored)
        .map_err(|_| "the backup is truncated (no checksum)".to_string())?;
    if computed[..] != stored[..] {
        return Err("the backup's checksum does not match: the file is damaged".into());
    }
    let mut extra = [0u8; 1];
    if r.inp.read(&mut extra).map_err(|e| e.to_string())? != 0 {
        return Err("the backup has bytes after its end".into());
    }
    for (name, count) in &tables {
        if summary["tables"][name].as_u64() != Some(*count) {
            return Err(format!("corrupt backup: the summary disagrees on {name}"));
        }
    }
    let messages = tables.get(store::MESSAGES.name()).copied().unwrap_or(0);
    let damaged = summary["damaged"].as_u64().unwrap_or(0);
    let damaged_tables = summary["damaged_tables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    sink.progress.bytes = r.bytes + 32;
    (sink.on_progress)(sink.progress);
    Ok((
        Contents {
            schema_version: schema,
            header,
            tables,
            messages,
            bytes: r.bytes + 32,
            with_secret: secret.is_some(),
            damaged,
            damaged_tables,
        },
        secret,
    ))
}

/// Reads and checks a whole backup without writing anything.
pub fn verify(from: &Path, on_progress: &mut dyn FnMut(Progress)) -> Result<Contents, String> {
    read(from, None, on_progress).map(|(c, _)| c)
}

/// What `confab restore` did.
#[derive(Debug, Serialize)]
pub struct Restored {
    pub contents: Contents,
    pub wallet: Option<crate::wallet::Verification>,
    pub secret_restored: bool,
    pub seconds: f64,
}

/// Restores `from` into `data_dir`. Refuses a non-empty directory unless
/// `force`; verifies the whole file before creating anything, builds the
/// store beside the target and checks it (`wallet verify`) before moving it
/// into place. On any failure the directory is left as it was.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    force: bool,
    on_progress: &mut dyn FnMut(&str, Progress),
) -> Result<Restored, String> {
    let started = std::time::Instant::now();
    let existing: Vec<String> = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", data_dir.display())),
    };
    if !existing.is_empty() && !force {
        return Err(format!(
            "{} is not empty ({}); restore into an empty directory, or pass --force to replace its store",
            data_dir.display(),
            existing.join(", ")
        ));
    }
    let admin_socket = crate::config::ADMIN_SOCKET;
    if existing.iter().any(|n| n == admin_socket)
        && std::os::unix::net::UnixStream::connect(data_dir.join(admin_socket)).is_ok()
    {
        return Err(format!(
            "a confab server is running on {}; stop it before restoring",
            data_dir.display()
        ));
    }
    // Pass 1: the whole file, nothing written.
    let contents = verify(from, &mut |p| on_progress("verifying", p))?;

    // Pass 2: load into a fresh store beside the target.
    let created = !data_dir.exists();
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let tmp = data_dir.join(format!(".restore-{}", std::process::id()));
    let cleanup = |tmp: &Path| {
        let _ = std::fs::remove_dir_all(tmp);
        if created {
            let _ = std::fs::remove_dir(data_dir);
        }
    };
    let built = (|| -> Result<(Option<Vec<u8>>, Option<crate::wallet::Verification>), String> {
        std::fs::create_dir_all(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let db = Database::create(tmp.join("confab.redb")).map_err(|e| e.to_string())?;
        let (again, secret) = read(from, Some(&db), &mut |p| on_progress("restoring", p))?;
        if again.tables != contents.tables {
            return Err("the backup changed while it was being restored".into());
        }
        // One durable commit at the end makes the whole load durable.
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        drop(db);
        // Same schema: open it as the server would and check the ledger.
        // An older schema is migrated (and checked) by the server on start.
        let wallet = if contents.schema_version == SCHEMA_VERSION {
            let store = store::Store::open(&tmp)?;
            let v = crate::wallet::verify(&store).map_err(|e| e.message)?;
            // A backup that left damaged ledger records out says so; its
            // ledger cannot balance, and that is reported, not refused.
            let incomplete = contents
                .damaged_tables
                .iter()
                .any(|t| t.starts_with("wallet_"));
            if !v.breaches.is_empty() && !incomplete {
                return Err(format!(
                    "the restored ledger fails `wallet verify`: {}",
                    v.breaches.join("; ")
                ));
            }
            Some(v)
        } else {
            None
        };
        Ok((secret, wallet))
    })();
    let (secret, wallet) = match built {
        Ok(x) => x,
        Err(e) => {
            cleanup(&tmp);
            return Err(e);
        }
    };
    // Move into place: only now is anything in the directory replaced. The
    // secret is staged beside the store, then each file is renamed over the
    // old one (atomic), so an interruption leaves either file whole. The
    // search index goes first: it is derived, and must never describe
    // another store than the one beside it.
    let replace = || -> Result<(), String> {
        let search = data_dir.join("search");
        if let Err(e) = std::fs::remove_dir_all(&search)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(format!("cannot remove {}: {e}", search.display()));
        }
        if let Some(s) = &secret {
            use std::os::unix::fs::OpenOptionsExt;
            let staged = tmp.join("jwt_secret");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&staged)
                .map_err(|e| format!("cannot write jwt_secret: {e}"))?;
            f.write_all(s)
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("cannot write jwt_secret: {e}"))?;
        }
        std::fs::rename(tmp.join("confab.redb"), data_dir.join("confab.redb"))
            .map_err(|e| format!("cannot move the restored store into place: {e}"))?;
        if secret.is_some() {
            std::fs::rename(tmp.join("jwt_secret"), data_dir.join("jwt_secret"))
                .map_err(|e| format!("cannot move jwt_secret into place: {e}"))?;
        }
        Ok(())
    };
    if let Err(e) = replace() {
        cleanup(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    sync_dir(&data_dir.join("confab.redb"));
    Ok(Restored {
        contents,
        wallet,
        secret_restored: secret.is_some(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------
// Periodic backups
// ---------------------------------------------------------------------------

/// A file name for a backup taken now: `<prefix>-YYYYMMDD-HHMMSS.cfbk`, in
/// UTC, so names sort by time.
pub fn timestamped_name(prefix: &str) -> String {
    let ms = store::now_ms();
    let (y, m, d) = crate::wallet::civil_from_days(ms.div_euclid(86_400_000));
    let s = ms.rem_euclid(86_400_000) / 1000;
    format!(
        "{prefix}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}{SUFFIX}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

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
    fn every_table_of_the_store_is_in_a_backup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store::Store::open(dir.path()).expect("open");
        let txn = store.db.begin_read().expect("read");
        let mut in_store: Vec<String> = txn
            .list_tables()
            .expect("list")
            .map(|h| h.name().to_string())
            .collect();
        in_store.sort();
        let mut backed_up = table_names();
        backed_up.extend(DERIVED_TABLES.iter().map(|t| t.to_string()));
        backed_up.sort();
        assert_eq!(
            in_store, backed_up,
            "a new table must be added to for_each_table! (or DERIVED_TABLES)"
        );
    }

    #[test]
    fn fields_round_trip() {
        let mut out = Vec::new();
        <(u64, u64, &str)>::put(&(7, 9, "키"), &mut out);
        <&[u8] as Col>::put(&&b"xyz"[..], &mut out);
        let mut r = out.as_slice();
        assert_eq!(
            <(u64, u64, &str)>::take(&mut r).expect("key"),
            (7, 9, "키".to_string())
        );
        assert_eq!(
            <&[u8] as Col>::take(&mut r).expect("value"),
            b"xyz".to_vec()
        );
        assert!(r.is_empty());
        let mut short = &out[..5];
        assert!(<(u64, u64, &str)>::take(&mut short).is_err());
    }

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
    fn only_partials_of_backups_confab_names_itself_are_its_own() {
        for own in [
            "confab-20260101-000000.cfbk.partial",
            "pre-migration-schema2-20261231-235959.cfbk.partial",
            "pre-migration-schema12-20261231-235959.cfbk.partial",
        ] {
            assert!(is_own_partial(own), "{own}");
        }
        for other in [
            "confab-20260101-000000.cfbk",
            "mine.cfbk.partial",
            "confab-latest.cfbk.partial",
            "confab-2026011-000000.cfbk.partial",
            "confab-20260101-00000x.cfbk.partial",
            "pre-migration-schema-20260101-000000.cfbk.partial",
            "pre-migration-schemax-20260101-000000.cfbk.partial",
            "other-20260101-000000.cfbk.partial",
            "confab-20260101-000000.partial",
        ] {
            assert!(!is_own_partial(other), "{other}");
        }
        let name = timestamped_name(PERIODIC_PREFIX) + PARTIAL_SUFFIX;
        assert!(is_own_partial(&name), "{name}");
        let name = timestamped_name(&format!("{PRE_MIGRATION_PREFIX}2")) + PARTIAL_SUFFIX;
        assert!(is_own_partial(&name), "{name}");
    }

    #[test]
    fn stale_partials_are_removed_but_not_one_a_backup_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("confab-20260101-000000.cfbk.partial");
        let held = dir.path().join("confab-20260102-000000.cfbk.partial");
        let foreign = dir.path().join("notes.cfbk.partial");
        for p in [&stale, &held, &foreign] {
            std::fs::write(p, b"x").expect("write");
        }
        let writer = open_partial(&held).expect("open");
        assert_eq!(remove_stale_partials(dir.path()), vec![stale.clone()]);
        assert!(!stale.exists() && held.exists() && foreign.exists());
        // The same partial cannot be opened twice for writing.
        assert!(
            open_partial(&held)
                .expect_err("held")
                .contains("another backup")
        );
        drop(writer);
        assert_eq!(remove_stale_partials(dir.path()), vec![held.clone()]);
    }

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
