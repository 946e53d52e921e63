//! The source of a migration: a stopped node's store (or a backup restored
//! into a scratch directory), read in one redb snapshot. It gives the rows
//! to copy, table by table ([`Source::produce`]), and the figures the
//! database must match ([`Source::summary`]).
//!
//! Every record is unsealed (`store::seal`) and decoded here: a damaged one
//! is reported ([`Damage`]) and left out, never replaced by made-up data;
//! a lost-message placeholder (left by an earlier `--skip-damaged` backup)
//! is left out and counted. A page redb cannot read ends the migration with
//! what to do about it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use redb::{ReadableTable, ReadableTableMetadata};
use sha2::{Digest, Sha256};

use super::batch::{self, Batch, Cell, big, text};
use super::scan::{
    Damage, STOPPED, err, guarded, len, open, readable, scan, unseal, unseal_message,
};
use super::verify::Figures;
use crate::backup;
use crate::storage::postgres::ledger::{repeat_code, state_code};
use crate::storage::postgres::rows::audience_code;
use crate::store::integrity::Finding;
use crate::store::seal::Rec;
use crate::store::{
    self, CLUSTER_OUTBOX, CONTACTS, LAST_SEEN, MEMBERS, MESSAGE_LOG, MESSAGES, META, MemberRecord,
    PRIVACY, Privacy, REVOKED, ROOMS, RoomKind, RoomRecord, SCHEMA_VERSION, USERS, UserRecord,
    WALLET_ACCOUNTS, WALLET_ENTRIES, WALLET_TRANSFERS,
};
use crate::wallet::{EntryRecord, TransferRecord};

/// What identifies a source and the state it was copied in: recorded in
/// the database, so that a re-run knows its own migration.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// The first 8 bytes of a SHA-256 of the node's token secret (or, with
    /// none, of its first user), as a `bigint`.
    pub id: i64,
    pub id_from: &'static str,
    /// The last message stream position.
    pub head: u64,
    /// Records in `messages`.
    pub messages: u64,
    /// The highest transfer id given out.
    pub last_transfer_id: u64,
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The source, opened (fields drop in order: the snapshot before its
/// database, the database before its scratch directory).
pub struct Source {
    txn: redb::ReadTransaction,
    _reader: backup::Reader,
    _scratch: Option<Scratch>,
    what: String,
    snapshot: Snapshot,
}

/// Where batches go, and the stream positions found without a message.
struct Out<'a> {
    send: &'a mut dyn FnMut(Batch) -> bool,
    damage: Damage,
}

impl Out<'_> {
    /// Sends `batch` when it is full (or, with `last`, when it has rows).
    fn emit(&mut self, batch: &mut Batch, last: bool) -> Result<(), String> {
        if batch.rows == 0 || !(last || batch.full()) {
            return Ok(());
        }
        let full = std::mem::replace(batch, Batch::new(batch.table));
        if (self.send)(full) {
            Ok(())
        } else {
            Err(STOPPED.into())
        }
    }
}

impl Source {
    /// A stopped node's data directory.
    pub fn open_dir(dir: &Path, configured_secret: Option<&[u8]>) -> Result<Source, String> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "the data directory {} does not exist",
                    dir.display()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot read the data directory {}: {e}",
                    dir.display()
                ));
            }
        }
        if std::os::unix::net::UnixStream::connect(dir.join(crate::config::ADMIN_SOCKET)).is_ok() {
            return Err(format!(
                "a confab server is running on {} (its admin socket answers): stop it first. \
                 confab migrate copies a stopped node, so that nothing it writes afterwards is left behind",
                dir.display()
            ));
        }
        let reader = backup::open_reader(dir)?;
        let secret = configured_secret
            .map(<[u8]>::to_vec)
            .or_else(|| backup::secret_file(dir));
        Source::new(
            reader,
            None,
            format!("{}", dir.display()),
            secret,
            "start `confab serve` of this version on it once (it upgrades the store, taking a backup first), stop it, then migrate",
        )
    }

    /// A backup file: fully verified and restored into a scratch directory
    /// under the temp dir (`TMPDIR`), removed afterwards.
    pub fn open_backup(
        file: &Path,
        configured_secret: Option<&[u8]>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Source, String> {
        match std::fs::metadata(file) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(format!("{} is not a file", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("the backup file {} does not exist", file.display()));
            }
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        }
        let scratch = Scratch(std::env::temp_dir().join(format!(
            "confab-migrate-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )));
        let data = scratch.0.join("data");
        backup::restore(file, &data, false, &mut |_, p| {
            progress(p.messages, p.total_messages)
        })
        .map_err(|e| format!("the backup {} cannot be used: {e}", file.display()))?;
        let reader = backup::open_reader(&data)?;
        let secret = configured_secret
            .map(<[u8]>::to_vec)
            .or_else(|| backup::secret_file(&data));
        Source::new(
            reader,
            Some(scratch),
            format!("{}", file.display()),
            secret,
            "restore it with `confab restore`, start `confab serve` of this version on it once (it upgrades the store), stop it, then migrate the data directory",
        )
    }

    fn new(
        reader: backup::Reader,
        scratch: Option<Scratch>,
        what: String,
        secret: Option<Vec<u8>>,
        to_upgrade: &str,
    ) -> Result<Source, String> {
        let txn = reader.begin_read()?;
        let snapshot = guarded(|| {
            match store::schema_version(&txn)? {
                None => return Err(format!("{what} holds no confab store (it is empty)")),
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(format!(
                        "{what} holds a store of schema {v}, written by a newer confab (this one understands {SCHEMA_VERSION}): run the newer confab's migrate"
                    ));
                }
                Some(v) if v < SCHEMA_VERSION => {
                    return Err(format!(
                        "{what} holds a store of schema {v}, older than this confab's ({SCHEMA_VERSION}): {to_upgrade}"
                    ));
                }
                Some(_) => {}
            }
            let outbox = len(&txn, CLUSTER_OUTBOX)?;
            if outbox > 0 {
                return Err(format!(
                    "{what} holds {outbox} entries of the retired cluster's outbox (transfers on their way to another shard): it is a shard of that cluster, not a single node, and cannot be migrated alone"
                ));
            }
            snapshot_of(&txn, secret.as_deref())
        })?;
        Ok(Source {
            txn,
            _reader: reader,
            _scratch: scratch,
            what,
            snapshot,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
    }

    /// The data directory or backup file, for people.
    pub fn describe(&self) -> String {
        self.what.clone()
    }

    /// Messages in the stream after position `after` (what the copy has
    /// left to do).
    pub fn messages_after(&self, after: u64) -> u64 {
        guarded(|| {
            let Some(log) = open(&self.txn, MESSAGE_LOG)? else {
                return Ok(0);
            };
            let all = log.len().map_err(err)?;
            let done = log.range(..=after).map_err(err)?.count() as u64;
            Ok(all.saturating_sub(done))
        })
        .unwrap_or(0)
    }

    /// Sends every row to copy, table by table, in batches (`send` answers
    /// false when the database side has stopped); messages only after
    /// stream position `resume_after`, in stream order. Revoked tokens
    /// expired at `now_secs` are left behind. Damaged records are left out
    /// (the summary names them); returns what else is missing: stream
    /// positions whose message is not there.
    pub fn produce(
        &self,
        resume_after: u64,
        now_secs: i64,
        send: &mut dyn FnMut(Batch) -> bool,
    ) -> Result<Damage, String> {
        let mut out = Out {
            send,
            damage: Damage::default(),
        };
        guarded(|| {
            self.users(&mut out)?;
            self.contacts(&mut out)?;
            self.revoked(&mut out, now_secs)?;
            self.rooms(&mut out)?;
            self.members(&mut out)?;
            self.messages(&mut out, resume_after)?;
            self.wallet(&mut out)
        })?;
        Ok(out.damage)
    }

    fn users(&self, out: &mut Out<'_>) -> Result<(), String> {
        let last_seen = open(&self.txn, LAST_SEEN)?;
        let privacy = open(&self.txn, PRIVACY)?;
        let mut b = Batch::new(&batch::USERS);
        scan(&self.txn, USERS, |id, value| {
            let rec: UserRecord = match unseal(Rec::Users, id, value) {
                Ok(r) => r,
                // Damaged: left out (the summary names it).
                Err(_) => return Ok(()),
            };
            let seen = match &last_seen {
                Some(t) => t.get(id).map_err(err)?.map(|g| g.value()),
                None => None,
            };
            let stored = match &privacy {
                Some(t) => t.get(id).map_err(err)?.map(|g| g.value().to_vec()),
                None => None,
            };
            let settings = match stored {
                None => Privacy::default(),
                // Damaged: copied as private as can be, not as the
                // defaults (everyone), which could show what the user hid.
                Some(v) => unseal::<Privacy>(Rec::Privacy, id, &v).unwrap_or(Privacy {
                    presence: store::Audience::Nobody,
                    group_adds: store::Audience::Nobody,
                }),
            };
            b.push([
                big(id),
                text(rec.username.to_lowercase()),
                text(rec.display_name),
                text(rec.password_hash),
                Cell::Big(Some(rec.created_at)),
                Cell::Big(seen),
                Cell::Small(Some(audience_code(settings.presence))),
                Cell::Small(Some(audience_code(settings.group_adds))),
            ])?;
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)
    }

    fn contacts(&self, out: &mut Out<'_>) -> Result<(), String> {
        let mut b = Batch::new(&batch::CONTACTS);
        scan(&self.txn, CONTACTS, |(owner, contact), added_at| {
            b.push([big(owner), big(contact), Cell::Big(Some(added_at))])?;
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)
    }

    fn revoked(&self, out: &mut Out<'_>, now_secs: i64) -> Result<(), String> {
        let mut b = Batch::new(&batch::REVOKED);
        scan(&self.txn, REVOKED, |jti, exp| {
            if exp > now_secs {
                b.push([text(jti), Cell::Big(Some(exp))])?;
            }
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)
    }

    fn rooms(&self, out: &mut Out<'_>) -> Result<(), String> {
        let messages = open(&self.txn, MESSAGES)?;
        let mut b = Batch::new(&batch::ROOMS);
        scan(&self.txn, ROOMS, |id, value| {
            let rec: RoomRecord = match unseal(Rec::Rooms, id, value) {
                Ok(r) => r,
                Err(_) => return Ok(()),
            };
            // The highest seq stored, damaged and lost ones included: the
            // next message gets the one after it, never one given before.
            let last_seq = match &messages {
                Some(t) => t
                    .range((id, 0)..=(id, u64::MAX))
                    .map_err(err)?
                    .next_back()
                    .transpose()
                    .map_err(err)?
                    .map_or(0, |(k, _)| k.value().1),
                None => 0,
            };
            b.push([
                big(id),
                Cell::Small(Some(match rec.kind {
                    RoomKind::Direct => 0,
                    RoomKind::Group => 1,
                })),
                Cell::Text(rec.name),
                Cell::Big(rec.owner.map(|o| o as i64)),
                Cell::Big(Some(rec.created_at)),
                big(last_seq),
            ])?;
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)
    }

    fn members(&self, out: &mut Out<'_>) -> Result<(), String> {
        let mut b = Batch::new(&batch::MEMBERS);
        scan(&self.txn, MEMBERS, |(room, user), value| {
            // Damaged: left out (the summary names it).
            if let Ok(rec) = unseal::<MemberRecord>(Rec::Members, (room, user), value) {
                b.push([
                    big(room),
                    big(user),
                    Cell::Big(Some(rec.joined_at)),
                    big(rec.read_seq),
                ])?;
            }
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)
    }

    /// Messages in stream order (`message_log`), from `after` on.
    fn messages(&self, out: &mut Out<'_>, after: u64) -> Result<(), String> {
        let (Some(log), Some(messages)) =
            (open(&self.txn, MESSAGE_LOG)?, open(&self.txn, MESSAGES)?)
        else {
            return Ok(());
        };
        let mut b = Batch::new(&batch::MESSAGES);
        let Some(from) = after.checked_add(1) else {
            return Ok(());
        };
        for entry in log.range(from..).map_err(err)? {
            let (pos, key) = entry.map_err(err)?;
            let (pos, (room, seq)) = (pos.value(), key.value());
            let Some(value) = messages.get((room, seq)).map_err(err)? else {
                out.damage.note(Finding {
                    kind: "log".into(),
                    table: "message_log".into(),
                    key: Some(format!("position {pos}")),
                    room: Some(format!("{room:016x}")),
                    seq: Some(seq),
                    what: format!("names room {room:016x} seq {seq}, which is not in `messages`"),
                });
                continue;
            };
            let rec = match unseal_message(room, seq, value.value()) {
                Ok(Some(rec)) => rec,
                Ok(None) | Err(_) => continue,
            };
            let pay = rec.payment;
            b.push([
                big(room),
                big(seq),
                big(pos),
                big(rec.from),
                Cell::Big(Some(rec.ts)),
                text(rec.client_id),
                text(rec.text),
                Cell::Big(pay.as_ref().map(|p| p.transfer as i64)),
                Cell::Big(pay.as_ref().map(|p| p.amount as i64)),
                Cell::Big(pay.as_ref().map(|p| p.to as i64)),
                Cell::Text(pay.and_then(|p| p.note)),
            ])?;
            out.emit(&mut b, false)?;
        }
        out.emit(&mut b, true)
    }

    fn wallet(&self, out: &mut Out<'_>) -> Result<(), String> {
        let mut b = Batch::new(&batch::ACCOUNTS);
        scan(&self.txn, WALLET_ACCOUNTS, |account, balance| {
            b.push([big(account), big(balance)])?;
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)?;
        let mut b = Batch::new(&batch::ENTRIES);
        scan(&self.txn, WALLET_ENTRIES, |(account, n), value| {
            // Damaged: left out (the summary names it).
            if let Ok(e) = unseal::<EntryRecord>(Rec::WalletEntries, (account, n), value) {
                b.push([
                    big(account),
                    big(n),
                    big(e.transfer),
                    Cell::Big(Some(e.delta)),
                    big(e.balance_after),
                    Cell::Big(Some(e.ts)),
                ])?;
            }
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)?;
        let mut b = Batch::new(&batch::TRANSFERS);
        scan(&self.txn, WALLET_TRANSFERS, |id, value| {
            // Damaged: left out (the summary names it).
            if let Ok(t) = unseal::<TransferRecord>(Rec::WalletTransfers, id, value) {
                b.push([
                    big(id),
                    big(t.from),
                    big(t.to),
                    big(t.amount),
                    Cell::Text(t.note),
                    text(t.key),
                    Cell::Small(Some(state_code(t.state))),
                    Cell::Big(Some(t.created_at)),
                    Cell::Big(Some(t.execute_at)),
                    Cell::Big(t.executed_at),
                    Cell::Small(t.repeat.map(repeat_code)),
                    Cell::Big(t.parent.map(|(p, _)| p as i64)),
                    Cell::Int(t.parent.map(|(_, k)| k as i32)),
                    Cell::Int(Some(t.runs as i32)),
                    Cell::Text(t.failure),
                    Cell::Big(t.requested_at),
                ])?;
            }
            out.emit(&mut b, false)
        })?;
        out.emit(&mut b, true)
    }

    /// What the database must hold once everything is copied: rows per
    /// table (readable records only; revoked tokens unexpired at
    /// `now_secs`), every room's message count and last seq, every
    /// balance, and the ledger's figures.
    /// Damaged records (left out of the copy) are named in the [`Damage`].
    pub fn summary(&self, now_secs: i64) -> Result<(Figures, Damage), String> {
        let mut damage = Damage::default();
        guarded(|| self.summary_in(now_secs, &mut damage)).map(|f| (f, damage))
    }

    fn summary_in(&self, now_secs: i64, damage: &mut Damage) -> Result<Figures, String> {
        let txn = &self.txn;
        let mut f = Figures {
            head: self.snapshot.head,
            last_transfer_id: self.snapshot.last_transfer_id,
            ..Figures::default()
        };
        let mut users = HashSet::new();
        scan(txn, USERS, |id, v| {
            match unseal::<UserRecord>(Rec::Users, id, v) {
                Ok(_) => {
                    users.insert(id);
                }
                Err(why) => damage.record(Rec::Users, id, why),
            }
            Ok(())
        })?;
        f.count("users", users.len() as u64);
        let mut seen = 0;
        scan(txn, LAST_SEEN, |id, _| {
            seen += u64::from(users.contains(&id));
            Ok(())
        })?;
        f.count("last_seen", seen);
        // Users whose settings are not the defaults (a damaged record is
        // copied as `nobody`: not the defaults either).
        let mut private = 0;
        scan(txn, PRIVACY, |id, v| {
            let set = match unseal::<Privacy>(Rec::Privacy, id, v) {
                Ok(p) => p != Privacy::default(),
                Err(why) => {
                    damage.record(
                        Rec::Privacy,
                        id,
                        format!("{why}; the user is copied with presence and group adds `nobody`"),
                    );
                    true
                }
            };
            private += u64::from(set && users.contains(&id));
            Ok(())
        })?;
        f.count("privacy", private);
        f.count("contacts", len(txn, CONTACTS)?);
        let mut revoked = 0;
        scan(txn, REVOKED, |_, exp| {
            revoked += u64::from(exp > now_secs);
            Ok(())
        })?;
        f.count("revoked", revoked);
        scan(txn, ROOMS, |id, v| {
            match unseal::<RoomRecord>(Rec::Rooms, id, v) {
                Ok(_) => {
                    f.rooms.insert(id, (0, 0));
                }
                Err(why) => damage.record(Rec::Rooms, id, why),
            }
            Ok(())
        })?;
        f.count("rooms", f.rooms.len() as u64);
        f.count(
            "members",
            readable::<(u64, u64), MemberRecord>(txn, MEMBERS, Rec::Members, damage)?,
        );
        let mut messages = 0;
        scan(txn, MESSAGES, |(room, seq), v| {
            let good = match unseal_message(room, seq, v) {
                Ok(Some(_)) => true,
                Ok(None) => {
                    damage.lost += 1;
                    false
                }
                Err(why) => {
                    damage.record(Rec::Messages, (room, seq), why);
                    false
                }
            };
            messages += u64::from(good);
            if let Some((n, last)) = f.rooms.get_mut(&room) {
                *n += u64::from(good);
                *last = (*last).max(seq);
            }
            Ok(())
        })?;
        f.count("messages", messages);
        let mut balances = HashMap::new();
        scan(txn, WALLET_ACCOUNTS, |account, balance| {
            balances.insert(account, balance);
            Ok(())
        })?;
        f.count("wallet_accounts", balances.len() as u64);
        f.balances = balances;
        f.count(
            "wallet_entries",
            readable::<(u64, u64), EntryRecord>(txn, WALLET_ENTRIES, Rec::WalletEntries, damage)?,
        );
        f.count(
            "wallet_transfers",
            readable::<u64, TransferRecord>(txn, WALLET_TRANSFERS, Rec::WalletTransfers, damage)?,
        );
        f.ledger = crate::storage::embedded::verify_in(txn).map_err(|e| {
            format!(
                "the source's ledger cannot be checked: {}. `confab check` names the damage; `confab backup --skip-damaged` saves what can be read, and `confab migrate --from-backup` migrates that (its ledger then says what is missing)",
                e.message
            )
        })?;
        Ok(f)
    }
}

/// The source's identity (a hash of its token secret, else of its first
/// user) and the state it is in.
fn snapshot_of(txn: &redb::ReadTransaction, secret: Option<&[u8]>) -> Result<Snapshot, String> {
    let mut h = Sha256::new();
    h.update(b"confab/migrate/source/v1\0");
    let id_from = match secret.map(<[u8]>::trim_ascii).filter(|s| !s.is_empty()) {
        Some(s) => {
            h.update(b"secret\0");
            h.update(s);
            "token secret"
        }
        None => {
            // Users are never deleted: the first one stays the first.
            let mut first: Option<(i64, u64)> = None;
            scan(txn, USERS, |id, v| {
                if let Ok(rec) = unseal::<UserRecord>(Rec::Users, id, v) {
                    let this = (rec.created_at, id);
                    if first.is_none_or(|f| this < f) {
                        first = Some(this);
                    }
                }
                Ok(())
            })?;
            h.update(b"first user\0");
            if let Some((at, id)) = first {
                h.update(at.to_le_bytes());
                h.update(id.to_le_bytes());
            }
            "first user"
        }
    };
    let digest = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    let head = match open(txn, MESSAGE_LOG)? {
        Some(log) => log.last().map_err(err)?.map_or(0, |(k, _)| k.value()),
        None => 0,
    };
    let next_id = match open(txn, META)? {
        Some(meta) => meta
            .get("next_transfer_id")
            .map_err(err)?
            .map_or(0, |g| g.value()),
        None => 0,
    };
    let highest = match open(txn, WALLET_TRANSFERS)? {
        Some(t) => t.last().map_err(err)?.map_or(0, |(k, _)| k.value()),
        None => 0,
    };
    Ok(Snapshot {
        id: i64::from_le_bytes(id),
        id_from,
        head,
        messages: len(txn, MESSAGES)?,
        last_transfer_id: highest.max(next_id.saturating_sub(1)),
    })
}
