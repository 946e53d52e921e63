//! The cluster database's schema and its versioned migrations.
//!
//! `schema_version` in `meta` says which of [`MIGRATIONS`] a database has.
//! Opening applies the missing ones, in order, each in its own transaction
//! (under an advisory lock, so that nodes starting together migrate once);
//! a database whose version is newer than [`SCHEMA_VERSION`] is refused,
//! naming both versions, and nothing is changed.
//!
//! `confab migrate` records the single node it copied in `meta` too
//! (`migrated_*`, `migration_*`; see `migrate/target.rs`).
//!
//! Ids (users, rooms, transfers) are `u64` in confab and `bigint` here: the
//! same 64 bits, read back with `as u64` — order by them only in Rust.
//! Times are Unix milliseconds (`bigint`).

use tokio_postgres::Client;

/// The schema this binary writes.
pub const SCHEMA_VERSION: i64 = 2;

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x636f_6e66_6162_0001;

/// Migration `i` brings a database from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything a cluster node keeps.
    r#"
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value bigint NOT NULL
);
-- The message stream's last position: taken under this row's lock, so
-- positions are assigned in commit order across every node.
INSERT INTO meta (key, value) VALUES ('log_pos', 0);

CREATE TABLE users (
    id            bigint PRIMARY KEY,
    username      text   NOT NULL UNIQUE,  -- lowercase
    display_name  text   NOT NULL,
    password_hash text   NOT NULL,
    created_at    bigint NOT NULL,
    last_seen     bigint,
    -- privacy: 0 everyone, 1 contacts, 2 nobody
    presence      smallint NOT NULL DEFAULT 0,
    group_adds    smallint NOT NULL DEFAULT 0
);
CREATE INDEX users_username_prefix ON users (username text_pattern_ops);

CREATE TABLE contacts (
    owner    bigint NOT NULL,
    contact  bigint NOT NULL,
    added_at bigint NOT NULL,
    PRIMARY KEY (owner, contact)
);

CREATE TABLE rooms (
    id         bigint   PRIMARY KEY,
    kind       smallint NOT NULL,  -- 0 direct, 1 group
    name       text,
    owner      bigint,
    created_at bigint   NOT NULL,
    -- The last seq assigned (0: no message yet).
    last_seq   bigint   NOT NULL DEFAULT 0
);

CREATE TABLE members (
    room      bigint NOT NULL,
    user_id   bigint NOT NULL,
    joined_at bigint NOT NULL,
    read_seq  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (room, user_id)
);
CREATE INDEX members_by_user ON members (user_id, room);

CREATE TABLE messages (
    room         bigint NOT NULL,
    seq          bigint NOT NULL,
    pos          bigint NOT NULL,
    sender       bigint NOT NULL,
    ts           bigint NOT NULL,
    client_id    text   NOT NULL,
    text         text   NOT NULL,
    -- A payment message: the transfer it shows (the ledger is the truth).
    pay_transfer bigint,
    pay_amount   bigint,
    pay_to       bigint,
    pay_note     text,
    PRIMARY KEY (room, seq)
);
CREATE UNIQUE INDEX messages_by_pos ON messages (pos);
CREATE UNIQUE INDEX messages_by_client_id ON messages (room, sender, client_id);

-- Each writer's last committed batch: how a writer whose connection
-- dropped during a commit learns whether that commit happened.
CREATE TABLE writer_marks (
    writer text   PRIMARY KEY,
    batch  bigint NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE revoked (
    jti text   PRIMARY KEY,
    exp bigint NOT NULL
);

CREATE TABLE wallet_accounts (
    account bigint PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);

CREATE TABLE wallet_entries (
    account       bigint NOT NULL,
    n             bigint NOT NULL,
    transfer      bigint NOT NULL,
    delta         bigint NOT NULL,
    balance_after bigint NOT NULL,
    ts            bigint NOT NULL,
    PRIMARY KEY (account, n)
);
CREATE INDEX wallet_entries_by_transfer ON wallet_entries (transfer);

CREATE SEQUENCE wallet_transfer_ids START 1;
CREATE TABLE wallet_transfers (
    id           bigint   PRIMARY KEY,
    from_account bigint   NOT NULL,
    to_account   bigint   NOT NULL,
    amount       bigint   NOT NULL,
    note         text,
    key          text     NOT NULL,
    -- 0 scheduled, 1 executed, 2 failed, 3 cancelled
    state        smallint NOT NULL,
    created_at   bigint   NOT NULL,
    execute_at   bigint   NOT NULL,
    executed_at  bigint,
    -- 0 weekly, 1 monthly
    repeat       smallint,
    parent       bigint,
    parent_run   integer,
    runs         integer  NOT NULL DEFAULT 0,
    failure      text,
    requested_at bigint
);
-- Idempotency: one transfer per (sender, key); each run of a recurring
-- transfer exists once.
CREATE UNIQUE INDEX wallet_transfers_by_key ON wallet_transfers (from_account, key)
    WHERE parent IS NULL;
CREATE UNIQUE INDEX wallet_transfers_runs ON wallet_transfers (parent, parent_run)
    WHERE parent IS NOT NULL;
CREATE INDEX wallet_transfers_due ON wallet_transfers (execute_at) WHERE state = 0;
CREATE INDEX wallet_transfers_pending ON wallet_transfers (from_account) WHERE state = 0;
CREATE INDEX wallet_transfers_by_from ON wallet_transfers (from_account, id);
CREATE INDEX wallet_transfers_by_to ON wallet_transfers (to_account, id);
"#,
    // 2: attachments' bytes (`blobs.rs`), in chunks every node can read.
    r#"
CREATE TABLE blobs (
    id         bytea  PRIMARY KEY,  -- SHA-256 of the bytes
    size       bigint NOT NULL,
    created_at bigint NOT NULL
);
CREATE TABLE blob_chunks (
    id   bytea   NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    n    integer NOT NULL,
    data bytea   NOT NULL,
    PRIMARY KEY (id, n)
);
-- Photos, audio and video are compressed already: stored out of line
-- without trying to compress them again.
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
"#,
];

/// Brings the database to [`SCHEMA_VERSION`], or refuses a newer one.
pub async fn migrate(client: &mut Client) -> Result<(), String> {
    let err = |e: tokio_postgres::Error| {
        format!(
            "migrating the database: {}",
            super::rows::describe_error(&e)
        )
    };
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    let result = migrate_locked(client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn migrate_locked(client: &mut Client) -> Result<(), String> {
    let err = |e: tokio_postgres::Error| {
        format!(
            "migrating the database: {}",
            super::rows::describe_error(&e)
        )
    };
    let version = stored_version(client).await.map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "the database has schema version {version}, newer than this confab knows \
             ({SCHEMA_VERSION}): run a newer confab (nothing was changed)"
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let to = i as i64 + 1;
        let txn = client.transaction().await.map_err(err)?;
        txn.batch_execute(sql).await.map_err(err)?;
        txn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = $1",
            &[&to],
        )
        .await
        .map_err(err)?;
        txn.commit().await.map_err(err)?;
        tracing::info!(version = to, "database schema migrated");
    }
    Ok(())
}

/// The database's schema version (0: an empty database).
pub async fn stored_version(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let has_meta: bool = client
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .await?
        .get(0);
    if !has_meta {
        return Ok(0);
    }
    let row = client
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .await?;
    Ok(row.map(|r| r.get(0)).unwrap_or(0))
}
