//! The backup file's format and names: its constants, the encoding of
//! each key and value type ([`Col`]), the tables a backup holds
//! ([`for_each_table!`]), what a backup reports ([`Progress`], [`Summary`])
//! and does with damage ([`OnDamage`]), and the names of the backups confab
//! takes itself ([`timestamped_name`]). Everything else in `backup` builds
//! on this file; it imports none of them.

use redb::TableHandle;
use serde::Serialize;

use crate::store;
use crate::store::integrity::Finding;

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
pub(super) fn check_value(table: &str, schema: u64, key: &[u8], v: &[u8]) -> Result<(), String> {
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
pub(super) use for_each_table;

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
}
