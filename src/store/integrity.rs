//! Finding damage: reads that survive it (a record that fails its checksum,
//! a page redb cannot read), `confab check` (the whole store), and the
//! server's background scrub.
//!
//! - [`visit_messages`] walks `messages` in key order and, when a page
//!   cannot be read, goes on past it: the rooms after it one by one, and
//!   the keys it hid (known from `message_log`) by point lookups, naming
//!   each one it cannot read. Backups (`--skip-damaged`), exports and
//!   `confab check` use it.
//! - [`check`] verifies everything in one snapshot: every record's checksum
//!   and decoding, every page of every table readable, every room's seq
//!   chain (1..=last, no gaps) and `message_log` against it, and the
//!   ledger (`wallet verify`). [`engine_check`] adds redb's own page
//!   checksums when the store can be opened by this process alone.
//! - [`scrub`] is the background version of the record check: small read
//!   transactions with pauses, on a low-priority thread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{ReadTransaction, ReadableTable, TableDefinition};
use serde::Serialize;

use super::seal::{self, Rec, SealKey};
use super::{MESSAGE_LOG, MESSAGES};
use super::{Verdict, verify_value};
use crate::error::ApiError;

/// Runs `f`, turning a panic (inside redb, on a damaged page) into
/// Err(its message).
pub fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match super::catch_panic(f) {
        Ok(r) => r,
        Err(why) => {
            metrics::counter!("confab_store_read_failures_total", "kind" => "panic").increment(1);
            Err(format!("redb panicked: {why}"))
        }
    }
}

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------
// Walking `messages` past damage
// ---------------------------------------------------------------------------

/// What [`visit_messages`] meets.
pub enum Item<'a> {
    /// A stored value (not yet checked: see [`verify_value`]).
    Record {
        room: u64,
        seq: u64,
        value: &'a [u8],
    },
    /// A message `message_log` knows of whose page cannot be read.
    Unreachable { room: u64, seq: u64 },
    /// A range scan broke off: after `after` (the last key read, None: at
    /// the start of the scan), because of `why`.
    Page {
        after: Option<(u64, u64)>,
        why: String,
    },
}

/// How a range scan ended.
enum Scan<E> {
    Done,
    /// The callback failed: stop, with its error.
    Stopped(E),
    /// A damaged page: the last key read before it, and why.
    Broke(Option<(u64, u64)>, String),
}

fn scan_range<E>(
    txn: &ReadTransaction,
    lo: (u64, u64),
    hi: (u64, u64),
    f: &mut dyn FnMut(Item<'_>) -> Result<(), E>,
) -> Scan<E> {
    let mut last = None;
    let mut stopped = None;
    let r = catch(|| {
        let t = txn.open_table(MESSAGES).map_err(s)?;
        for e in t.range(lo..=hi).map_err(s)? {
            let (k, v) = e.map_err(s)?;
            let (room, seq) = k.value();
            if let Err(e) = f(Item::Record {
                room,
                seq,
                value: v.value(),
            }) {
                stopped = Some(e);
                return Ok(());
            }
            last = Some((room, seq));
        }
        Ok(())
    });
    match (r, stopped) {
        (_, Some(e)) => Scan::Stopped(e),
        (Ok(()), None) => Scan::Done,
        (Err(why), None) => Scan::Broke(last, why),
    }
}

/// One message by key, past a damaged neighbourhood.
fn point<E>(
    txn: &ReadTransaction,
    room: u64,
    seq: u64,
    f: &mut dyn FnMut(Item<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut out = None;
    let r = catch(|| {
        let t = txn.open_table(MESSAGES).map_err(s)?;
        if let Some(g) = t.get((room, seq)).map_err(s)? {
            out = Some(f(Item::Record {
                room,
                seq,
                value: g.value(),
            }));
        }
        Ok(())
    });
    match (r, out) {
        (_, Some(res)) => res,
        (Ok(()), None) => Ok(()),
        (Err(_), None) => f(Item::Unreachable { room, seq }),
    }
}

/// The seqs `message_log` lists for each of `rooms` at or after its start
/// (sorted), and, when `all_after` is given, every room it lists after
/// that id. Err when the log cannot be read either.
#[allow(clippy::type_complexity)]
fn from_log(
    txn: &ReadTransaction,
    rooms: &HashMap<u64, u64>,
    all_after: Option<u64>,
) -> Result<(HashMap<u64, Vec<u64>>, BTreeSet<u64>), String> {
    catch(|| {
        let log = txn.open_table(MESSAGE_LOG).map_err(s)?;
        let mut seqs: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut later = BTreeSet::new();
        for e in log.iter().map_err(s)? {
            let (_, v) = e.map_err(s)?;
            let (room, seq) = v.value();
            if let Some(&from) = rooms.get(&room)
                && seq >= from
            {
                seqs.entry(room).or_default().push(seq);
            }
            if all_after.is_some_and(|a| room > a) {
                later.insert(room);
            }
        }
        for v in seqs.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        Ok((seqs, later))
    })
}

/// Visits the stored messages of `room` (of every room when None), in key
/// order, going on past damaged pages (see the module docs): after a
/// [`Item::Page`], the rest of that room follows key by key (from the log;
/// [`Item::Unreachable`] for each it cannot read) and, for every room,
/// the other rooms one by one — a room whose own scan breaks has its tail
/// visited after the others. Stops at the first error of `f`.
pub fn visit_messages<E>(
    txn: &ReadTransaction,
    room: Option<u64>,
    f: &mut dyn FnMut(Item<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let (lo, hi) = match room {
        Some(r) => ((r, 0), (r, u64::MAX)),
        None => ((0, 0), (u64::MAX, u64::MAX)),
    };
    let (last, why) = match scan_range(txn, lo, hi, f) {
        Scan::Done => return Ok(()),
        Scan::Stopped(e) => return Err(e),
        Scan::Broke(last, why) => (last, why),
    };
    f(Item::Page {
        after: last,
        why: why.clone(),
    })?;
    // Where the broken scan's room goes on from.
    let (r0, s0) = match (last, room) {
        (Some((r, q)), _) => (r, q + 1),
        (None, Some(r)) => (r, 0),
        (None, None) => (0, 0),
    };
    let mut tails: HashMap<u64, u64> = HashMap::from([(r0, s0)]);
    if room.is_none() {
        // The other rooms, each scanned by itself.
        let (_, later) = match from_log(txn, &HashMap::new(), Some(r0)) {
            Ok(x) => x,
            Err(why) => {
                return f(Item::Page {
                    after: None,
                    why: format!("message_log: {why}"),
                });
            }
        };
        for r in later {
            match scan_range(txn, (r, 0), (r, u64::MAX), f) {
                Scan::Done => {}
                Scan::Stopped(e) => return Err(e),
                Scan::Broke(last, why) => {
                    f(Item::Page { after: last, why })?;
                    tails.insert(r, last.map_or(0, |(_, q)| q + 1));
                }
            }
        }
    }
    let (seqs, _) = match from_log(txn, &tails, None) {
        Ok(x) => x,
        Err(why) => {
            return f(Item::Page {
                after: None,
                why: format!("message_log: {why}"),
            });
        }
    };
    let mut rooms: Vec<&u64> = tails.keys().collect();
    rooms.sort_unstable();
    for r in rooms {
        for &q in seqs.get(r).map(Vec::as_slice).unwrap_or(&[]) {
            point(txn, *r, q, f)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// One piece of damage or inconsistency.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Finding {
    /// `record` (checksum or decoding), `page` (redb could not read on),
    /// `unreachable` (a logged message on such a page), `chain` (a room's
    /// seqs), `log` (`message_log` against `messages`), `ledger`, `engine`.
    pub kind: String,
    pub table: String,
    /// The key in words ("room 00ab… seq 7"), when there is one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub room: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seq: Option<u64>,
    pub what: String,
}

impl Finding {
    fn new(kind: &str, table: &str, what: impl Into<String>) -> Finding {
        Finding {
            kind: kind.into(),
            table: table.into(),
            key: None,
            room: None,
            seq: None,
            what: what.into(),
        }
    }

    /// A damaged record of `rec` at `key`.
    pub fn record(rec: Rec, key: &[u8], what: impl Into<String>) -> Finding {
        let mut f = Finding::new("record", rec.table(), what);
        f.key = Some(rec.describe(key));
        if rec == Rec::Messages && key.len() == 16 {
            let (r, q) = pair(key);
            f.room = Some(format!("{r:016x}"));
            f.seq = Some(q);
        }
        f
    }

    fn message(kind: &str, room: u64, seq: u64, what: impl Into<String>) -> Finding {
        let mut f = Finding::new(kind, "messages", what);
        f.key = Some(format!("room {room:016x} seq {seq}"));
        f.room = Some(format!("{room:016x}"));
        f.seq = Some(seq);
        f
    }

    fn page(table: &str, after: Option<String>, why: &str) -> Finding {
        let mut f = Finding::new(
            "page",
            table,
            format!(
                "cannot read on {}: {why}",
                after
                    .as_deref()
                    .map_or("from its start".to_string(), |k| format!("after {k}"))
            ),
        );
        f.key = after;
        f
    }

    /// One line for a person.
    pub fn line(&self) -> String {
        match &self.key {
            Some(k) if self.kind != "page" => {
                format!("{} {} {k}: {}", self.kind, self.table, self.what)
            }
            _ => format!("{} {}: {}", self.kind, self.table, self.what),
        }
    }
}

fn pair(key: &[u8]) -> (u64, u64) {
    let f = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&key[i * 8..i * 8 + 8]);
        u64::from_le_bytes(a)
    };
    (f(0), f(1))
}

/// Findings kept in a report (the count goes on).
const MAX_FINDINGS: usize = 1000;

/// What `confab check` found.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Report {
    pub schema_version: u64,
    /// redb's page checksums: "verified", "damaged: …", or "not checked: …".
    pub engine: String,
    /// Records read per table.
    pub tables: BTreeMap<String, u64>,
    pub rooms: u64,
    pub messages: u64,
    /// Lost-message placeholders (from a `--skip-damaged` backup): known
    /// losses, not new damage.
    pub lost: u64,
    /// Every finding (the first [`MAX_FINDINGS`]).
    pub damage: Vec<Finding>,
    pub damage_total: u64,
    pub ledger_breaches: u64,
    pub seconds: f64,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.damage_total == 0
    }

    fn add(&mut self, f: Finding) {
        self.damage_total += 1;
        if self.damage.len() < MAX_FINDINGS {
            self.damage.push(f);
        }
    }
}

/// How far a check has got (messages checked of those logged).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Progress {
    pub messages: u64,
    pub total_messages: u64,
}

// ---------------------------------------------------------------------------
// The whole check
// ---------------------------------------------------------------------------

/// Per-room figures of seqs: count, least, greatest, sum, sum of squares
/// (two sets of keys with equal figures are, for any damage, the same).
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Seqs {
    count: u64,
    min: u64,
    max: u64,
    sum: u128,
    sq: u128,
}

impl Seqs {
    fn add(&mut self, seq: u64) {
        if self.count == 0 || seq < self.min {
            self.min = seq;
        }
        self.max = self.max.max(seq);
        self.count += 1;
        self.sum += u128::from(seq);
        self.sq += u128::from(seq) * u128::from(seq);
    }
}

macro_rules! check_sealed_fn {
    ($name:ident, $k:ty) => {
        /// Reads every record of a sealed table and checks it.
        fn $name(
            txn: &ReadTransaction,
            def: TableDefinition<$k, &'static [u8]>,
            rec: Rec,
            schema: u64,
            report: &mut Report,
        ) {
            let mut n = 0u64;
            let mut last: Option<$k> = None;
            let mut found = Vec::new();
            let r = catch(|| {
                let t = match txn.open_table(def) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                    Err(e) => return Err(s(e)),
                };
                for e in t.iter().map_err(s)? {
                    let (k, v) = e.map_err(s)?;
                    let key = k.value();
                    let kb = key.key_bytes();
                    if let Err(why) = verify_value(rec.table(), schema, kb.as_slice(), v.value()) {
                        found.push(Finding::record(rec, kb.as_slice(), why));
                    }
                    n += 1;
                    last = Some(key);
                }
                Ok(())
            });
            for f in found {
                report.add(f);
            }
            if let Err(why) = r {
                let after = last.map(|k| rec.describe(k.key_bytes().as_slice()));
                report.add(Finding::page(rec.table(), after, &why));
            }
            report.tables.insert(rec.table().to_string(), n);
        }
    };
}
check_sealed_fn!(check_sealed_u64, u64);
check_sealed_fn!(check_sealed_pair, (u64, u64));

/// Reads every entry of a table without records of its own (redb decodes
/// its fixed-width values); a page it cannot read on is a finding.
fn check_plain<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
    report: &mut Report,
) {
    use redb::TableHandle;
    let name = def.name().to_string();
    let mut n = 0u64;
    let r = catch(|| {
        let t = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(s(e)),
        };
        for e in t.iter().map_err(s)? {
            let (k, v) = e.map_err(s)?;
            // Decode both, so a damaged length or offset shows.
            drop((k.value(), v.value()));
            n += 1;
        }
        Ok(())
    });
    if let Err(why) = r {
        report.add(Finding::page(&name, Some(format!("{n} entries")), &why));
    }
    report.tables.insert(name, n);
}

/// Verifies the whole store in the snapshot `txn`: every record (checksum
/// and decoding), every page readable, every room's seq chain and
/// `message_log` against it, and the ledger. redb's own page checksums are
/// not verified here (see [`engine_check`]).
/// The wallet's ledger check over a snapshot: its breaches (none = sound).
/// The store holds the ledger's records; its rules are the wallet's, which
/// hands this in (`wallet::ledger_check`).
pub type LedgerCheck<'a> = &'a dyn Fn(&ReadTransaction) -> Result<Vec<String>, ApiError>;

pub fn check(
    txn: &ReadTransaction,
    ledger: LedgerCheck<'_>,
    on_progress: &mut dyn FnMut(Progress),
) -> Report {
    let started = Instant::now();
    let mut report = Report {
        schema_version: super::schema_version(txn).ok().flatten().unwrap_or(0),
        engine: "not checked".into(),
        ..Default::default()
    };
    let schema = report.schema_version;
    let total = catch(|| {
        let log = txn.open_table(MESSAGE_LOG).map_err(s)?;
        Ok(log.last().map_err(s)?.map_or(0, |(k, _)| k.value()))
    })
    .unwrap_or(0);
    let mut progress = Progress {
        messages: 0,
        total_messages: total,
    };
    on_progress(progress);

    // Messages: every record, and each room's seqs.
    let mut rooms: HashMap<u64, Seqs> = HashMap::new();
    let mut found = Vec::new();
    let mut n = 0u64;
    let mut last_shown = Instant::now();
    let _ = visit_messages::<()>(txn, None, &mut |item| {
        match item {
            Item::Record { room, seq, value } => {
                let kb = (room, seq).key_bytes();
                match verify_value("messages", schema, kb.as_slice(), value) {
                    Ok(Verdict::Good) => {}
                    Ok(Verdict::Lost) => report.lost += 1,
                    Err(why) => found.push(Finding::record(Rec::Messages, kb.as_slice(), why)),
                }
                rooms.entry(room).or_default().add(seq);
                n += 1;
            }
            Item::Unreachable { room, seq } => {
                found.push(Finding::message(
                    "unreachable",
                    room,
                    seq,
                    "on a damaged page: cannot be read",
                ));
                // It exists (the log says so): the chain counts it.
                rooms.entry(room).or_default().add(seq);
            }
            Item::Page { after, why } => {
                found.push(Finding::page(
                    "messages",
                    after.map(|(r, q)| format!("room {r:016x} seq {q}")),
                    &why,
                ));
            }
        }
        progress.messages += 1;
        if last_shown.elapsed() >= Duration::from_millis(100) {
            last_shown = Instant::now();
            on_progress(progress);
        }
        Ok(())
    });
    for f in found {
        report.add(f);
    }
    report.tables.insert("messages".into(), n);
    report.messages = n;
    report.rooms = rooms.len() as u64;

    // Each room's chain: 1..=last, every seq once.
    let mut broken: Vec<(&u64, &Seqs)> = rooms
        .iter()
        .filter(|(_, q)| q.min != 1 || q.count != q.max)
        .collect();
    broken.sort_unstable_by_key(|(r, _)| **r);
    for (&room, q) in broken {
        let gaps = gaps_of(txn, room, q.max);
        let mut f = Finding::new(
            "chain",
            "messages",
            format!(
                "seqs are not 1..={} without gaps: {} stored{}",
                q.max,
                q.count,
                match gaps {
                    Some(g) if !g.is_empty() => format!(", missing {g}"),
                    _ => String::new(),
                }
            ),
        );
        f.room = Some(format!("{room:016x}"));
        f.key = Some(format!("room {room:016x}"));
        report.add(f);
    }

    // message_log: positions 1..=N, and per room the same seqs as messages.
    let log = catch(|| {
        let t = match txn.open_table(MESSAGE_LOG) {
            // A schema-1 store has no log yet (its migration numbers them).
            Ok(_) if schema < 2 => return Ok(None),
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(s(e)),
        };
        let mut per: HashMap<u64, Seqs> = HashMap::new();
        let mut count = 0u64;
        let mut last = 0u64;
        for e in t.iter().map_err(s)? {
            let (k, v) = e.map_err(s)?;
            let (room, seq) = v.value();
            per.entry(room).or_default().add(seq);
            count += 1;
            last = k.value();
        }
        Ok(Some((per, count, last)))
    });
    match log {
        Ok(None) => {}
        Ok(Some((per, count, last))) => {
            report.tables.insert("message_log".into(), count);
            if count != last {
                report.add(Finding::new(
                    "log",
                    "message_log",
                    format!("{count} positions, but the last is {last}"),
                ));
            }
            let mut ids: BTreeSet<u64> = per.keys().copied().collect();
            ids.extend(rooms.keys().copied());
            for room in ids {
                let a = rooms.get(&room).copied().unwrap_or_default();
                let b = per.get(&room).copied().unwrap_or_default();
                if a != b {
                    let mut f = Finding::new(
                        "log",
                        "message_log",
                        format!(
                            "lists {} messages of the room (up to seq {}), messages holds {} (up to seq {})",
                            b.count, b.max, a.count, a.max
                        ),
                    );
                    f.room = Some(format!("{room:016x}"));
                    f.key = Some(format!("room {room:016x}"));
                    report.add(f);
                }
            }
        }
        Err(why) => report.add(Finding::page("message_log", None, &why)),
    }

    // The other record tables, then the plain ones.
    let t = &mut report;
    check_sealed_u64(txn, super::USERS, Rec::Users, schema, t);
    check_sealed_u64(txn, super::ROOMS, Rec::Rooms, schema, t);
    check_sealed_pair(txn, super::MEMBERS, Rec::Members, schema, t);
    check_sealed_pair(txn, super::WALLET_ENTRIES, Rec::WalletEntries, schema, t);
    check_sealed_u64(
        txn,
        super::WALLET_TRANSFERS,
        Rec::WalletTransfers,
        schema,
        t,
    );
    check_sealed_u64(txn, super::PRIVACY, Rec::Privacy, schema, t);
    check_sealed_u64(txn, super::CLUSTER_OUTBOX, Rec::ClusterOutbox, schema, t);
    check_plain(txn, super::META, t);
    check_plain(txn, super::USERNAMES, t);
    check_plain(txn, super::CONTACTS, t);
    check_plain(txn, super::USER_ROOMS, t);
    check_plain(txn, super::CLIENT_IDS, t);
    check_plain(txn, super::REVOKED, t);
    check_plain(txn, super::LAST_SEEN, t);
    check_plain(txn, super::WALLET_ACCOUNTS, t);
    check_plain(txn, super::WALLET_KEYS, t);
    check_plain(txn, super::WALLET_USER_TRANSFERS, t);
    check_plain(txn, super::WALLET_SCHEDULE, t);
    check_plain(txn, super::WALLET_PENDING, t);

    // The ledger (only where its records are sealed: an older store is
    // checked after its migration).
    if schema >= 4 {
        match super::guard("the ledger", || ledger(txn)) {
            Ok(breaches) => {
                report.ledger_breaches = breaches.len() as u64;
                for b in breaches {
                    report.add(Finding::new("ledger", "wallet", b));
                }
            }
            Err(e) => report.add(Finding::new(
                "ledger",
                "wallet",
                format!("cannot be verified: {}", e.message),
            )),
        }
    }
    progress.messages = progress.messages.max(progress.total_messages);
    on_progress(progress);
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// The seqs missing from `room`'s 1..=max, in words (None when its keys
/// cannot be read).
fn gaps_of(txn: &ReadTransaction, room: u64, max: u64) -> Option<String> {
    let seqs: Vec<u64> = catch(|| {
        let t = txn.open_table(MESSAGES).map_err(s)?;
        let mut v = Vec::new();
        for e in t.range((room, 0)..=(room, u64::MAX)).map_err(s)? {
            v.push(e.map_err(s)?.0.value().1);
        }
        Ok(v)
    })
    .ok()?;
    let mut missing = Vec::new();
    let mut next = 1u64;
    let mut extra = 0;
    for q in seqs.into_iter().chain(std::iter::once(max + 1)) {
        if q > next {
            if missing.len() < 10 {
                missing.push(if q - 1 == next {
                    next.to_string()
                } else {
                    format!("{next}..={}", q - 1)
                });
            } else {
                extra += 1;
            }
        }
        next = next.max(q + 1);
    }
    if extra > 0 {
        missing.push(format!("and {extra} more"));
    }
    Some(missing.join(", "))
}

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
            db: &super::db::Db,
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
                        if let Err(why) = verify_value(rec.table(), super::SCHEMA_VERSION, kb.as_slice(), v.value()) {
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
fn scrub_pass(db: &super::db::Db, stop: &dyn Fn() -> bool) -> (u64, Vec<Finding>) {
    let mut found = Vec::new();
    let mut n = 0;
    n += scrub_pair(db, MESSAGES, Rec::Messages, stop, &mut found);
    n += scrub_u64(db, super::USERS, Rec::Users, stop, &mut found);
    n += scrub_u64(db, super::ROOMS, Rec::Rooms, stop, &mut found);
    n += scrub_pair(db, super::MEMBERS, Rec::Members, stop, &mut found);
    n += scrub_pair(
        db,
        super::WALLET_ENTRIES,
        Rec::WalletEntries,
        stop,
        &mut found,
    );
    n += scrub_u64(
        db,
        super::WALLET_TRANSFERS,
        Rec::WalletTransfers,
        stop,
        &mut found,
    );
    n += scrub_u64(db, super::PRIVACY, Rec::Privacy, stop, &mut found);
    n += scrub_u64(
        db,
        super::CLUSTER_OUTBOX,
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
    db: std::sync::Arc<super::db::Db>,
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
    db: &super::db::Db,
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
            st.last_started_at = Some(super::now_ms());
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
        st.last_finished_at = Some(super::now_ms());
        st.last_seconds = Some(secs);
        st.last_records = n;
        st.last_damage_total = found.len() as u64;
        st.last_damage = found.into_iter().take(20).collect();
    }
}
