//! The target of a migration: the cluster's PostgreSQL database. Checked
//! before anything is written ([`Target::prepare`]), then filled batch by
//! batch ([`Target::copy`]), then read back for the comparison
//! ([`Target::summary`]).
//!
//! What the database records of a migration, in `meta` (values are
//! `bigint`): `migrated_from` (the source's id), `migrated_log_head`,
//! `migrated_messages` and `migrated_transfer_id` (the state the source
//! was copied in), `migration_started_at` and, once verified,
//! `migration_verified_at` (Unix ms). Written once each: a re-run of the
//! same migration changes none of them.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::mpsc;
use tokio_postgres::{Client, IsolationLevel, Statement};

use super::batch::{Batch, TABLES};
use super::report::{Failure, resume_hint};
use super::source::Snapshot;
use super::verify::Figures;
use crate::storage::postgres::rows::{describe_error, u};
use crate::storage::postgres::schema::{self, SCHEMA_VERSION};
use crate::storage::postgres::{connect_one, describe, ledger, pg_config};

/// Key of the session advisory lock a migration holds: one at a time per
/// database.
const MIGRATE_LOCK: i64 = 0x636f_6e66_6162_0002;

/// The database, connected.
pub struct Target {
    client: Client,
    described: String,
}

/// What [`Target::prepare`] found and did.
pub struct Prepared {
    /// Messages up to this stream position are in the database already.
    pub resume_after: u64,
    /// The database held this source's migration already.
    pub resumed: bool,
    /// Whether preparing changed anything (the schema, the records of
    /// the migration, the stream position, the id sequence).
    pub changed: bool,
}

fn reading(e: tokio_postgres::Error) -> Failure {
    Failure::unchanged(format!("reading the database: {}", describe_error(&e)))
}

fn writing(e: tokio_postgres::Error) -> String {
    format!("writing to the database: {}", describe_error(&e))
}

impl Target {
    /// Connects (the error names the host and says whether it did not
    /// answer or refused).
    pub async fn connect(url: &str) -> Result<Target, String> {
        let described = describe(&pg_config(url)?);
        // Told apart from the nodes' sessions in `pg_stat_activity`.
        let client = connect_one(url, "confab-migrate").await?;
        Ok(Target { client, described })
    }

    /// Hosts and database, for people.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// Checks that the database may take this source — its schema not
    /// newer than this binary's; empty, or holding this source's own
    /// migration of the same state — and refuses otherwise, changing
    /// nothing. Then brings the schema up to date, records the source and
    /// moves the stream position and the transfer id sequence past the
    /// source's (all idempotent), and finds where the message copy resumes.
    pub async fn prepare(&mut self, snap: &Snapshot) -> Result<Prepared, Failure> {
        let locked: bool = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(reading)?
            .get(0);
        if !locked {
            return Err(Failure::unchanged(
                "another `confab migrate` is running on this database (or the database has not yet ended the session of one that was stopped): let it finish, or try again in a moment",
            ));
        }
        let version = schema::stored_version(&self.client)
            .await
            .map_err(reading)?;
        if version > SCHEMA_VERSION {
            return Err(Failure::unchanged(format!(
                "the database has schema version {version}, newer than this confab knows ({SCHEMA_VERSION}): run a newer confab's migrate"
            )));
        }
        let resumed = if version == 0 {
            self.check_not_foreign().await?;
            false
        } else {
            self.check_own(snap).await?
        };
        let before = version;
        schema::migrate(&mut self.client)
            .await
            .map_err(Failure::unchanged)?;
        let changed = self
            .record(snap)
            .await
            .map_err(|e| Failure::midway(resume_hint(&e)))?;
        let resume_after: i64 = self
            .client
            .query_one(
                "SELECT COALESCE(max(pos), 0) FROM messages WHERE pos <= $1",
                &[&(snap.head as i64)],
            )
            .await
            .map_err(|e| Failure::midway(resume_hint(&writing(e))))?
            .get(0);
        // Each batch is one transaction; the last commit (of the
        // verification's record) waits for all of them to be durable.
        self.client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(|e| Failure::midway(resume_hint(&writing(e))))?;
        Ok(Prepared {
            resume_after: u(resume_after),
            resumed,
            changed: changed || before < SCHEMA_VERSION,
        })
    }

    /// A database without confab's schema must have no tables at all.
    async fn check_not_foreign(&self) -> Result<(), Failure> {
        let tables: Vec<String> = self
            .client
            .query(
                "SELECT tablename::text FROM pg_catalog.pg_tables
                 WHERE schemaname = current_schema() ORDER BY tablename LIMIT 5",
                &[],
            )
            .await
            .map_err(reading)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if tables.is_empty() {
            return Ok(());
        }
        Err(Failure::unchanged(format!(
            "the database already holds tables that are not confab's ({}); confab migrate only fills an empty database",
            tables.join(", ")
        )))
    }

    /// A database with confab's schema: empty, or this source's migration
    /// of the same state (then true: this run resumes it).
    async fn check_own(&self, snap: &Snapshot) -> Result<bool, Failure> {
        let marks: HashMap<String, i64> = self
            .client
            .query("SELECT key, value FROM meta WHERE key LIKE 'migrat%'", &[])
            .await
            .map_err(reading)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let Some(&from) = marks.get("migrated_from") else {
            let held = self
                .client
                .query_one(
                    "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM rooms),
                            (SELECT count(*) FROM messages), (SELECT count(*) FROM wallet_transfers)",
                    &[],
                )
                .await
                .map_err(reading)?;
            let n = |i: usize| held.get::<_, i64>(i);
            if (0..4).all(|i| n(i) == 0) {
                return Ok(false);
            }
            return Err(Failure::unchanged(format!(
                "the database already holds data ({} users, {} rooms, {} messages, {} transfers); confab migrate only fills an empty database, or resumes its own migration of the same source",
                n(0),
                n(1),
                n(2),
                n(3)
            )));
        };
        if from != snap.id {
            return Err(Failure::unchanged(format!(
                "the database holds the migration of another node (source {:016x}; this one is {:016x}); confab migrate only fills an empty database, or resumes its own migration of the same source",
                from as u64, snap.id as u64
            )));
        }
        let mark = |k: &str| marks.get(k).copied().map(u);
        if mark("migrated_log_head") != Some(snap.head)
            || mark("migrated_messages") != Some(snap.messages)
            || mark("migrated_transfer_id") != Some(snap.last_transfer_id)
        {
            return Err(Failure::unchanged(format!(
                "the database holds a migration of this node taken when it had {} messages (stream position {}); it has {} now (position {}): the node ran since. Migrate into a new, empty database, so that nothing it wrote since is missing",
                mark("migrated_messages").unwrap_or(0),
                mark("migrated_log_head").unwrap_or(0),
                snap.messages,
                snap.head
            )));
        }
        Ok(true)
    }

    /// Records the source and moves the stream position and the transfer id
    /// sequence past the source's, in one transaction; whether anything
    /// changed (nothing does on a re-run).
    async fn record(&mut self, snap: &Snapshot) -> Result<bool, String> {
        let txn = self.client.transaction().await.map_err(writing)?;
        let now = crate::store::now_ms();
        let marked = txn
            .execute(
                "INSERT INTO meta (key, value) VALUES
                     ('migrated_from', $1), ('migrated_log_head', $2),
                     ('migrated_messages', $3), ('migrated_transfer_id', $4),
                     ('migration_started_at', $5)
                 ON CONFLICT (key) DO NOTHING",
                &[
                    &snap.id,
                    &(snap.head as i64),
                    &(snap.messages as i64),
                    &(snap.last_transfer_id as i64),
                    &now,
                ],
            )
            .await
            .map_err(writing)?;
        let moved = txn
            .execute(
                "UPDATE meta SET value = $1 WHERE key = 'log_pos' AND value < $1",
                &[&(snap.head as i64)],
            )
            .await
            .map_err(writing)?;
        let ids = if snap.last_transfer_id > 0 {
            txn.query(
                "SELECT setval('wallet_transfer_ids', $1) FROM wallet_transfer_ids
                 WHERE NOT is_called OR last_value < $1",
                &[&(snap.last_transfer_id as i64)],
            )
            .await
            .map_err(writing)?
            .len()
        } else {
            0
        };
        txn.commit().await.map_err(writing)?;
        Ok(marked + moved > 0 || ids > 0)
    }

    /// Inserts every batch that comes (skipping rows already there);
    /// `progress` hears of the messages done. Returns the rows inserted
    /// per table.
    pub async fn copy(
        &mut self,
        rx: &mut mpsc::Receiver<Batch>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BTreeMap<&'static str, u64>, String> {
        let mut inserted: BTreeMap<&'static str, u64> =
            TABLES.iter().map(|t| (t.name, 0)).collect();
        let mut statements: HashMap<&'static str, Statement> = HashMap::new();
        let mut messages = 0u64;
        while let Some(batch) = rx.recv().await {
            let name = batch.table.name;
            let statement = match statements.get(name) {
                Some(s) => s.clone(),
                None => {
                    let s = self
                        .client
                        .prepare(&batch.table.insert_sql())
                        .await
                        .map_err(writing)?;
                    statements.insert(name, s.clone());
                    s
                }
            };
            let n = self
                .client
                .execute(&statement, &batch.params())
                .await
                .map_err(|e| format!("copying {name} into the database: {}", describe_error(&e)))?;
            *inserted.entry(name).or_default() += n;
            if name == "messages" {
                messages += batch.rows as u64;
                progress(messages);
            }
        }
        Ok(inserted)
    }

    /// The database's figures to compare with the source's (counts in one
    /// snapshot; revoked tokens unexpired at `now_secs`), and its ledger
    /// check.
    pub async fn summary(&mut self, now_secs: i64) -> Result<Figures, String> {
        let mut f = Figures::default();
        let txn = self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(writing)?;
        let r = txn
            .query_one(
                "SELECT (SELECT count(*) FROM users),
                        (SELECT count(*) FROM users WHERE last_seen IS NOT NULL),
                        (SELECT count(*) FROM users WHERE presence <> 0 OR group_adds <> 0),
                        (SELECT count(*) FROM contacts),
                        (SELECT count(*) FROM revoked WHERE exp > $1),
                        (SELECT count(*) FROM rooms),
                        (SELECT count(*) FROM members),
                        (SELECT count(*) FROM messages),
                        (SELECT count(*) FROM wallet_accounts),
                        (SELECT count(*) FROM wallet_entries),
                        (SELECT count(*) FROM wallet_transfers),
                        (SELECT value FROM meta WHERE key = 'log_pos'),
                        (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                           FROM wallet_transfer_ids)",
                &[&now_secs],
            )
            .await
            .map_err(writing)?;
        let names = [
            "users",
            "last_seen",
            "privacy",
            "contacts",
            "revoked",
            "rooms",
            "members",
            "messages",
            "wallet_accounts",
            "wallet_entries",
            "wallet_transfers",
        ];
        for (i, name) in names.into_iter().enumerate() {
            f.count(name, u(r.try_get(i).map_err(writing)?));
        }
        f.head = u(r
            .try_get::<_, Option<i64>>(11)
            .map_err(writing)?
            .unwrap_or(0));
        f.last_transfer_id = u(r.try_get(12).map_err(writing)?);
        for r in txn
            .query(
                "SELECT r.id, r.last_seq, COALESCE(m.n, 0), COALESCE(m.hi, 0)
                 FROM rooms r
                 LEFT JOIN (SELECT room, count(*) AS n, max(seq) AS hi
                            FROM messages GROUP BY room) m ON m.room = r.id",
                &[],
            )
            .await
            .map_err(writing)?
        {
            let (id, last, n, hi): (i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
            f.rooms.insert(u(id), (u(n), u(last)));
            if hi > last {
                f.seq_above_last.push(u(id));
            }
        }
        for r in txn
            .query("SELECT account, balance FROM wallet_accounts", &[])
            .await
            .map_err(writing)?
        {
            f.balances.insert(u(r.get(0)), u(r.get(1)));
        }
        txn.commit().await.map_err(writing)?;
        f.ledger = ledger::verify(&mut self.client)
            .await
            .map_err(|e| format!("the database's ledger check could not run: {}", e.message))?;
        Ok(f)
    }

    /// Records that the migration was verified, the first time (waiting
    /// for everything copied before it to be durable); whether this
    /// changed anything.
    pub async fn mark_verified(&self) -> Result<bool, String> {
        self.client
            .batch_execute("RESET synchronous_commit")
            .await
            .map_err(writing)?;
        let n = self
            .client
            .execute(
                "INSERT INTO meta (key, value) VALUES ('migration_verified_at', $1)
                 ON CONFLICT (key) DO NOTHING",
                &[&crate::store::now_ms()],
            )
            .await
            .map_err(writing)?;
        Ok(n > 0)
    }
}
