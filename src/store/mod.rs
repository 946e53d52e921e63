//! The durable store: redb tables, their record encodings and the read-side
//! queries. All writes go through [`writer::GroupCommitWriter`], which owns
//! the single redb write transaction at a time; this module only opens the
//! database, migrates it and reads from it (any thread, any time, MVCC).
//!
//! The on-disk layout is documented in `docs/STORAGE.md`; change both
//! together and bump [`SCHEMA_VERSION`] for incompatible changes.

pub mod db;
pub mod engine;
mod guard;
pub mod integrity;
pub mod ledger;
mod open;
mod reads;
mod records;
pub mod seal;
mod tables;
pub mod transfer_ids;

pub use db::now_ms;
pub use guard::*;
pub use open::*;
pub use reads::*;
pub use records::*;
pub use seal::Rec;
pub use tables::*;

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
