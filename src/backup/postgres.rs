//! A backup of a cluster's PostgreSQL database, in the same file format
//! as the embedded store's (so one `confab restore` takes either: into a
//! single node's data directory, or into an empty database).
//!
//! Everything is read in one repeatable-read, read-only transaction — a
//! snapshot: every transaction committed before it is in the backup, none
//! committed after, not even partly — while the nodes keep writing. Each
//! table is read through a portal a few thousand rows at a time, in key
//! order, so memory stays bounded whatever the size of the database.
//!
//! The rows become the embedded store's records, exactly as its writer
//! makes them: sealed records in `users`, `rooms`, `members`, `messages`,
//! `wallet_entries`, `wallet_transfers` and `privacy`; and the index
//! tables the database answers with queries instead (`usernames`,
//! `user_rooms`, `message_log`, `client_ids`, `wallet_keys`,
//! `wallet_user_transfers`, `wallet_schedule`) derived from the rows. The
//! restore's checks (every record, the ledger) then hold for it as for any
//! backup.

use std::path::Path;

use serde_json::{Value as Json, json};
use tokio_postgres::{Row, Transaction};

use super::format::{Col, Progress, Summary};
use super::writer::{HashWriter, begin, count, end, into_file, summary_of};
use crate::storage::postgres::ledger::{TRANSFER_COLUMNS, transfer_record};
use crate::storage::postgres::rows::{audience, describe_error, u};
use crate::storage::postgres::{connect_one, describe, pg_config};
use crate::store::seal::{Rec, seal};
use crate::store::{
    self, MemberRecord, MessageRecord, PaymentInfo, Privacy, RoomKind, RoomRecord, UserRecord,
    encode,
};
use crate::wallet::EntryRecord;

/// Rows fetched from a table's portal at a time.
const FETCH: i32 = 2000;
/// Progress is reported at least every this many records.
const REPORT_RECORDS: u64 = 4096;

/// The file being written: its writer, the record being built, and what
/// has been written so far.
struct Out<'a> {
    w: HashWriter,
    rec: Vec<u8>,
    counts: serde_json::Map<String, Json>,
    progress: Progress,
    on_progress: &'a mut dyn FnMut(Progress),
    /// The table being written and its records so far.
    table: &'static str,
    count: u64,
}

fn io(e: std::io::Error) -> String {
    format!("cannot write the backup: {e}")
}

fn db(e: tokio_postgres::Error) -> String {
    format!("cannot read the database: {}", describe_error(&e))
}

impl Out<'_> {
    fn start(&mut self, table: &'static str) -> Result<(), String> {
        self.table = table;
        self.count = 0;
        self.w.name(b'T', table).map_err(io)
    }

    /// Writes the record `key` → `value`.
    fn put<K: Col, V: Col>(
        &mut self,
        key: &K::SelfType<'_>,
        value: &V::SelfType<'_>,
    ) -> Result<(), String> {
        self.rec.clear();
        K::put(key, &mut self.rec);
        V::put(value, &mut self.rec);
        self.w.write(&[1]).map_err(io)?;
        self.w
            .write(&(self.rec.len() as u32).to_le_bytes())
            .map_err(io)?;
        self.w.write(&self.rec).map_err(io)?;
        self.count += 1;
        if self.table == "messages" {
            self.progress.messages += 1;
        }
        if self.count.is_multiple_of(REPORT_RECORDS) {
            self.report();
        }
        Ok(())
    }

    /// Writes a sealed record: `key` → `seal(rec, key, body)`.
    fn sealed_u64(&mut self, rec: Rec, key: u64, body: Vec<u8>) -> Result<(), String> {
        let v = seal(rec, key, body);
        self.put::<u64, &[u8]>(&key, &v.as_slice())
    }

    fn sealed_pair(&mut self, rec: Rec, key: (u64, u64), body: Vec<u8>) -> Result<(), String> {
        let v = seal(rec, key, body);
        self.put::<(u64, u64), &[u8]>(&key, &v.as_slice())
    }

    fn finish(&mut self) -> Result<(), String> {
        self.w.write(&[0]).map_err(io)?;
        self.w.write(&self.count.to_le_bytes()).map_err(io)?;
        self.counts
            .insert(self.table.to_string(), self.count.into());
        Ok(())
    }

    fn report(&mut self) {
        self.progress.bytes = self.w.bytes;
        (self.on_progress)(self.progress);
    }
}

/// Calls `f` for every row of `sql`, fetched a portal page at a time.
async fn each(
    txn: &Transaction<'_>,
    sql: &str,
    mut f: impl FnMut(&Row) -> Result<(), String>,
) -> Result<(), String> {
    let stmt = txn.prepare(sql).await.map_err(db)?;
    let portal = txn.bind(&stmt, &[]).await.map_err(db)?;
    loop {
        let rows = txn.query_portal(&portal, FETCH).await.map_err(db)?;
        if rows.is_empty() {
            return Ok(());
        }
        for row in &rows {
            f(row)?;
        }
    }
}

/// `bigint` column `i` of `row` as a u64 (ids, seqs, amounts).
fn id(row: &Row, i: usize) -> Result<u64, String> {
    row.try_get::<_, i64>(i).map(u).map_err(db)
}

fn int(row: &Row, i: usize) -> Result<i64, String> {
    row.try_get::<_, i64>(i).map_err(db)
}

/// The tables of the file, in its order (`format::for_each_table!`).
async fn tables(
    txn: &Transaction<'_>,
    out: &mut Out<'_>,
    next_transfer: u64,
) -> Result<(), String> {
    out.start("meta")?;
    if next_transfer > 1 {
        out.put::<&str, u64>(&"next_transfer_id", &next_transfer)?;
    }
    out.put::<&str, u64>(&"schema_version", &store::SCHEMA_VERSION)?;
    out.finish()?;

    out.start("users")?;
    each(
        txn,
        "SELECT id, username, display_name, password_hash, created_at FROM users ORDER BY id",
        |r| {
            let rec = UserRecord {
                username: r.try_get(1).map_err(db)?,
                display_name: r.try_get(2).map_err(db)?,
                password_hash: r.try_get(3).map_err(db)?,
                created_at: int(r, 4)?,
            };
            out.sealed_u64(Rec::Users, id(r, 0)?, encode(&rec))
        },
    )
    .await?;
    out.finish()?;

    out.start("usernames")?;
    each(
        txn,
        "SELECT username, id FROM users ORDER BY username COLLATE \"C\"",
        |r| {
            let name: String = r.try_get(0).map_err(db)?;
            out.put::<&str, u64>(&name.as_str(), &id(r, 1)?)
        },
    )
    .await?;
    out.finish()?;

    out.start("contacts")?;
    each(
        txn,
        "SELECT owner, contact, added_at FROM contacts ORDER BY owner, contact",
        |r| out.put::<(u64, u64), i64>(&(id(r, 0)?, id(r, 1)?), &int(r, 2)?),
    )
    .await?;
    out.finish()?;

    out.start("rooms")?;
    each(
        txn,
        "SELECT id, kind, name, owner, created_at FROM rooms ORDER BY id",
        |r| {
            let kind = match r.try_get::<_, i16>(1).map_err(db)? {
                0 => RoomKind::Direct,
                1 => RoomKind::Group,
                k => return Err(format!("room {:016x} has an unknown kind {k}", id(r, 0)?)),
            };
            let rec = RoomRecord {
                kind,
                name: r.try_get(2).map_err(db)?,
                owner: r.try_get::<_, Option<i64>>(3).map_err(db)?.map(u),
                created_at: int(r, 4)?,
            };
            out.sealed_u64(Rec::Rooms, id(r, 0)?, encode(&rec))
        },
    )
    .await?;
    out.finish()?;

    out.start("members")?;
    each(
        txn,
        "SELECT room, user_id, joined_at, read_seq FROM members ORDER BY room, user_id",
        |r| {
            let rec = MemberRecord {
                joined_at: int(r, 2)?,
                read_seq: id(r, 3)?,
            };
            out.sealed_pair(Rec::Members, (id(r, 0)?, id(r, 1)?), encode(&rec))
        },
    )
    .await?;
    out.finish()?;

    out.start("user_rooms")?;
    each(
        txn,
        "SELECT user_id, room, joined_at FROM members ORDER BY user_id, room",
        |r| out.put::<(u64, u64), i64>(&(id(r, 0)?, id(r, 1)?), &int(r, 2)?),
    )
    .await?;
    out.finish()?;

    out.start("messages")?;
    each(
        txn,
        "SELECT room, seq, sender, ts, client_id, text, pay_transfer, pay_amount, pay_to, pay_note
           FROM messages ORDER BY room, seq",
        |r| {
            let payment = match r.try_get::<_, Option<i64>>(6).map_err(db)? {
                None => None,
                Some(transfer) => Some(PaymentInfo {
                    transfer: u(transfer),
                    amount: u(r.try_get::<_, Option<i64>>(7).map_err(db)?.unwrap_or(0)),
                    to: u(r.try_get::<_, Option<i64>>(8).map_err(db)?.unwrap_or(0)),
                    note: r.try_get(9).map_err(db)?,
                }),
            };
            let rec = MessageRecord {
                from: id(r, 2)?,
                ts: int(r, 3)?,
                client_id: r.try_get(4).map_err(db)?,
                text: r.try_get(5).map_err(db)?,
                payment,
            };
            out.sealed_pair(Rec::Messages, (id(r, 0)?, id(r, 1)?), rec.encode())
        },
    )
    .await?;
    out.finish()?;

    out.start("message_log")?;
    each(
        txn,
        "SELECT pos, room, seq FROM messages ORDER BY pos",
        |r| out.put::<u64, (u64, u64)>(&id(r, 0)?, &(id(r, 1)?, id(r, 2)?)),
    )
    .await?;
    out.finish()?;

    // Payment messages are not sent with a client id of their own.
    out.start("client_ids")?;
    each(
        txn,
        "SELECT room, sender, client_id, seq FROM messages WHERE pay_transfer IS NULL
          ORDER BY room, sender, client_id COLLATE \"C\"",
        |r| {
            let cid: String = r.try_get(2).map_err(db)?;
            out.put::<(u64, u64, &str), u64>(&(id(r, 0)?, id(r, 1)?, cid.as_str()), &id(r, 3)?)
        },
    )
    .await?;
    out.finish()?;

    out.start("revoked_tokens")?;
    each(
        txn,
        "SELECT jti, exp FROM revoked ORDER BY jti COLLATE \"C\"",
        |r| {
            let jti: String = r.try_get(0).map_err(db)?;
            out.put::<&str, i64>(&jti.as_str(), &int(r, 1)?)
        },
    )
    .await?;
    out.finish()?;

    out.start("last_seen")?;
    each(
        txn,
        "SELECT id, last_seen FROM users WHERE last_seen IS NOT NULL ORDER BY id",
        |r| out.put::<u64, i64>(&id(r, 0)?, &int(r, 1)?),
    )
    .await?;
    out.finish()?;

    wallet(txn, out).await?;

    // Retired with the cluster of shards: always empty.
    out.start("cluster_outbox")?;
    out.finish()?;

    // Only settings that differ from the defaults have a record.
    out.start("privacy")?;
    each(
        txn,
        "SELECT id, presence, group_adds FROM users
          WHERE presence <> 0 OR group_adds <> 0 ORDER BY id",
        |r| {
            let p = Privacy {
                presence: audience(r.try_get(1).map_err(db)?),
                group_adds: audience(r.try_get(2).map_err(db)?),
            };
            out.sealed_u64(Rec::Privacy, id(r, 0)?, encode(&p))
        },
    )
    .await?;
    out.finish()
}

/// The wallet's tables, and the indexes the embedded writer keeps beside
/// the ledger (see `writes::wallet`).
async fn wallet(txn: &Transaction<'_>, out: &mut Out<'_>) -> Result<(), String> {
    out.start("wallet_accounts")?;
    each(
        txn,
        "SELECT account, balance FROM wallet_accounts ORDER BY account",
        |r| out.put::<u64, u64>(&id(r, 0)?, &id(r, 1)?),
    )
    .await?;
    out.finish()?;

    out.start("wallet_entries")?;
    each(
        txn,
        "SELECT account, n, transfer, delta, balance_after, ts FROM wallet_entries
          ORDER BY account, n",
        |r| {
            let rec = EntryRecord {
                transfer: id(r, 2)?,
                delta: int(r, 3)?,
                balance_after: id(r, 4)?,
                ts: int(r, 5)?,
            };
            out.sealed_pair(Rec::WalletEntries, (id(r, 0)?, id(r, 1)?), encode(&rec))
        },
    )
    .await?;
    out.finish()?;

    out.start("wallet_transfers")?;
    each(
        txn,
        &format!("SELECT {TRANSFER_COLUMNS} FROM wallet_transfers ORDER BY id"),
        |r| {
            let (tid, rec) = transfer_record(r).map_err(|e| e.message)?;
            out.sealed_u64(Rec::WalletTransfers, tid, encode(&rec))
        },
    )
    .await?;
    out.finish()?;

    // (sender, idempotency key) → transfer: every transfer a user asked for,
    // and every credit given a key (an unkeyed credit is named
    // `credit-<id>` but not indexed). The runs of a recurring transfer are
    // found through it.
    out.start("wallet_keys")?;
    each(
        txn,
        "SELECT from_account, key, id FROM wallet_transfers
          WHERE parent IS NULL AND NOT (from_account = 0 AND key = 'credit-' || id)
          ORDER BY from_account, key COLLATE \"C\"",
        |r| {
            let key: String = r.try_get(1).map_err(db)?;
            out.put::<(u64, &str), u64>(&(id(r, 0)?, key.as_str()), &id(r, 2)?)
        },
    )
    .await?;
    out.finish()?;

    // A user's transfers: the sender's always, the recipient's once the
    // money moved.
    out.start("wallet_user_transfers")?;
    each(
        txn,
        "SELECT from_account, id FROM wallet_transfers WHERE from_account <> 0
         UNION
         SELECT to_account, id FROM wallet_transfers WHERE state = 1
         ORDER BY 1, 2",
        |r| out.put::<(u64, u64), ()>(&(id(r, 0)?, id(r, 1)?), &()),
    )
    .await?;
    out.finish()?;

    out.start("wallet_schedule")?;
    each(
        txn,
        "SELECT execute_at, id FROM wallet_transfers WHERE state = 0 ORDER BY execute_at, id",
        |r| out.put::<(i64, u64), ()>(&(int(r, 0)?, id(r, 1)?), &()),
    )
    .await?;
    out.finish()
}

/// Backs up the database at `url` to `to` (via `to.partial`, renamed when
/// complete and synced), with `secret` (the token secret file, when the
/// node has one) — from one snapshot, while the cluster keeps writing.
pub fn from_postgres(
    url: &str,
    secret: Option<&[u8]>,
    to: &Path,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Summary, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let described = describe(&pg_config(url)?);
    let mut client = rt.block_on(connect_one(url, "confab-backup"))?;
    let known = crate::storage::postgres::schema::SCHEMA_VERSION;
    match rt.block_on(crate::storage::postgres::schema::stored_version(&client)) {
        Ok(0) => return Err(format!("the database at {described} holds no confab data")),
        Ok(v) if v > known => {
            return Err(format!(
                "the database at {described} has schema version {v}, newer than this confab \
                 knows ({known}): back it up with a newer confab"
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(db(e)),
    }
    let txn = rt
        .block_on(
            client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start(),
        )
        .map_err(db)?;
    // The snapshot's figures (its first query fixes the snapshot).
    let row = rt
        .block_on(txn.query_one(
            "SELECT (SELECT value FROM meta WHERE key = 'log_pos'),
                    (SELECT coalesce(max(id), 0) FROM wallet_transfers),
                    (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                       FROM wallet_transfer_ids)",
            &[],
        ))
        .map_err(db)?;
    let pos = u(row.try_get::<_, Option<i64>>(0).map_err(db)?.unwrap_or(0));
    let last_transfer = u(int(&row, 1)?.max(int(&row, 2)?));
    into_file(to, |file| {
        let mut out = Out {
            w: HashWriter::new(file),
            rec: Vec::with_capacity(512),
            counts: serde_json::Map::new(),
            progress: Progress {
                total_messages: pos,
                ..Default::default()
            },
            on_progress,
            table: "",
            count: 0,
        };
        begin(&mut out.w, store::SCHEMA_VERSION, pos).map_err(io)?;
        out.report();
        rt.block_on(tables(&txn, &mut out, last_transfer + 1))?;
        let summary = json!({"tables": out.counts, "messages": count(&out.counts, "messages")});
        let (bytes, file) = end(out.w, secret, &summary)?;
        out.progress.bytes = bytes;
        (out.on_progress)(out.progress);
        file.sync_all().map_err(io)?;
        Ok(summary_of(
            to,
            bytes,
            &out.counts,
            store::SCHEMA_VERSION,
            pos,
            secret.is_some(),
        ))
    })
}
