//! Opening the store: creating missing tables, checking and migrating the
//! schema (a backup first, old records sealed in steps), refusing a newer
//! store, rebuilding `wallet_pending` when it may be stale, tightening the
//! data directory's permissions; and checking one stored value
//! (`verify_value`) against its table's format.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::db;
use super::ledger;
use super::reads::{BeforeMigration, CommitFeed, Store};
use super::records::{MemberRecord, MessageRecord, Privacy, RoomRecord, UserRecord};
use super::seal;
use super::seal::Rec;
use super::tables::{
    CLIENT_IDS, CLUSTER_OUTBOX, CONTACTS, DEFAULT_CACHE_BYTES, LAST_SEEN, MEMBERS, MESSAGE_LOG,
    MESSAGES, META, PENDING_SYNCED, PRIVACY, REVOKED, ROOMS, SCHEMA_VERSION, USER_ROOMS, USERNAMES,
    USERS, WALLET_ACCOUNTS, WALLET_ENTRIES, WALLET_KEYS, WALLET_PENDING, WALLET_SCHEDULE,
    WALLET_TRANSFERS, WALLET_USER_TRANSFERS,
};
use crate::error::ApiError;

/// The store's `meta.schema_version` in a snapshot (None for a new, empty
/// file).
pub fn schema_version(txn: &redb::ReadTransaction) -> Result<Option<u64>, String> {
    match txn.open_table(META) {
        Ok(meta) => Ok(meta
            .get("schema_version")
            .map_err(|e| e.to_string())?
            .map(|v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

pub(super) fn newer_store(path: &Path, v: u64) -> String {
    format!(
        "{} was written by a newer confab (store schema {v}; this confab understands schema {SCHEMA_VERSION} and older). Run the newer confab, or restore a backup taken by this version.",
        path.display()
    )
}

/// What a full check of one stored value found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Good,
    /// A lost-message placeholder (known loss, not new damage).
    Lost,
}

/// Checks one stored value of `table` as a store of `schema` holds it:
/// before schema 4 values are plain records (they must decode); from 4 on
/// they are sealed (checksum, then decode). Tables without records pass.
/// This is what `confab check`, the scrub, backups and restore run on
/// every record.
pub fn verify_value(table: &str, schema: u64, key: &[u8], value: &[u8]) -> Result<Verdict, String> {
    let Some(rec) = Rec::by_table(table) else {
        return Ok(Verdict::Good);
    };
    let body = if schema >= 4 {
        if rec == Rec::Messages && seal::is_lost(key, value) {
            return Ok(Verdict::Lost);
        }
        seal::unseal_raw(rec, key, value)?
    } else {
        value
    };
    decode_body(rec, body)
        .map(|_| Verdict::Good)
        .map_err(|e| format!("does not decode: {e}"))
}

/// Decodes a record's bytes as its table's type (nothing is kept).
pub(super) fn decode_body(rec: Rec, body: &[u8]) -> Result<(), String> {
    fn pc<'a, T: serde::Deserialize<'a>>(b: &'a [u8]) -> Result<(), String> {
        postcard::from_bytes::<T>(b)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    match rec {
        Rec::Users => pc::<UserRecord>(body),
        Rec::Rooms => pc::<RoomRecord>(body),
        Rec::Members => pc::<MemberRecord>(body),
        Rec::Messages => MessageRecord::decode_body(body).map(drop),
        Rec::WalletEntries => pc::<ledger::EntryRecord>(body),
        Rec::WalletTransfers => pc::<ledger::TransferRecord>(body),
        Rec::Privacy => pc::<Privacy>(body),
        Rec::ClusterOutbox => serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

impl Store {
    /// Opens (or creates) `<data_dir>/confab.redb`, creates missing tables and
    /// checks the schema version.
    pub fn open(data_dir: &Path) -> Result<Store, String> {
        Store::open_with_cache(data_dir, DEFAULT_CACHE_BYTES)
    }

    /// Like [`Store::open`], with redb's page cache limited to `cache_bytes`.
    pub fn open_with_cache(data_dir: &Path, cache_bytes: usize) -> Result<Store, String> {
        Store::open_with(data_dir, cache_bytes, None)
    }

    /// Like [`Store::open_with_cache`]; an older store is handed to
    /// `before_migration` (with its schema version) before it is migrated,
    /// and not migrated when that fails. The server and the offline
    /// commands back it up there (`backup::before_migration`).
    pub fn open_with(
        data_dir: &Path,
        cache_bytes: usize,
        before_migration: Option<BeforeMigration<'_>>,
    ) -> Result<Store, String> {
        // Damage a migration meets is this store's, as any later read's.
        let damage = Arc::new(seal::DamageLog::default());
        damage
            .clone()
            .scope(|| Store::open_reporting_to(data_dir, cache_bytes, damage, before_migration))
    }

    pub(super) fn open_reporting_to(
        data_dir: &Path,
        cache_bytes: usize,
        damage: Arc<seal::DamageLog>,
        before_migration: Option<BeforeMigration<'_>>,
    ) -> Result<Store, String> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
        let path = data_dir.join("confab.redb");
        private(data_dir, 0o700);
        private(&path, 0o600);
        // A store from a newer confab is refused before anything is written
        // to it (opening it for writing would already change its header).
        if path.exists()
            && let Ok(ro) = redb::ReadOnlyDatabase::open(&path)
        {
            let found = ro
                .begin_read()
                .ok()
                .and_then(|txn| schema_version(&txn).ok().flatten());
            drop(ro);
            if let Some(v) = found.filter(|&v| v > SCHEMA_VERSION) {
                return Err(newer_store(&path, v));
            }
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // An older store is backed up before it is migrated (the migration
        // itself is one transaction below): `<data_dir>/backups/`.
        let snapshot = db.begin_read().map_err(|e| e.to_string())?;
        if let Some(v) = schema_version(&snapshot)? {
            if v > SCHEMA_VERSION {
                return Err(newer_store(&path, v));
            }
            if v < SCHEMA_VERSION
                && let Some(before) = before_migration
            {
                before(&snapshot, v)?;
            }
        }
        drop(snapshot);
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        // Saves the allocator state, so the next start after a crash is quick.
        txn.set_quick_repair(true);
        {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let found = meta
                .get("schema_version")
                .map_err(|e| e.to_string())?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| e.to_string())?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v @ 1..=3) => {
                    // Each step in turn, all in this one transaction.
                    if v == 1 {
                        // 1 → 2: number every stored message, in (room, seq) order.
                        let messages = txn.open_table(MESSAGES).map_err(|e| e.to_string())?;
                        let mut log = txn.open_table(MESSAGE_LOG).map_err(|e| e.to_string())?;
                        let mut pos = 0u64;
                        for entry in messages
                            .range::<(u64, u64)>(..)
                            .map_err(|e| e.to_string())?
                        {
                            let (k, _) = entry.map_err(|e| e.to_string())?;
                            pos += 1;
                            log.insert(pos, k.value()).map_err(|e| e.to_string())?;
                        }
                        tracing::info!(messages = pos, "messages numbered in message_log");
                    }
                    // 2 → 3: the `privacy` table (created below), empty.
                    // 3 → 4: every record sealed with its checksum.
                    let (sealed, undecodable) = seal_all(&txn).map_err(|e| e.to_string())?;
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| e.to_string())?;
                    tracing::info!(
                        records = sealed,
                        undecodable,
                        "store upgraded from schema {v} to {SCHEMA_VERSION}"
                    );
                }
                Some(v) => {
                    return Err(format!(
                        "{} has store schema {v}, which this confab cannot migrate (it understands {SCHEMA_VERSION})",
                        path.display()
                    ));
                }
            }
            macro_rules! touch {
                ($($t:expr),*) => {$( txn.open_table($t).map_err(|e| e.to_string())?; )*};
            }
            touch!(USERS, ROOMS, MESSAGES);
            touch!(USERNAMES, REVOKED);
            touch!(CONTACTS, MEMBERS, USER_ROOMS);
            touch!(CLIENT_IDS);
            touch!(LAST_SEEN, MESSAGE_LOG);
            touch!(WALLET_ACCOUNTS, WALLET_ENTRIES, WALLET_TRANSFERS);
            touch!(WALLET_KEYS, WALLET_USER_TRANSFERS, WALLET_SCHEDULE);
            touch!(CLUSTER_OUTBOX, PRIVACY, WALLET_PENDING);
        }
        rebuild_wallet_pending(&txn).map_err(|e| e.message)?;
        txn.commit().map_err(|e| e.to_string())?;
        let feed = Arc::new(CommitFeed::default());
        {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let log = txn.open_table(MESSAGE_LOG).map_err(|e| e.to_string())?;
            if let Some((k, _)) = log.last().map_err(|e| e.to_string())? {
                feed.publish(k.value());
            }
        }
        Ok(Store {
            db: Arc::new(db::Db::new(db, &path, cache_bytes, damage)),
            health: Default::default(),
            feed,
            transfer_ids: Default::default(),
        })
    }
}
/// Records rewritten per step of [`seal_all`].
pub(super) const SEAL_CHUNK: usize = 4096;

macro_rules! seal_table_fn {
    ($name:ident, $k:ty) => {
        /// Seals every value of one table in place, a chunk at a time.
        /// Returns (records, those that do not decode as their type).
        fn $name(
            txn: &redb::WriteTransaction,
            def: TableDefinition<$k, &'static [u8]>,
            rec: Rec,
        ) -> Result<(u64, u64), ApiError> {
            use seal::SealKey;
            use std::ops::Bound;
            let mut table = txn.open_table(def)?;
            let mut after: Option<$k> = None;
            let (mut n, mut bad) = (0u64, 0u64);
            loop {
                let chunk: Vec<($k, Vec<u8>)> = {
                    let range = match after {
                        None => table.range::<$k>(..)?,
                        Some(k) => table.range::<$k>((Bound::Excluded(k), Bound::Unbounded))?,
                    };
                    let mut v = Vec::with_capacity(SEAL_CHUNK);
                    for e in range.take(SEAL_CHUNK) {
                        let (k, val) = e?;
                        v.push((k.value(), val.value().to_vec()));
                    }
                    v
                };
                let Some(last) = chunk.last().map(|x| x.0) else {
                    break;
                };
                for (k, body) in chunk {
                    let kb = k.key_bytes();
                    if let Err(why) = verify_value(rec.table(), 3, kb.as_slice(), &body) {
                        // Sealed as it is: it stays damaged (and is reported
                        // as such on every read), it is not made to look good.
                        bad += 1;
                        tracing::warn!(table = rec.table(), key = %rec.describe(kb.as_slice()), why, "a record does not decode; sealed unchanged");
                    }
                    table.insert(k, seal::seal_raw(rec, kb.as_slice(), &body).as_slice())?;
                    n += 1;
                }
                after = Some(last);
            }
            Ok((n, bad))
        }
    };
}
seal_table_fn!(seal_table_u64, u64);
seal_table_fn!(seal_table_pair, (u64, u64));

/// Schema 3 → 4: seals every record of every sealed table, in the open
/// (migrating) transaction.
pub(super) fn seal_all(txn: &redb::WriteTransaction) -> Result<(u64, u64), ApiError> {
    let mut total = (0u64, 0u64);
    let mut add = |(n, bad): (u64, u64)| {
        total.0 += n;
        total.1 += bad;
    };
    add(seal_table_u64(txn, USERS, Rec::Users)?);
    add(seal_table_u64(txn, ROOMS, Rec::Rooms)?);
    add(seal_table_pair(txn, MEMBERS, Rec::Members)?);
    add(seal_table_pair(txn, MESSAGES, Rec::Messages)?);
    add(seal_table_pair(txn, WALLET_ENTRIES, Rec::WalletEntries)?);
    add(seal_table_u64(txn, WALLET_TRANSFERS, Rec::WalletTransfers)?);
    add(seal_table_u64(txn, PRIVACY, Rec::Privacy)?);
    add(seal_table_u64(txn, CLUSTER_OUTBOX, Rec::ClusterOutbox)?);
    Ok(total)
}

/// Takes away group and other permissions from `path` (the store holds
/// password hashes and every message): a data directory made by an older
/// version, or under a loose umask, is tightened on open. Files created
/// later are private by the process umask (`main` sets 077).
pub fn private(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        let mode = meta.permissions().mode() & mode;
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            Ok(()) => {
                tracing::info!(path = %path.display(), mode = format!("{mode:o}"), "made private")
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot make private"),
        }
    }
}

/// Makes `wallet_pending` match `wallet_schedule` when it may not: it is
/// missing or incomplete in a store written before it existed (or restored
/// from a backup, which leaves derived tables out), and a confab that does
/// not know it may have scheduled, run or cancelled transfers without it.
/// Both leave a sign that costs nothing to check at every open: the two
/// tables' sizes differ, or `next_transfer_id` moved past
/// [`PENDING_SYNCED`] (every new scheduled transfer takes an id, and this
/// confab's writer moves both together). Then the index is rebuilt from
/// the schedule, in the open transaction, one read per scheduled transfer.
pub(super) fn rebuild_wallet_pending(txn: &redb::WriteTransaction) -> Result<(), ApiError> {
    use redb::ReadableTableMetadata;
    let schedule = txn.open_table(WALLET_SCHEDULE)?;
    let mut pending = txn.open_table(WALLET_PENDING)?;
    let mut meta = txn.open_table(META)?;
    let next = meta.get("next_transfer_id")?.map(|g| g.value());
    let synced = meta.get(PENDING_SYNCED)?.map(|g| g.value());
    if schedule.len()? == pending.len()? && synced == next {
        return Ok(());
    }
    let transfers = txn.open_table(WALLET_TRANSFERS)?;
    pending.retain(|_, _| false)?;
    let mut n = 0u64;
    for entry in schedule.range::<(i64, u64)>(..)? {
        let id = entry?.0.value().1;
        if let Some(g) = transfers.get(id)? {
            // A damaged transfer (reported) is left out rather than
            // keeping the store from opening; `confab check` names it.
            let Ok(rec) = ledger::decode_transfer(id, g.value()) else {
                continue;
            };
            if rec.state == ledger::State::Scheduled {
                pending.insert((rec.from, id), ())?;
                n += 1;
            }
        }
    }
    match next {
        Some(next) => meta.insert(PENDING_SYNCED, next)?,
        None => meta.remove(PENDING_SYNCED)?,
    };
    tracing::info!(
        scheduled = n,
        "rebuilt the index of pending transfers by sender"
    );
    Ok(())
}
