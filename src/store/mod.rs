//! The durable store: redb tables, their record encodings and the read-side
//! queries. All writes go through [`writer::GroupCommitWriter`], which owns
//! the single redb write transaction at a time; this module only opens the
//! database, migrates it and reads from it (any thread, any time, MVCC).
//!
//! The on-disk layout is documented in `docs/STORAGE.md`; change both
//! together and bump [`SCHEMA_VERSION`] for incompatible changes.

pub mod db;
pub mod engine;
pub mod integrity;
pub mod ledger;
pub mod seal;
pub mod transfer_ids;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::ids::{RoomId, UserId};
pub use db::now_ms;
pub use seal::Rec;

/// 1: first release. 2: adds `message_log` (filled from `messages` on
/// upgrade). 3: adds `privacy`. 4: every record is sealed with a checksum
/// ([`seal`]; old records are sealed on upgrade).
pub const SCHEMA_VERSION: u64 = 4;

/// redb's page cache when no size is configured (see `cache_mb`).
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

/// user id → [`UserRecord`]
pub const USERS: TableDefinition<u64, &[u8]> = TableDefinition::new("users");
/// lower-case username → user id
pub const USERNAMES: TableDefinition<&str, u64> = TableDefinition::new("usernames");
/// (owner, contact) → added at (ms)
pub const CONTACTS: TableDefinition<(u64, u64), i64> = TableDefinition::new("contacts");
/// room id → [`RoomRecord`]
pub const ROOMS: TableDefinition<u64, &[u8]> = TableDefinition::new("rooms");
/// (room, user) → [`MemberRecord`]
pub const MEMBERS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("members");
/// (user, room) → joined at (ms): the reverse index of `members`
pub const USER_ROOMS: TableDefinition<(u64, u64), i64> = TableDefinition::new("user_rooms");
/// (room, seq) → [`MessageRecord`]
pub const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");
/// (room, sender, client_id) → seq: exactly-once sends
pub const CLIENT_IDS: TableDefinition<(u64, u64, &str), u64> = TableDefinition::new("client_ids");
/// token id (jti) → expiry (unix seconds): revoked tokens until they expire
pub const REVOKED: TableDefinition<&str, i64> = TableDefinition::new("revoked_tokens");
/// user id → last seen (ms)
pub const LAST_SEEN: TableDefinition<u64, i64> = TableDefinition::new("last_seen");
/// "schema_version" → u64
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// log position → (room, seq): every stored message in commit order, so a
/// derived index (search) can say "indexed up to position N" and catch up.
pub const MESSAGE_LOG: TableDefinition<u64, (u64, u64)> = TableDefinition::new("message_log");
/// account (user id; 0 = the issuer) → balance in minor units (the issuer's: total issued)
pub const WALLET_ACCOUNTS: TableDefinition<u64, u64> = TableDefinition::new("wallet_accounts");
/// (account, n) → `postcard(EntryRecord)`: the account's n-th ledger entry, never changed
pub const WALLET_ENTRIES: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("wallet_entries");
/// transfer id → `postcard(TransferRecord)`
pub const WALLET_TRANSFERS: TableDefinition<u64, &[u8]> = TableDefinition::new("wallet_transfers");
/// (sender, idempotency key) → transfer id
pub const WALLET_KEYS: TableDefinition<(u64, &str), u64> = TableDefinition::new("wallet_keys");
/// (user, transfer id) → () : a user's transfers, both directions, in id order
pub const WALLET_USER_TRANSFERS: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("wallet_user_transfers");
/// (due at ms, transfer id) → () : scheduled (and recurring) transfers by due time
pub const WALLET_SCHEDULE: TableDefinition<(i64, u64), ()> =
    TableDefinition::new("wallet_schedule");
/// (sender, transfer id) → () : the same transfers as `wallet_schedule`, by
/// sender, so that `max_scheduled_transfers` is one short range count.
/// Derived from `wallet_schedule` and `wallet_transfers`: not in backups,
/// rebuilt when opening a store it may not match (see
/// [`rebuild_wallet_pending`]).
pub const WALLET_PENDING: TableDefinition<(u64, u64), ()> = TableDefinition::new("wallet_pending");
/// `meta` key: the `next_transfer_id` as of the last change the writer made
/// with `wallet_pending` kept up to date (see [`rebuild_wallet_pending`]).
pub const PENDING_SYNCED: &str = "wallet_pending_synced";
/// Cluster nodes: operations for another node, written in the transaction
/// that caused them and deleted once that node confirmed them (payment
/// messages for chats elsewhere, signup bonuses for the wallet node).
/// Key: a counter; value: a JSON [`crate::cluster::outbox::OutboxItem`].
pub const CLUSTER_OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("cluster_outbox");
/// user id → [`Privacy`] (postcard); no row: the defaults (schema 3).
pub const PRIVACY: TableDefinition<u64, &[u8]> = TableDefinition::new("privacy");

/// Who may see something of a user, or do something to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    #[default]
    Everyone,
    /// The users in their contacts.
    Contacts,
    Nobody,
}

/// A user's privacy settings (`GET|PUT /api/v1/me/privacy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Privacy {
    /// Who sees them online and their last seen (presence frames).
    pub presence: Audience,
    /// Who may add them to a group.
    pub group_adds: Audience,
}

impl Audience {
    /// Whether `viewer` is in `owner`'s audience, `owner`'s contacts being
    /// `contacts`.
    pub fn admits(
        self,
        contacts: &impl ReadableTable<(u64, u64), i64>,
        owner: UserId,
        viewer: UserId,
    ) -> Result<bool, ApiError> {
        Ok(owner == viewer
            || match self {
                Audience::Everyone => true,
                Audience::Contacts => contacts.get((owner.0, viewer.0))?.is_some(),
                Audience::Nobody => false,
            })
    }
}

/// `user`'s privacy settings in a snapshot or the writer's transaction.
pub fn privacy_in(
    table: &impl ReadableTable<u64, &'static [u8]>,
    user: UserId,
) -> Result<Privacy, ApiError> {
    match table.get(user.0)? {
        Some(g) => seal::open(Rec::Privacy, user.0, g.value()),
        None => Ok(Privacy::default()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub username: String,
    pub display_name: String,
    pub password_hash: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomKind {
    Direct,
    Group,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomRecord {
    pub kind: RoomKind,
    pub name: Option<String>,
    pub owner: Option<u64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    pub joined_at: i64,
    /// Highest seq this member has read (sent messages count as read).
    pub read_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageRecord {
    pub from: u64,
    pub ts: i64,
    pub client_id: String,
    pub text: String,
    /// A payment message: stored after the fields above as an extension
    /// (`1u8` + `PaymentInfo`), so plain messages keep their format.
    #[serde(skip)]
    pub payment: Option<PaymentInfo>,
}

/// What a payment message refers to (the ledger stays the truth).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentInfo {
    pub transfer: u64,
    pub amount: u64,
    pub to: u64,
    pub note: Option<String>,
}

impl MessageRecord {
    /// The record's bytes (unsealed): `postcard(MessageRecord)`, then for a
    /// payment `1u8` + `postcard(PaymentInfo)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode(self);
        if let Some(p) = &self.payment {
            out.extend(encode(&(1u8, p)));
        }
        out
    }

    /// What is stored in `messages` at `(room, seq)`: the record sealed.
    /// Encoded into one buffer sized for it, checksum included (the hot
    /// path: one allocation per message, as before).
    pub fn sealed(&self, room: RoomId, seq: u64) -> Vec<u8> {
        let guess = self.text.len() + self.client_id.len() + 40 + seal::CHECKSUM_LEN;
        let mut out = postcard::to_extend(self, Vec::with_capacity(guess)).unwrap_or_default();
        if let Some(p) = &self.payment {
            out = postcard::to_extend(&(1u8, p), out).unwrap_or_default();
        }
        seal::seal(Rec::Messages, (room.0, seq), out)
    }

    /// Decodes a record's bytes (unsealed, as [`MessageRecord::encode`]
    /// writes them).
    pub fn decode_body(bytes: &[u8]) -> Result<MessageRecord, String> {
        let (mut rec, rest): (MessageRecord, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
        if let Some(1) = rest.first() {
            let (_, p): (u8, PaymentInfo) =
                postcard::from_bytes(rest).map_err(|e| format!("payment: {e}"))?;
            rec.payment = Some(p);
        }
        Ok(rec)
    }

    /// [`MessageRecord::decode_body`] with an `ApiError`.
    pub fn decode(bytes: &[u8]) -> Result<MessageRecord, ApiError> {
        MessageRecord::decode_body(bytes)
            .map_err(|e| ApiError::internal(format!("corrupt message record: {e}")))
    }

    /// Unseals and decodes the value stored at `(room, seq)`. Damage is
    /// reported ([`seal::report`]); a lost-message placeholder is None
    /// without a report. Err(why) for damage.
    pub fn open(room: RoomId, seq: u64, value: &[u8]) -> Result<Option<MessageRecord>, String> {
        use seal::SealKey;
        let key = (room.0, seq).key_bytes();
        if seal::is_lost(key.as_slice(), value) {
            return Ok(None);
        }
        let r = seal::unseal_raw(Rec::Messages, key.as_slice(), value).and_then(|body| {
            MessageRecord::decode_body(body).map_err(|e| format!("does not decode: {e}"))
        });
        match r {
            Ok(rec) => Ok(Some(rec)),
            Err(why) => {
                seal::report(Rec::Messages, key.as_slice(), &why);
                Err(why)
            }
        }
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard only fails for types it cannot represent; ours are plain data.
    postcard::to_allocvec(v).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ApiError> {
    postcard::from_bytes(bytes)
        .map_err(|e| ApiError::internal(format!("corrupt {what} record: {e}")))
}

// The client views of users, rooms and messages are the protocol's
// (`frames`); their constructors from stored records are here.
pub use crate::frames::{Message, PaymentView, Room, User};

impl Message {
    /// The client view of a stored message. A payment message names its
    /// transfer by public id (`ids`, which also carry the wallet's
    /// currency), in `payment.transfer` and in its
    /// `client_id`: the stored `pay-<stored id>` stays as it is (it
    /// deduplicates the cluster outbox's deliveries) but is never shown.
    pub fn from_record(
        room: RoomId,
        seq: u64,
        r: MessageRecord,
        ids: &transfer_ids::TransferIds,
    ) -> Message {
        let client_id = match &r.payment {
            Some(p) => format!("pay-{}", ids.show(p.transfer)),
            None => r.client_id,
        };
        let payment = r.payment.map(|p| PaymentView {
            transfer: ids.show(p.transfer),
            amount: p.amount,
            currency: ids.currency().to_string(),
            to: UserId(p.to),
            note: p.note,
        });
        Message {
            room,
            seq,
            from: UserId(r.from),
            ts: r.ts,
            text: r.text,
            client_id,
            kind: payment.as_ref().map(|_| "payment"),
            payment,
            unreadable: false,
        }
    }

    /// The placeholder for a message that cannot be read.
    pub fn unreadable(room: RoomId, seq: u64) -> Message {
        Message {
            room,
            seq,
            from: UserId(0),
            ts: 0,
            text: String::new(),
            client_id: String::new(),
            kind: None,
            payment: None,
            unreadable: true,
        }
    }

    /// The client view of the value stored at `(room, seq)`: unreadable
    /// (and reported) when it is damaged, never different text.
    pub fn from_stored(
        room: RoomId,
        seq: u64,
        value: &[u8],
        ids: &transfer_ids::TransferIds,
    ) -> Message {
        match MessageRecord::open(room, seq, value) {
            Ok(Some(rec)) => Message::from_record(room, seq, rec, ids),
            Ok(None) | Err(_) => Message::unreadable(room, seq),
        }
    }
}

/// The read side of the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// The database, reopenable after an I/O error (see [`db::Db`]).
    pub db: Arc<db::Db>,
    /// What the writer knows of the storage (full, failing).
    pub health: Arc<db::StorageHealth>,
    /// How far `message_log` is committed; the writer publishes, the search
    /// indexer waits on it.
    pub feed: Arc<CommitFeed>,
    /// How transfer ids (and the wallet's currency) are shown to clients.
    /// Here because every reader and the writer already hold the store, and
    /// payment messages are built from records in its read queries. The
    /// default (from an empty secret, in KRW) is for tools that show no ids;
    /// a server sets its own with [`Store::with_transfer_ids`] before
    /// anything reads.
    pub transfer_ids: transfer_ids::TransferIds,
}

/// What runs on a snapshot of an older store (with its schema version)
/// before it is migrated; an error stops the migration.
pub type BeforeMigration<'a> = &'a dyn Fn(&redb::ReadTransaction, u64) -> Result<(), String>;

/// The highest committed `message_log` position, with a wake-up for waiters.
#[derive(Default)]
pub struct CommitFeed {
    committed: std::sync::atomic::AtomicU64,
    lock: std::sync::Mutex<()>,
    wake: std::sync::Condvar,
}

impl CommitFeed {
    pub fn committed(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Called by the writer after a durable commit.
    pub fn publish(&self, pos: u64) {
        self.committed
            .fetch_max(pos, std::sync::atomic::Ordering::AcqRel);
        let _guard = self.lock.lock();
        self.wake.notify_all();
    }

    /// Wakes up other waiters (e.g. to stop) without a new position.
    pub fn nudge(&self) {
        let _guard = self.lock.lock();
        self.wake.notify_all();
    }

    /// Waits until the committed position passes `pos`, or `timeout`.
    pub fn wait_beyond(&self, pos: u64, timeout: std::time::Duration) {
        let Ok(guard) = self.lock.lock() else {
            return;
        };
        if self.committed() > pos {
            return;
        }
        let _ = self.wake.wait_timeout(guard, timeout);
    }
}

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

fn newer_store(path: &Path, v: u64) -> String {
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
fn decode_body(rec: Rec, body: &[u8]) -> Result<(), String> {
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

    fn open_reporting_to(
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

    /// This store, showing transfer ids under `ids` (the server's key).
    pub fn with_transfer_ids(mut self, ids: transfer_ids::TransferIds) -> Store {
        self.transfer_ids = ids;
        self
    }

    fn read(&self) -> Result<redb::ReadTransaction, ApiError> {
        Ok(self.db.begin_read()?)
    }

    /// [`guard`] for a read of this store: the damage it meets is reported
    /// into the store's log ([`db::Db::damage`]).
    pub fn guard<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.db.damage().scope(|| guard(what, f))
    }

    /// True until the first user signs up.
    pub fn has_no_users(&self) -> Result<bool, ApiError> {
        self.guard("has_no_users", || {
            let txn = self.read()?;
            let users = txn.open_table(USERS)?;
            Ok(users.first()?.is_none())
        })
    }

    pub fn user(&self, id: UserId) -> Result<Option<User>, ApiError> {
        self.guard("user", || {
            let txn = self.read()?;
            let users = txn.open_table(USERS)?;
            user_in(&users, id)
        })
    }

    /// The user record (with password hash) for a username, case-insensitive.
    pub fn user_by_name(&self, username: &str) -> Result<Option<(UserId, UserRecord)>, ApiError> {
        self.guard("user_by_name", || {
            let txn = self.read()?;
            let names = txn.open_table(USERNAMES)?;
            let Some(id) = names
                .get(username.to_lowercase().as_str())?
                .map(|g| g.value())
            else {
                return Ok(None);
            };
            let users = txn.open_table(USERS)?;
            match users.get(id)? {
                Some(g) => Ok(Some((UserId(id), seal::open(Rec::Users, id, g.value())?))),
                None => Ok(None),
            }
        })
    }

    pub fn search_users(&self, prefix: &str, limit: usize) -> Result<Vec<User>, ApiError> {
        self.guard("search_users", || {
            let prefix = prefix.to_lowercase();
            let txn = self.read()?;
            let names = txn.open_table(USERNAMES)?;
            let users = txn.open_table(USERS)?;
            let mut out = Vec::new();
            for entry in names.range(prefix.as_str()..)? {
                let (name, id) = entry?;
                if !name.value().starts_with(&prefix) || out.len() >= limit {
                    break;
                }
                if let Some(u) = user_in(&users, UserId(id.value()))? {
                    out.push(u);
                }
            }
            Ok(out)
        })
    }

    pub fn contacts(&self, owner: UserId) -> Result<Vec<User>, ApiError> {
        self.guard("contacts", || {
            let txn = self.read()?;
            let contacts = txn.open_table(CONTACTS)?;
            let users = txn.open_table(USERS)?;
            let mut out = Vec::new();
            for entry in contacts.range((owner.0, 0)..=(owner.0, u64::MAX))? {
                let (k, _) = entry?;
                if let Some(u) = user_in(&users, UserId(k.value().1))? {
                    out.push(u);
                }
            }
            out.sort_by(|a, b| a.username.cmp(&b.username));
            Ok(out)
        })
    }

    /// The room, if `user` is a member of it.
    pub fn room_for(&self, room: RoomId, user: UserId) -> Result<Room, ApiError> {
        self.guard("room_for", || {
            let txn = self.read()?;
            check_member(&txn, room, user)?;
            room_in(&txn, room)?.ok_or_else(ApiError::room_not_found)
        })
    }

    /// Up to `max` logged messages after log position `after`, in log order.
    pub fn log_after(&self, after: u64, max: usize) -> Result<Vec<(u64, Message)>, ApiError> {
        self.guard("log_after", || {
            let txn = self.read()?;
            let log = txn.open_table(MESSAGE_LOG)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::with_capacity(max.min(4096));
            for entry in log.range(after.saturating_add(1)..)? {
                if out.len() >= max {
                    break;
                }
                let (k, v) = entry?;
                let (room, seq) = v.value();
                // One message on a damaged page does not stop the log: it is
                // unreadable, and the reader (the indexer) moves past it.
                let got = self
                    .guard("a logged message", || {
                        Ok(messages.get((room, seq))?.map(|g| {
                            Message::from_stored(RoomId(room), seq, g.value(), &self.transfer_ids)
                        }))
                    })
                    .unwrap_or_else(|_| Some(Message::unreadable(RoomId(room), seq)));
                if let Some(m) = got {
                    out.push((k.value(), m));
                }
            }
            Ok(out)
        })
    }

    /// The stored messages at these keys (missing ones are skipped).
    pub fn messages_at(&self, keys: &[(RoomId, u64)]) -> Result<Vec<Message>, ApiError> {
        self.guard("messages_at", || {
            let txn = self.read()?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::with_capacity(keys.len());
            for &(room, seq) in keys {
                let got = self
                    .guard("a message", || {
                        Ok(messages.get((room.0, seq))?.map(|g| {
                            Message::from_stored(room, seq, g.value(), &self.transfer_ids)
                        }))
                    })
                    .unwrap_or_else(|_| Some(Message::unreadable(room, seq)));
                out.extend(got);
            }
            Ok(out)
        })
    }

    /// The rooms `user` is a member of.
    pub fn room_ids_of(&self, user: UserId) -> Result<Vec<RoomId>, ApiError> {
        self.guard("room_ids_of", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                out.push(RoomId(entry?.0.value().1));
            }
            Ok(out)
        })
    }

    /// The oldest `limit` entries of the cluster outbox.
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, ApiError> {
        self.guard("outbox", || {
            let txn = self.read()?;
            let t = txn.open_table(CLUSTER_OUTBOX)?;
            let mut out = Vec::new();
            for e in t.iter()?.take(limit) {
                let (k, v) = e?;
                // A damaged entry stays where it is (reported), never sent.
                if let Ok(body) = seal::unseal(Rec::ClusterOutbox, k.value(), v.value()) {
                    out.push((k.value(), body.to_vec()));
                }
            }
            Ok(out)
        })
    }

    /// Every room of `user` with its highest seq (what a proxy's new session
    /// counts as already past).
    pub fn room_heads(&self, user: UserId) -> Result<Vec<(RoomId, u64)>, ApiError> {
        self.guard("room_heads", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                let room = entry?.0.value().1;
                let head = match messages.range((room, 0)..=(room, u64::MAX))?.next_back() {
                    Some(e) => e?.0.value().1,
                    None => 0,
                };
                out.push((RoomId(room), head));
            }
            Ok(out)
        })
    }

    /// Every room of `user`, with its last message and the user's unread count,
    /// most recent activity first.
    pub fn rooms_of(&self, user: UserId) -> Result<Vec<serde_json::Value>, ApiError> {
        self.guard("rooms_of", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let members = txn.open_table(MEMBERS)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                let (k, _) = entry?;
                let room = RoomId(k.value().1);
                let Some(view) = room_in(&txn, room)? else {
                    continue;
                };
                let last = last_message(&messages, room, &self.transfer_ids)?;
                // Every member's read position: the caller's gives `unread`, the
                // others' let a client show read ticks right after a reload.
                let mut reads = serde_json::Map::new();
                let mut read_seq = 0;
                for entry in members.range((room.0, 0)..=(room.0, u64::MAX))? {
                    let (k, g) = entry?;
                    let member = k.value().1;
                    let seq =
                        seal::open::<MemberRecord, _>(Rec::Members, k.value(), g.value())?.read_seq;
                    if member == user.0 {
                        read_seq = seq;
                    }
                    reads.insert(UserId(member).to_string(), seq.into());
                }
                // An unreadable last message has no time of its own.
                let activity = last
                    .as_ref()
                    .filter(|m| !m.unreadable)
                    .map(|m| m.ts)
                    .unwrap_or(view.created_at);
                let mut v = serde_json::to_value(&view).map_err(ApiError::internal)?;
                v["last_message"] = serde_json::to_value(&last).map_err(ApiError::internal)?;
                v["unread"] = view.last_seq.saturating_sub(read_seq).into();
                v["reads"] = reads.into();
                out.push((activity, v));
            }
            out.sort_by_key(|x| std::cmp::Reverse(x.0));
            Ok(out.into_iter().map(|(_, v)| v).collect())
        })
    }

    /// Messages of a room for a member: `after` → the first `limit` with a
    /// greater seq; `before` → the last `limit` with a smaller seq; neither →
    /// the latest `limit`. Always ascending.
    pub fn history(
        &self,
        room: RoomId,
        user: UserId,
        after: Option<u64>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Message>, ApiError> {
        self.guard("history", || {
            let txn = self.read()?;
            check_member(&txn, room, user)?;
            let messages = txn.open_table(MESSAGES)?;
            let lo = after.map(|a| a.saturating_add(1)).unwrap_or(1);
            let hi = before.map(|b| b.saturating_sub(1)).unwrap_or(u64::MAX);
            if lo > hi {
                return Ok(Vec::new());
            }
            let range = messages.range((room.0, lo)..=(room.0, hi))?;
            let mut out = Vec::with_capacity(limit.min(256));
            if after.is_some() {
                for entry in range.take(limit) {
                    let (k, v) = entry?;
                    out.push(Message::from_stored(
                        room,
                        k.value().1,
                        v.value(),
                        &self.transfer_ids,
                    ));
                }
            } else {
                for entry in range.rev().take(limit) {
                    let (k, v) = entry?;
                    out.push(Message::from_stored(
                        room,
                        k.value().1,
                        v.value(),
                        &self.transfer_ids,
                    ));
                }
                out.reverse();
            }
            Ok(out)
        })
    }

    /// Fails with `room_not_found` unless `user` is in `room` (whether or not
    /// the room exists).
    pub fn check_member(&self, room: RoomId, user: UserId) -> Result<(), ApiError> {
        self.guard("check_member", || {
            let txn = self.read()?;
            check_member(&txn, room, user)
        })
    }

    pub fn members(&self, room: RoomId) -> Result<Vec<UserId>, ApiError> {
        self.guard("members", || {
            let txn = self.read()?;
            let members = txn.open_table(MEMBERS)?;
            members_in(&members, room)
        })
    }

    /// Users who share a direct room with `user` (they see its presence).
    pub fn direct_peers(&self, user: UserId) -> Result<Vec<UserId>, ApiError> {
        self.guard("direct_peers", || {
            let txn = self.read()?;
            let user_rooms = txn.open_table(USER_ROOMS)?;
            let members = txn.open_table(MEMBERS)?;
            let mut out = Vec::new();
            for entry in user_rooms.range((user.0, 0)..=(user.0, u64::MAX))? {
                let (k, _) = entry?;
                let room = RoomId(k.value().1);
                if room.is_direct() {
                    out.extend(
                        members_in(&members, room)?
                            .into_iter()
                            .filter(|&u| u != user),
                    );
                }
            }
            Ok(out)
        })
    }

    /// `user`'s privacy settings.
    pub fn privacy(&self, user: UserId) -> Result<Privacy, ApiError> {
        self.guard("privacy", || {
            let txn = self.read()?;
            privacy_in(&txn.open_table(PRIVACY)?, user)
        })
    }

    /// Of `viewers`, those who may see `owner`'s presence.
    pub fn presence_audience(
        &self,
        owner: UserId,
        viewers: &[UserId],
    ) -> Result<Vec<UserId>, ApiError> {
        self.guard("presence_audience", || {
            let txn = self.read()?;
            let audience = privacy_in(&txn.open_table(PRIVACY)?, owner)?.presence;
            let contacts = txn.open_table(CONTACTS)?;
            let mut out = Vec::with_capacity(viewers.len());
            for &v in viewers {
                if audience.admits(&contacts, owner, v)? {
                    out.push(v);
                }
            }
            Ok(out)
        })
    }

    /// Of `owners`, those whose presence `viewer` may see.
    pub fn presences_seen_by(
        &self,
        viewer: UserId,
        owners: &[UserId],
    ) -> Result<Vec<UserId>, ApiError> {
        self.guard("presences_seen_by", || {
            let txn = self.read()?;
            let privacy = txn.open_table(PRIVACY)?;
            let contacts = txn.open_table(CONTACTS)?;
            let mut out = Vec::with_capacity(owners.len());
            for &o in owners {
                if privacy_in(&privacy, o)?
                    .presence
                    .admits(&contacts, o, viewer)?
                {
                    out.push(o);
                }
            }
            Ok(out)
        })
    }

    pub fn last_seen(&self, user: UserId) -> Result<Option<i64>, ApiError> {
        self.guard("last_seen", || {
            let txn = self.read()?;
            let t = txn.open_table(LAST_SEEN)?;
            Ok(t.get(user.0)?.map(|g| g.value()))
        })
    }

    /// Revoked token ids that have not expired yet (loaded at start-up).
    pub fn revoked_tokens(&self, now_secs: i64) -> Result<Vec<(String, i64)>, ApiError> {
        let txn = self.read()?;
        let t = txn.open_table(REVOKED)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            if v.value() > now_secs {
                out.push((k.value().to_string(), v.value()));
            }
        }
        Ok(out)
    }
}

pub fn user_in(
    users: &impl ReadableTable<u64, &'static [u8]>,
    id: UserId,
) -> Result<Option<User>, ApiError> {
    match users.get(id.0)? {
        Some(g) => {
            let r: UserRecord = seal::open(Rec::Users, id.0, g.value())?;
            Ok(Some(User {
                id,
                username: r.username,
                display_name: r.display_name,
            }))
        }
        None => Ok(None),
    }
}

pub fn members_in(
    members: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
) -> Result<Vec<UserId>, ApiError> {
    let mut out = Vec::new();
    for entry in members.range((room.0, 0)..=(room.0, u64::MAX))? {
        let (k, _) = entry?;
        out.push(UserId(k.value().1));
    }
    Ok(out)
}

/// The room's last seq: the last key of its range (0 when empty).
pub fn last_seq_in(
    messages: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
) -> Result<u64, ApiError> {
    match messages
        .range((room.0, 0)..=(room.0, u64::MAX))?
        .next_back()
    {
        Some(e) => Ok(e?.0.value().1),
        None => Ok(0),
    }
}

pub fn last_message(
    messages: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
    ids: &transfer_ids::TransferIds,
) -> Result<Option<Message>, ApiError> {
    match messages
        .range((room.0, 0)..=(room.0, u64::MAX))?
        .next_back()
    {
        Some(entry) => {
            let (k, v) = entry?;
            Ok(Some(Message::from_stored(
                room,
                k.value().1,
                v.value(),
                ids,
            )))
        }
        None => Ok(None),
    }
}

/// Runs a read that serves a request (or a check) so that a panic inside
/// redb — what a damaged page can cause (`btree_cursor.rs`: unreachable) —
/// becomes a `storage_damaged` answer instead of unwinding through the
/// caller's task and dropping its connection. The panic is logged and
/// counted (`confab_store_read_failures_total{kind="panic"}`). The release
/// profile unwinds (Cargo.toml), so this catches it; the read transaction
/// the closure holds is dropped on the way out.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    match catch_panic(f) {
        Ok(r) => r,
        Err(why) => {
            tracing::error!(what, panic = %why, "the store failed reading damaged data");
            metrics::counter!("confab_store_read_failures_total", "kind" => "panic").increment(1);
            Err(ApiError::damaged(format!(
                "the store could not read {what}: its file is damaged there (the operator has been told; `confab check` names the damage)"
            )))
        }
    }
}

// Per thread, and about the panic this thread is catching: not state that
// threads share, so these may stay statics (the architecture's "no global
// mutable state" is about shared counters and flags).
thread_local! {
    /// How deep this thread is in [`catch_panic`].
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// What the panic hook saw of the last panic caught there.
    static CAUGHT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Whether this thread is inside [`catch_panic`]: the process's panic hook
/// then hands the panic's place and message over ([`note_panic`]) instead
/// of printing it, and the caller logs it once, as one line.
pub fn in_guarded_read() -> bool {
    GUARDED.with(|g| g.get() > 0)
}

/// Called by the panic hook for a panic inside [`catch_panic`].
pub fn note_panic(what: String) {
    CAUGHT.with(|c| *c.borrow_mut() = Some(what));
}

/// Runs `f`, catching a panic (inside redb, on a damaged page) as
/// Err(where and why).
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    GUARDED.with(|g| g.set(g.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
    r.map_err(|p| {
        CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| panic_message(&*p))
    })
}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".to_string()
    }
}

/// Records rewritten per step of [`seal_all`].
const SEAL_CHUNK: usize = 4096;

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
fn seal_all(txn: &redb::WriteTransaction) -> Result<(u64, u64), ApiError> {
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

fn check_member(txn: &redb::ReadTransaction, room: RoomId, user: UserId) -> Result<(), ApiError> {
    let members = txn.open_table(MEMBERS)?;
    if members.get((room.0, user.0))?.is_some() {
        return Ok(());
    }
    Err(ApiError::room_not_found())
}

fn room_in(txn: &redb::ReadTransaction, room: RoomId) -> Result<Option<Room>, ApiError> {
    let rooms = txn.open_table(ROOMS)?;
    let members = txn.open_table(MEMBERS)?;
    let users = txn.open_table(USERS)?;
    let messages = txn.open_table(MESSAGES)?;
    room_view(&rooms, &members, &users, &messages, room)
}

/// Builds the client view of a room from any set of (read or write) tables.
pub fn room_view(
    rooms: &impl ReadableTable<u64, &'static [u8]>,
    members: &impl ReadableTable<(u64, u64), &'static [u8]>,
    users: &impl ReadableTable<u64, &'static [u8]>,
    messages: &impl ReadableTable<(u64, u64), &'static [u8]>,
    room: RoomId,
) -> Result<Option<Room>, ApiError> {
    let Some(g) = rooms.get(room.0)? else {
        return Ok(None);
    };
    let rec: RoomRecord = seal::open(Rec::Rooms, room.0, g.value())?;
    let mut list = Vec::new();
    for id in members_in(members, room)? {
        if let Some(u) = user_in(users, id)? {
            list.push(u);
        }
    }
    let last_seq = last_seq_in(messages, room)?;
    Ok(Some(Room {
        id: room,
        kind: match rec.kind {
            RoomKind::Direct => "direct",
            RoomKind::Group => "group",
        },
        name: rec.name,
        owner: rec.owner.map(UserId),
        members: list,
        created_at: rec.created_at,
        last_seq,
    }))
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
fn rebuild_wallet_pending(txn: &redb::WriteTransaction) -> Result<(), ApiError> {
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

#[cfg(test)]
mod tests {
    use super::ledger::{State, TransferRecord};
    use super::*;
    use redb::ReadableTableMetadata;

    fn transfer(id: u64, from: u64, state: State) -> Vec<u8> {
        seal::seal(
            Rec::WalletTransfers,
            id,
            encode(&TransferRecord {
                from,
                to: 1,
                amount: 5,
                note: None,
                key: format!("k{from}"),
                state,
                created_at: 0,
                execute_at: 1000,
                executed_at: None,
                repeat: None,
                parent: None,
                runs: 0,
                failure: None,
                requested_at: Some(1000),
            }),
        )
    }

    /// Writes what a confab without `wallet_pending` would: transfers, the
    /// schedule and the id counter, leaving the index alone.
    fn write_unindexed(store: &Store, put: &[(u64, u64, State)], unschedule: &[u64], next: u64) {
        let txn = store.db.begin_write().expect("write");
        {
            let mut transfers = txn.open_table(WALLET_TRANSFERS).expect("transfers");
            let mut schedule = txn.open_table(WALLET_SCHEDULE).expect("schedule");
            let mut meta = txn.open_table(META).expect("meta");
            for &(id, from, state) in put {
                transfers
                    .insert(id, transfer(id, from, state).as_slice())
                    .expect("insert");
                if state == State::Scheduled {
                    schedule.insert((1000, id), ()).expect("insert");
                }
            }
            for &id in unschedule {
                schedule.remove((1000, id)).expect("remove");
            }
            meta.insert("next_transfer_id", next).expect("insert");
        }
        txn.commit().expect("commit");
    }

    fn pending(store: &Store) -> Vec<(u64, u64)> {
        let txn = store.db.begin_read().expect("read");
        let t = txn.open_table(WALLET_PENDING).expect("pending");
        t.range::<(u64, u64)>(..)
            .expect("range")
            .map(|e| e.expect("entry").0.value())
            .collect()
    }

    #[test]
    fn the_pending_index_is_rebuilt_whenever_it_may_be_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A store from before the index: it is built on open.
        let store = Store::open(dir.path()).expect("open");
        write_unindexed(
            &store,
            &[
                (1, 7, State::Scheduled),
                (2, 7, State::Executed),
                (3, 9, State::Scheduled),
            ],
            &[],
            4,
        );
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(pending(&store), vec![(7, 1), (9, 3)]);
        // A confab that does not know the index cancels one and schedules
        // another: the sizes agree, the id counter gives it away.
        write_unindexed(
            &store,
            &[(1, 7, State::Cancelled), (4, 8, State::Scheduled)],
            &[1],
            5,
        );
        {
            let txn = store.db.begin_read().expect("read");
            let schedule = txn.open_table(WALLET_SCHEDULE).expect("schedule");
            assert_eq!(schedule.len().expect("len"), 2);
        }
        assert_eq!(
            pending(&store),
            vec![(7, 1), (9, 3)],
            "stale until reopened"
        );
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(pending(&store), vec![(8, 4), (9, 3)]);
        let txn = store.db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        assert_eq!(
            meta.get(PENDING_SYNCED).expect("get").map(|g| g.value()),
            Some(5)
        );
    }
}
