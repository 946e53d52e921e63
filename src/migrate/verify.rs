//! The comparison of the source's figures with the database's: rows per
//! table, the message stream position and the transfer id sequence (the
//! database's must not be behind, or later positions and ids would
//! collide), every room's last seq and message count, every balance, the
//! ledger's totals, and the database's own ledger check.

use std::collections::{BTreeMap, HashMap};

use super::report::Compared;
use crate::wallet::Verification;

/// What one side holds.
#[derive(Debug, Default)]
pub struct Figures {
    /// Rows per table (by the database's table names, with `privacy` and
    /// `last_seen` for the users that have them).
    pub counts: BTreeMap<&'static str, u64>,
    /// Room → (messages, last seq).
    pub rooms: HashMap<u64, (u64, u64)>,
    /// Account → balance.
    pub balances: HashMap<u64, u64>,
    /// The message stream's last position.
    pub head: u64,
    /// The highest transfer id given out (the database: its sequence).
    pub last_transfer_id: u64,
    pub ledger: Verification,
    /// The database only: rooms holding a seq above their last seq.
    pub seq_above_last: Vec<u64>,
}

impl Figures {
    pub fn count(&mut self, table: &'static str, n: u64) {
        self.counts.insert(table, n);
    }
}

/// Differences named in a report.
const MAX_MISMATCHES: usize = 100;

/// What the comparison found.
pub struct Outcome {
    pub compared: BTreeMap<&'static str, Compared>,
    pub rooms_checked: u64,
    pub accounts_checked: u64,
    /// Empty: the database holds what the source does.
    pub mismatches: Vec<String>,
}

/// Compares the source (`src`) with the database (`db`).
pub fn compare(src: &Figures, db: &Figures) -> Outcome {
    let mut compared = BTreeMap::new();
    let mut found: Vec<String> = Vec::new();
    let mut total = 0usize;
    let mut mismatch = |s: String| {
        total += 1;
        if found.len() < MAX_MISMATCHES {
            found.push(s);
        }
    };
    let mut figure = |name: &'static str, source: u64, database: u64| {
        compared.insert(name, Compared { source, database });
        source == database
    };
    for (&table, &n) in &src.counts {
        let there = db.counts.get(table).copied().unwrap_or(0);
        if !figure(table, n, there) {
            mismatch(format!(
                "{table}: {n} in the source, {there} in the database"
            ));
        }
    }
    let totals = [
        ("issued", src.ledger.issued, db.ledger.issued),
        (
            "user_balances",
            src.ledger.total_balances,
            db.ledger.total_balances,
        ),
        ("scheduled", src.ledger.scheduled, db.ledger.scheduled),
    ];
    for (name, s, d) in totals {
        if !figure(name, s, d) {
            mismatch(format!("{name}: {s} in the source, {d} in the database"));
        }
    }
    figure("stream_position", src.head, db.head);
    match db.head.cmp(&src.head) {
        std::cmp::Ordering::Less => mismatch(format!(
            "the database's message stream is at position {}, behind the source's {} (later positions would collide)",
            db.head, src.head
        )),
        std::cmp::Ordering::Greater => mismatch(format!(
            "the database's message stream is at position {}, past the source's {}: the cluster has written to it since the migration, so it no longer compares with the node",
            db.head, src.head
        )),
        std::cmp::Ordering::Equal => {}
    }
    figure("transfer_id", src.last_transfer_id, db.last_transfer_id);
    if db.last_transfer_id < src.last_transfer_id {
        mismatch(format!(
            "the database's transfer ids are at {}, behind the source's {} (later ids would collide)",
            db.last_transfer_id, src.last_transfer_id
        ));
    }
    let mut rooms: Vec<(&u64, &(u64, u64))> = src.rooms.iter().collect();
    rooms.sort_unstable();
    for (&room, &(n, last)) in rooms {
        match db.rooms.get(&room) {
            None => mismatch(format!("room {room:016x} is not in the database")),
            Some(&(dn, dlast)) => {
                if dlast != last {
                    mismatch(format!(
                        "room {room:016x}: last seq {last} in the source, {dlast} in the database"
                    ));
                }
                if dn != n {
                    mismatch(format!(
                        "room {room:016x}: {n} messages in the source, {dn} in the database"
                    ));
                }
            }
        }
    }
    for room in &db.seq_above_last {
        mismatch(format!(
            "room {room:016x} holds a message above its last seq in the database"
        ));
    }
    let mut accounts: Vec<(&u64, &u64)> = src.balances.iter().collect();
    accounts.sort_unstable();
    for (&account, &balance) in accounts {
        match db.balances.get(&account) {
            Some(&b) if b == balance => {}
            Some(&b) => mismatch(format!(
                "account {account:016x}: balance {balance} in the source, {b} in the database"
            )),
            None => mismatch(format!("account {account:016x} is not in the database")),
        }
    }
    let mut extra: Vec<(&u64, &u64)> = db
        .balances
        .iter()
        .filter(|(a, b)| **b != 0 && !src.balances.contains_key(a))
        .collect();
    extra.sort_unstable();
    for (account, balance) in extra {
        mismatch(format!(
            "account {account:016x} has {balance} in the database but is not in the source"
        ));
    }
    for b in &db.ledger.breaches {
        mismatch(format!("the database's ledger: {b}"));
    }
    if total > found.len() {
        found.push(format!("… and {} more", total - found.len()));
    }
    Outcome {
        compared,
        rooms_checked: src.rooms.len() as u64,
        accounts_checked: src.balances.len() as u64,
        mismatches: found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Figures {
        let mut f = Figures::default();
        f.count("messages", 3);
        f.rooms.insert(7, (3, 3));
        f.balances.insert(0, 10);
        f.balances.insert(5, 10);
        f.head = 3;
        f.last_transfer_id = 1;
        f
    }

    #[test]
    fn equal_figures_verify_and_every_difference_is_named() {
        assert!(compare(&figures(), &figures()).mismatches.is_empty());
        let mut db = figures();
        db.count("messages", 2);
        db.rooms.insert(7, (2, 4));
        db.balances.insert(5, 9);
        db.balances.insert(6, 1);
        db.head = 2;
        db.ledger.breaches.push("x".into());
        let got = compare(&figures(), &db).mismatches;
        assert_eq!(
            got,
            [
                "messages: 3 in the source, 2 in the database",
                "the database's message stream is at position 2, behind the source's 3 (later positions would collide)",
                "room 0000000000000007: last seq 3 in the source, 4 in the database",
                "room 0000000000000007: 3 messages in the source, 2 in the database",
                "account 0000000000000005: balance 10 in the source, 9 in the database",
                "account 0000000000000006 has 1 in the database but is not in the source",
                "the database's ledger: x",
            ]
        );
    }
}
