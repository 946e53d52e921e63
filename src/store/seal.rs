//! Record checksums (store schema 4).
//!
//! Every value of the tables that hold encoded records — `users`, `rooms`,
//! `members`, `messages`, `wallet_entries`, `wallet_transfers`, `privacy`,
//! `cluster_outbox` — is stored *sealed*: the record's bytes followed by a
//! CRC-32 (IEEE, `crc32fast`, little-endian) of the table's name, a zero
//! byte, the key's bytes (every field as 8 little-endian bytes, in order)
//! and the record's bytes. Covering the key and the table means a value
//! that turns up under another key (a damaged page, a misdirected write)
//! fails its check as surely as flipped bits in it.
//!
//! Every read unseals: a value whose checksum does not match (or that does
//! not decode) is **damaged**. It is never served as if it were right: a
//! message becomes an unreadable placeholder (see [`super::Message`]),
//! anything else a `storage_damaged`. Each damaged record is reported once
//! by the process that opened the store: a warn log naming the table and
//! the key (room and seq for a message) and
//! `confab_store_damaged_records_total{table}`. What has been reported is
//! kept by the store's `Db` ([`DamageLog`]).
//!
//! A `messages` value whose sealed record is empty is a **lost** message: a
//! placeholder `confab backup --skip-damaged` writes for a message it could
//! not read, so that the room's seq chain stays whole. It is served as
//! unreadable too, but it is not new damage.
//!
//! The tables of fixed-width values (ids, counters, times) cannot carry a
//! checksum of their own; redb's page checksums, verified by `confab check`
//! with the server stopped, cover them.

use serde::Deserialize;

use crate::error::ApiError;

/// Bytes of the checksum after a sealed record.
pub const CHECKSUM_LEN: usize = 4;

/// A table whose values are sealed records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rec {
    Users,
    Rooms,
    Members,
    Messages,
    WalletEntries,
    WalletTransfers,
    Privacy,
    ClusterOutbox,
}

impl Rec {
    pub const ALL: [Rec; 8] = [
        Rec::Users,
        Rec::Rooms,
        Rec::Members,
        Rec::Messages,
        Rec::WalletEntries,
        Rec::WalletTransfers,
        Rec::Privacy,
        Rec::ClusterOutbox,
    ];

    /// The table's name in the store (and in backups and metrics).
    pub fn table(self) -> &'static str {
        match self {
            Rec::Users => "users",
            Rec::Rooms => "rooms",
            Rec::Members => "members",
            Rec::Messages => "messages",
            Rec::WalletEntries => "wallet_entries",
            Rec::WalletTransfers => "wallet_transfers",
            Rec::Privacy => "privacy",
            Rec::ClusterOutbox => "cluster_outbox",
        }
    }

    pub fn by_table(name: &str) -> Option<Rec> {
        Rec::ALL.into_iter().find(|r| r.table() == name)
    }

    /// What one record is, for messages.
    fn what(self) -> &'static str {
        match self {
            Rec::Users => "user",
            Rec::Rooms => "room",
            Rec::Members => "member",
            Rec::Messages => "message",
            Rec::WalletEntries => "ledger entry",
            Rec::WalletTransfers => "transfer",
            Rec::Privacy => "privacy",
            Rec::ClusterOutbox => "outbox",
        }
    }

    /// A key (its checksum bytes) in words: "room 00ab… seq 7".
    pub fn describe(self, key: &[u8]) -> String {
        let a = field(key, 0);
        let b = field(key, 1);
        match (self, a, b) {
            (Rec::Messages, Some(r), Some(s)) => format!("room {r:016x} seq {s}"),
            (Rec::Members, Some(r), Some(u)) => format!("room {r:016x} user {u:016x}"),
            (Rec::WalletEntries, Some(a), Some(n)) => format!("account {a:016x} entry {n}"),
            (Rec::Users | Rec::Privacy, Some(u), None) => format!("user {u:016x}"),
            (Rec::Rooms, Some(r), None) => format!("room {r:016x}"),
            (Rec::WalletTransfers, Some(t), None) => format!("transfer {t:016x}"),
            (Rec::ClusterOutbox, Some(n), None) => format!("entry {n}"),
            _ => format!("key {}", hex::encode(key)),
        }
    }
}

/// The `i`-th 8-byte field of key bytes.
fn field(key: &[u8], i: usize) -> Option<u64> {
    let b = key.get(i * 8..i * 8 + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// A key of a sealed table, as the checksum covers it.
pub trait SealKey: Copy {
    /// The key's bytes: every field as 8 little-endian bytes.
    fn key_bytes(self) -> KeyBytes;
}

/// Up to two 8-byte fields.
#[derive(Clone, Copy)]
pub struct KeyBytes {
    buf: [u8; 16],
    len: usize,
}

impl KeyBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl SealKey for u64 {
    fn key_bytes(self) -> KeyBytes {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&self.to_le_bytes());
        KeyBytes { buf, len: 8 }
    }
}

impl SealKey for (u64, u64) {
    fn key_bytes(self) -> KeyBytes {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&self.0.to_le_bytes());
        buf[8..].copy_from_slice(&self.1.to_le_bytes());
        KeyBytes { buf, len: 16 }
    }
}

/// The checksum of `body` stored in `rec`'s table under `key`.
pub fn checksum(rec: Rec, key: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(rec.table().as_bytes());
    h.update(&[0]);
    h.update(key);
    h.update(body);
    h.finalize()
}

/// `body` sealed for `rec`'s table under `key`: what is stored.
pub fn seal(rec: Rec, key: impl SealKey, mut body: Vec<u8>) -> Vec<u8> {
    let c = checksum(rec, key.key_bytes().as_slice(), &body);
    body.extend_from_slice(&c.to_le_bytes());
    body
}

/// [`seal`] with the key given as its bytes.
pub fn seal_raw(rec: Rec, key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + CHECKSUM_LEN);
    out.extend_from_slice(body);
    out.extend_from_slice(&checksum(rec, key, body).to_le_bytes());
    out
}

/// The record inside a stored value, if its checksum matches.
pub fn unseal_raw<'a>(rec: Rec, key: &[u8], value: &'a [u8]) -> Result<&'a [u8], String> {
    let Some(split) = value.len().checked_sub(CHECKSUM_LEN) else {
        return Err(format!(
            "the value is {} bytes, shorter than its checksum",
            value.len()
        ));
    };
    let (body, sum) = value.split_at(split);
    let mut a = [0u8; CHECKSUM_LEN];
    a.copy_from_slice(sum);
    let stored = u32::from_le_bytes(a);
    let computed = checksum(rec, key, body);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    Ok(body)
}

/// Whether a message value is a lost-message placeholder (an empty sealed
/// record; see the module docs). Checks the checksum too.
pub fn is_lost(key: &[u8], value: &[u8]) -> bool {
    value.len() == CHECKSUM_LEN && unseal_raw(Rec::Messages, key, value).is_ok()
}

/// A lost-message placeholder for `key`.
pub fn lost(key: &[u8]) -> Vec<u8> {
    seal_raw(Rec::Messages, key, &[])
}

/// The record in a stored value, reporting damage (see [`report`]) and
/// answering `storage_damaged` when there is any.
pub fn unseal<K: SealKey>(rec: Rec, key: K, value: &[u8]) -> Result<&[u8], ApiError> {
    let kb = key.key_bytes();
    unseal_raw(rec, kb.as_slice(), value).map_err(|why| {
        report(rec, kb.as_slice(), &why);
        damaged_error(rec, kb.as_slice())
    })
}

/// Unseals and decodes a stored record (postcard), reporting damage.
pub fn open<'a, T: Deserialize<'a>, K: SealKey>(
    rec: Rec,
    key: K,
    value: &'a [u8],
) -> Result<T, ApiError> {
    let body = unseal(rec, key, value)?;
    postcard::from_bytes(body).map_err(|e| {
        let kb = key.key_bytes();
        report(rec, kb.as_slice(), &format!("does not decode: {e}"));
        damaged_error(rec, kb.as_slice())
    })
}

/// The answer to a request that needed a damaged record.
pub fn damaged_error(rec: Rec, key: &[u8]) -> ApiError {
    ApiError::damaged(format!(
        "a stored {} record ({}) is damaged and cannot be read; the operator has been told",
        rec.what(),
        rec.describe(key)
    ))
}

/// The damaged records one store has met, each reported once: the ones
/// reported so far (table, key) and how many (`/api/v1/status`). The
/// store's [`super::db::Db`] owns it; the reads of that store report into
/// it through [`DamageLog::scope`].
#[derive(Default)]
pub struct DamageLog {
    seen: std::sync::Mutex<std::collections::HashSet<(Rec, Vec<u8>)>>,
    count: std::sync::atomic::AtomicU64,
}

thread_local! {
    /// The log this thread's reads report into while it runs a
    /// [`DamageLog::scope`]. Per thread and set only for the scope (a read
    /// deep in a query has no store to ask), so it is not shared state:
    /// each store's log is its own.
    static REPORTING_TO: std::cell::RefCell<Option<std::sync::Arc<DamageLog>>> =
        const { std::cell::RefCell::new(None) };
}

impl DamageLog {
    /// Runs `f`, reporting the damage it meets on this thread into this
    /// log (the innermost scope's, when scopes nest).
    pub fn scope<T>(self: &std::sync::Arc<Self>, f: impl FnOnce() -> T) -> T {
        /// Puts the outer scope's log back, also when `f` panics.
        struct Restore(Option<std::sync::Arc<DamageLog>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let outer = self.0.take();
                let _ = REPORTING_TO.try_with(|r| *r.borrow_mut() = outer);
            }
        }
        let _restore = Restore(REPORTING_TO.with(|r| r.borrow_mut().replace(self.clone())));
        f()
    }

    /// Distinct damaged records found in this store by this process.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes a damaged record; whether it is new to this log.
    fn note(&self, rec: Rec, key: &[u8]) -> bool {
        let new = {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.len() >= 100_000 {
                seen.clear();
            }
            seen.insert((rec, key.to_vec()))
        };
        if new {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        new
    }
}

/// Reports a damaged record: a warn log naming the table and key (room and
/// seq for a message) and `confab_store_damaged_records_total{table}` — the
/// first time the store's [`DamageLog`] meets it (later reads log at debug;
/// a read outside any log's scope reports every time). Returns whether it
/// was new.
pub fn report(rec: Rec, key: &[u8], why: &str) -> bool {
    let new = REPORTING_TO
        .with(|r| r.borrow().as_ref().map(|log| log.note(rec, key)))
        .unwrap_or(true);
    let what = rec.describe(key);
    if new {
        metrics::counter!("confab_store_damaged_records_total", "table" => rec.table())
            .increment(1);
        match (rec, field(key, 0), field(key, 1)) {
            (Rec::Messages, Some(room), Some(seq)) => tracing::warn!(
                table = rec.table(),
                key = %what,
                room = format!("{room:016x}"),
                seq,
                why,
                "damaged record: served as unreadable"
            ),
            _ => tracing::warn!(table = rec.table(), key = %what, why, "damaged record"),
        }
    } else {
        tracing::debug!(table = rec.table(), key = %what, why, "damaged record (known)");
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Verdict, verify_value};

    #[test]
    fn a_sealed_record_opens_and_any_change_is_caught() {
        let v = seal(Rec::Messages, (7u64, 3u64), b"hello".to_vec());
        assert_eq!(v.len(), 5 + CHECKSUM_LEN);
        let k = (7u64, 3u64).key_bytes();
        assert_eq!(
            unseal_raw(Rec::Messages, k.as_slice(), &v),
            Ok(&b"hello"[..])
        );
        // Flipped bits anywhere.
        for i in 0..v.len() {
            for bit in 0..8 {
                let mut bad = v.clone();
                bad[i] ^= 1 << bit;
                assert!(unseal_raw(Rec::Messages, k.as_slice(), &bad).is_err());
            }
        }
        // The same value under another key or in another table.
        let other = (7u64, 4u64).key_bytes();
        assert!(unseal_raw(Rec::Messages, other.as_slice(), &v).is_err());
        assert!(unseal_raw(Rec::Members, k.as_slice(), &v).is_err());
        assert!(unseal_raw(Rec::Messages, k.as_slice(), &v[..2]).is_err());
    }

    #[test]
    fn lost_placeholders_are_told_apart_from_damage() {
        let k = (1u64, 2u64).key_bytes();
        let p = lost(k.as_slice());
        assert!(is_lost(k.as_slice(), &p));
        assert_eq!(
            verify_value("messages", 4, k.as_slice(), &p),
            Ok(Verdict::Lost)
        );
        let other = (1u64, 3u64).key_bytes();
        assert!(!is_lost(other.as_slice(), &p));
        assert!(verify_value("messages", 4, other.as_slice(), &p).is_err());
        assert_eq!(
            Rec::Messages.describe(k.as_slice()),
            "room 0000000000000001 seq 2"
        );
    }
}
