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
//!
//! The module's files, each importing only those above it:
//!
//! - `format`: the file's constants and field encoding, the tables a backup
//!   holds, what a backup reports, the names of confab's own backups;
//! - `partial`: the partial file a backup is written to, its lock, and the
//!   cleanup of stale ones;
//! - `writer`: writing a backup of a snapshot, online or offline;
//! - `restore`: reading, verifying and restoring a backup file;
//! - `server`: the server's one backup at a time, periodic backups and their
//!   retention, the backup taken before a migration.

mod format;
mod partial;
mod postgres;
mod restore;
mod server;
mod writer;

pub use format::{
    CANCELLED, Col, DERIVED_TABLES, FORMAT_VERSION, MAGIC, MAX_NAMED, OnDamage, PARTIAL_SUFFIX,
    PERIODIC_PREFIX, PRE_MIGRATION_PREFIX, Progress, SUFFIX, Summary, table_names,
    timestamped_name,
};
pub use partial::{is_own_partial, partial_path, remove_stale_partials};
pub use postgres::from_postgres;
pub use restore::{Contents, Restored, restore, verify};
pub use server::{BackupSlot, Backups, before_migration, periodic, prune, record, run_on_thread};
pub use writer::{Reader, offline, open_reader, secret_file, write, write_cancellable};
