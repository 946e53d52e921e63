//! The ledger's rows inside the writer's batch transaction: account locks
//! and balances, entries, and storing and viewing transfers — what the
//! wallet's operations (`wallet.rs`) are made of.

use tokio_postgres::Transaction;

use super::context::Ctx;
use super::ledger::{self, TRANSFER_COLUMNS, repeat_code, state_code, transfer_record};
use super::rows::{b, db_err, u};
use crate::error::ApiError;
use crate::wallet::{EntryRecord, TransferRecord, TransferView};

/// Locks these accounts' rows (inserting a missing one with balance 0
/// first), in ascending `bigint` order. Locking again what this
/// transaction holds is free.
pub(super) async fn lock_accounts(txn: &Transaction<'_>, accounts: &[u64]) -> Result<(), ApiError> {
    let mut keys: Vec<i64> = accounts.iter().copied().map(b).collect();
    keys.sort_unstable();
    keys.dedup();
    txn.execute(
        "INSERT INTO wallet_accounts (account, balance)
         SELECT a, 0 FROM unnest($1::bigint[]) AS a ORDER BY a
         ON CONFLICT (account) DO NOTHING",
        &[&keys],
    )
    .await
    .map_err(db_err)?;
    txn.execute(
        "SELECT account FROM wallet_accounts WHERE account = ANY($1)
         ORDER BY account FOR UPDATE",
        &[&keys],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// An account's balance (0 without a row).
pub(super) async fn balance(txn: &Transaction<'_>, account: u64) -> Result<u64, ApiError> {
    let row = txn
        .query_opt(
            "SELECT balance FROM wallet_accounts WHERE account = $1",
            &[&b(account)],
        )
        .await
        .map_err(db_err)?;
    Ok(row.map_or(0, |r| u(r.get(0))))
}

/// The next stored transfer id.
pub(super) async fn next_transfer_id(txn: &Transaction<'_>) -> Result<u64, ApiError> {
    let row = txn
        .query_one("SELECT nextval('wallet_transfer_ids')", &[])
        .await
        .map_err(db_err)?;
    Ok(u(row.get(0)))
}

/// The transfer `from` made with idempotency key `key` (runs of a
/// recurring transfer have keys of their own, not the sender's).
pub(super) async fn by_key(
    txn: &Transaction<'_>,
    from: u64,
    key: &str,
) -> Result<Option<(u64, TransferRecord)>, ApiError> {
    let row = txn
        .query_opt(
            &format!(
                "SELECT {TRANSFER_COLUMNS} FROM wallet_transfers
                 WHERE from_account = $1 AND key = $2 AND parent IS NULL"
            ),
            &[&b(from), &key],
        )
        .await
        .map_err(db_err)?;
    row.as_ref().map(transfer_record).transpose()
}

pub(super) fn runs_param(rec: &TransferRecord) -> Result<i32, ApiError> {
    i32::try_from(rec.runs).map_err(|_| ApiError::internal("too many runs"))
}

/// Stores a new transfer.
pub(super) async fn insert_transfer(
    txn: &Transaction<'_>,
    id: u64,
    rec: &TransferRecord,
) -> Result<(), ApiError> {
    let parent_run = match rec.parent {
        Some((_, k)) => {
            Some(i32::try_from(k).map_err(|_| ApiError::internal("run number overflow"))?)
        }
        None => None,
    };
    txn.execute(
        "INSERT INTO wallet_transfers (id, from_account, to_account, amount, note, key, state,
             created_at, execute_at, executed_at, repeat, parent, parent_run, runs, failure,
             requested_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        &[
            &b(id),
            &b(rec.from),
            &b(rec.to),
            &b(rec.amount),
            &rec.note,
            &rec.key,
            &state_code(rec.state),
            &rec.created_at,
            &rec.execute_at,
            &rec.executed_at,
            &rec.repeat.map(repeat_code),
            &rec.parent.map(|(p, _)| b(p)),
            &parent_run,
            &runs_param(rec)?,
            &rec.failure,
            &rec.requested_at,
        ],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Stores what changes of a transfer once it exists: its state, when it
/// ran (or runs next), its runs and why it failed.
pub(super) async fn update_transfer(
    txn: &Transaction<'_>,
    id: u64,
    rec: &TransferRecord,
) -> Result<(), ApiError> {
    txn.execute(
        "UPDATE wallet_transfers
         SET state = $2, execute_at = $3, executed_at = $4, runs = $5, failure = $6
         WHERE id = $1",
        &[
            &b(id),
            &state_code(rec.state),
            &rec.execute_at,
            &rec.executed_at,
            &runs_param(rec)?,
            &rec.failure,
        ],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

/// The client view of a transfer for `viewer`.
pub(super) async fn view_for(
    w: &Ctx,
    txn: &Transaction<'_>,
    id: u64,
    rec: &TransferRecord,
    viewer: u64,
) -> Result<TransferView, ApiError> {
    ledger::view_in(
        txn,
        &w.shared.ids,
        &w.wallet.settings.currency,
        id,
        rec,
        viewer,
    )
    .await
}

/// Appends a transfer's ledger entries (`wallet::rules::entries`) and
/// sets the accounts' balances. The caller holds the accounts' locks.
pub(super) async fn entries(
    txn: &Transaction<'_>,
    entries: [(u64, EntryRecord); 2],
) -> Result<(), ApiError> {
    for (account, rec) in &entries {
        entry(txn, *account, rec).await?;
    }
    Ok(())
}

/// Appends one ledger entry (number: the account's last plus one) and sets
/// the account's balance. The caller holds the account's lock.
async fn entry(txn: &Transaction<'_>, account: u64, rec: &EntryRecord) -> Result<(), ApiError> {
    txn.execute(
        "WITH e AS (
             INSERT INTO wallet_entries (account, n, transfer, delta, balance_after, ts)
             SELECT $1, COALESCE(MAX(n), 0) + 1, $2, $3, $4, $5
             FROM wallet_entries WHERE account = $1
         )
         INSERT INTO wallet_accounts (account, balance) VALUES ($1, $4)
         ON CONFLICT (account) DO UPDATE SET balance = EXCLUDED.balance",
        &[
            &b(account),
            &b(rec.transfer),
            &rec.delta,
            &b(rec.balance_after),
            &rec.ts,
        ],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}
