//! Reading the source's redb snapshot: tables that may be missing, every
//! entry of one, sealed records unsealed and decoded (a damaged one is an
//! `Err` with the reason, never data), and reads that turn a redb panic on
//! a damaged page into an error that says what to do.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;

use crate::backup;
use crate::store::integrity::Finding;
use crate::store::seal::{self, Rec, SealKey};
use crate::store::{self, MessageRecord};

/// The answer to a batch the database side no longer takes (its own error
/// is the one reported).
pub const STOPPED: &str = "the copy stopped";

/// A failed read of the store, for people.
pub fn err(e: impl std::fmt::Display) -> String {
    format!("reading the store failed: {e} (`confab check` names any damage in it)")
}

/// Runs a read of the store: a redb panic on a damaged page becomes an
/// error that says what to do.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match store::catch_panic(f) {
        Ok(r) => r,
        Err(why) => Err(format!(
            "the store cannot be read: a page of it is damaged ({why}); `confab check` names the damage, `confab backup --skip-damaged` saves everything that can be read, and `confab migrate --from-backup` migrates that"
        )),
    }
}

/// A table of the snapshot (None when the store has none by that name).
pub fn open<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, String> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// Calls `f` with every entry of a table, in key order.
pub fn scan<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
    mut f: impl FnMut(K::SelfType<'_>, V::SelfType<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let Some(table) = open(txn, def)? else {
        return Ok(());
    };
    for entry in table.iter().map_err(err)? {
        let (k, v) = entry.map_err(err)?;
        f(k.value(), v.value())?;
    }
    Ok(())
}

/// A sealed record, unsealed and decoded (Err: why it is damaged).
pub fn unseal<T: DeserializeOwned>(rec: Rec, key: impl SealKey, value: &[u8]) -> Result<T, String> {
    let body = seal::unseal_raw(rec, key.key_bytes().as_slice(), value)?;
    postcard::from_bytes(body).map_err(|e| format!("does not decode: {e}"))
}

/// A stored message: Ok(None) for a lost-message placeholder, Err(why)
/// when damaged.
pub fn unseal_message(room: u64, seq: u64, value: &[u8]) -> Result<Option<MessageRecord>, String> {
    let key = (room, seq).key_bytes();
    if seal::is_lost(key.as_slice(), value) {
        return Ok(None);
    }
    let body = seal::unseal_raw(Rec::Messages, key.as_slice(), value)?;
    MessageRecord::decode_body(body)
        .map(Some)
        .map_err(|e| format!("does not decode: {e}"))
}

/// Entries of a table.
pub fn len<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<u64, String> {
    match open(txn, def)? {
        Some(t) => t.len().map_err(err),
        None => Ok(0),
    }
}

/// Records of a sealed table that unseal and decode as `T`; the others
/// are noted in `damage`.
pub fn readable<K, T>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, &'static [u8]>,
    rec: Rec,
    damage: &mut Damage,
) -> Result<u64, String>
where
    K: redb::Key + 'static,
    for<'a> K::SelfType<'a>: SealKey,
    T: DeserializeOwned,
{
    let mut n = 0;
    scan(txn, def, |k, v| {
        match unseal::<T>(rec, k, v) {
            Ok(_) => n += 1,
            Err(why) => damage.record(rec, k, why),
        }
        Ok(())
    })?;
    Ok(n)
}

/// Damaged records met (and left out).
#[derive(Debug, Default)]
pub struct Damage {
    /// The first [`backup::MAX_NAMED`].
    pub found: Vec<Finding>,
    pub total: u64,
    /// Lost-message placeholders left out.
    pub lost: u64,
}

impl Damage {
    pub fn note(&mut self, f: Finding) {
        self.total += 1;
        if self.found.len() < backup::MAX_NAMED {
            self.found.push(f);
        }
    }

    /// Adds what `other` met.
    pub fn absorb(&mut self, other: Damage) {
        let named = other.found.len() as u64;
        for f in other.found {
            self.note(f);
        }
        self.total += other.total - named;
        self.lost += other.lost;
    }

    pub fn record(&mut self, rec: Rec, key: impl SealKey, why: impl Into<String>) {
        self.note(Finding::record(rec, key.key_bytes().as_slice(), why));
    }
}
