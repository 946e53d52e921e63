//! The report of a check ([`Finding`], [`Report`], [`Progress`]) and
//! [`check`], which verifies everything in one snapshot: every record's
//! checksum and decoding, every page of every table readable, every room's
//! seq chain and `message_log` against it, and the ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use redb::{ReadTransaction, ReadableTable, TableDefinition};
use serde::Serialize;

use super::super::seal::{Rec, SealKey};
use super::super::{MESSAGE_LOG, MESSAGES};
use super::super::{Verdict, verify_value};
use super::visit::{Item, catch, s, visit_messages};
use crate::error::ApiError;

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
    pub(super) fn new(kind: &str, table: &str, what: impl Into<String>) -> Finding {
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

    pub(super) fn page(table: &str, after: Option<String>, why: &str) -> Finding {
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

    pub(super) fn add(&mut self, f: Finding) {
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
    pub(super) fn add(&mut self, seq: u64) {
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
/// not verified here (see [`engine_check`](super::engine_check)).
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
        schema_version: super::super::schema_version(txn)
            .ok()
            .flatten()
            .unwrap_or(0),
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
    check_sealed_u64(txn, super::super::USERS, Rec::Users, schema, t);
    check_sealed_u64(txn, super::super::ROOMS, Rec::Rooms, schema, t);
    check_sealed_pair(txn, super::super::MEMBERS, Rec::Members, schema, t);
    check_sealed_pair(
        txn,
        super::super::WALLET_ENTRIES,
        Rec::WalletEntries,
        schema,
        t,
    );
    check_sealed_u64(
        txn,
        super::super::WALLET_TRANSFERS,
        Rec::WalletTransfers,
        schema,
        t,
    );
    check_sealed_u64(txn, super::super::PRIVACY, Rec::Privacy, schema, t);
    check_sealed_u64(
        txn,
        super::super::CLUSTER_OUTBOX,
        Rec::ClusterOutbox,
        schema,
        t,
    );
    check_plain(txn, super::super::META, t);
    check_plain(txn, super::super::USERNAMES, t);
    check_plain(txn, super::super::CONTACTS, t);
    check_plain(txn, super::super::USER_ROOMS, t);
    check_plain(txn, super::super::CLIENT_IDS, t);
    check_plain(txn, super::super::REVOKED, t);
    check_plain(txn, super::super::LAST_SEEN, t);
    check_plain(txn, super::super::WALLET_ACCOUNTS, t);
    check_plain(txn, super::super::WALLET_KEYS, t);
    check_plain(txn, super::super::WALLET_USER_TRANSFERS, t);
    check_plain(txn, super::super::WALLET_SCHEDULE, t);
    check_plain(txn, super::super::WALLET_PENDING, t);

    // The ledger (only where its records are sealed: an older store is
    // checked after its migration).
    if schema >= 4 {
        match super::super::guard("the ledger", || ledger(txn)) {
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
