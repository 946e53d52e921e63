//! The redb tables (names, key and value types) and the schema version:
//! the on-disk layout `docs/STORAGE.md` documents; change both together
//! and bump [`SCHEMA_VERSION`] for incompatible changes.

use redb::TableDefinition;

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
/// The outbox of the cluster that kept a shard per node (retired: a
/// cluster now shares one PostgreSQL database). Always empty on a single
/// node; kept in the format so that stores and backups written by earlier
/// versions still open, check and restore.
pub const CLUSTER_OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("cluster_outbox");
/// user id → [`Privacy`] (postcard); no row: the defaults (schema 3).
pub const PRIVACY: TableDefinition<u64, &[u8]> = TableDefinition::new("privacy");
