//! The wallet's reads in the embedded store (any thread; MVCC read
//! transactions): balances, a user's transfers, one transfer, and the
//! ledger's invariants checked in one snapshot (`confab wallet verify`,
//! `confab check`, a restore).

use redb::ReadableTableMetadata;

use crate::error::ApiError;
use crate::ids::UserId;
use crate::store;
use crate::store::{
    Store, USERS, WALLET_ACCOUNTS, WALLET_ENTRIES, WALLET_KEYS, WALLET_PENDING, WALLET_SCHEDULE,
    WALLET_TRANSFERS, WALLET_USER_TRANSFERS,
};
use crate::wallet::{
    EntryRecord, ISSUER, MAX_AMOUNT, State, TransferView, Verification, decode_transfer, view,
};

/// A user's balance.
pub fn balance(store: &Store, user: UserId) -> Result<u64, ApiError> {
    store.guard("the wallet", || {
        let txn = store.db.begin_read()?;
        let accounts = txn.open_table(WALLET_ACCOUNTS)?;
        Ok(accounts.get(user.0)?.map(|g| g.value()).unwrap_or(0))
    })
}

/// A page of `user`'s transfers, newest first: those with a stored id below
/// `before` (all when None), only those [`TransferRecord::visible_to`] them.
/// Returns the page and the cursor (a public id) for the next. `before`
/// must be one of the user's own transfers (every cursor given out is):
/// any other id would cut the page at that transfer's place in the
/// sequence and so tell the caller that it exists, and roughly when it
/// was made.
pub fn transactions(
    store: &Store,
    user: UserId,
    before: Option<u64>,
    limit: usize,
    currency: &str,
) -> Result<(Vec<TransferView>, Option<String>), ApiError> {
    store.guard("the wallet", || {
        let ids = &store.transfer_ids;
        let txn = store.db.begin_read()?;
        let mine = txn.open_table(WALLET_USER_TRANSFERS)?;
        let transfers = txn.open_table(WALLET_TRANSFERS)?;
        let users = txn.open_table(USERS)?;
        if let Some(b) = before
            && mine.get((user.0, b))?.is_none()
        {
            return Err(ApiError::bad_request(
                "bad_request",
                "before must be a next_before from your own history",
            ));
        }
        let hi = before.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut last = None;
        for entry in mine.range((user.0, 0)..(user.0, hi))?.rev() {
            if out.len() >= limit {
                return Ok((out, last.map(|id| ids.show(id))));
            }
            let id = entry?.0.value().1;
            if let Some(g) = transfers.get(id)? {
                let rec = decode_transfer(id, g.value())?;
                // A store written before recipients' rows waited for the run
                // still has them for transfers that never ran.
                if !rec.visible_to(user.0) {
                    continue;
                }
                out.push(view(id, &rec, user.0, currency, ids, |u| {
                    crate::store::user_in(&users, UserId(u)).ok().flatten()
                }));
                last = Some(id);
            }
        }
        Ok((out, None))
    })
}

/// One transfer (by stored id) as `viewer` sees it: None when there is none
/// or it is not [`TransferRecord::visible_to`] them — the two answers must
/// not differ, or a stranger could tell which ids exist.
pub fn transfer(
    store: &Store,
    id: u64,
    viewer: UserId,
    currency: &str,
) -> Result<Option<TransferView>, ApiError> {
    store.guard("the wallet", || {
        let txn = store.db.begin_read()?;
        let transfers = txn.open_table(WALLET_TRANSFERS)?;
        let users = txn.open_table(USERS)?;
        let Some(g) = transfers.get(id)? else {
            return Ok(None);
        };
        let rec = decode_transfer(id, g.value())?;
        if !rec.visible_to(viewer.0) {
            return Ok(None);
        }
        Ok(Some(view(
            id,
            &rec,
            viewer.0,
            currency,
            &store.transfer_ids,
            |u| crate::store::user_in(&users, UserId(u)).ok().flatten(),
        )))
    })
}

/// Checks the ledger invariants in one consistent snapshot: every transfer's
/// entries balance (two entries summing to zero for an executed transfer,
/// none otherwise); each balance equals the sum of its entries and each
/// entry's running balance is right; nothing is negative or over the limit;
/// user balances add up to what was issued; every run of a recurring
/// transfer exists exactly once; idempotency keys point at their transfer;
/// every scheduled transfer is in the schedule and in its sender's pending
/// set, and nothing else is in either.
pub fn verify(store: &Store) -> Result<Verification, ApiError> {
    let txn = store.db.begin_read()?;
    store.guard("the ledger", || verify_in(&txn))
}

/// [`verify`] in a snapshot (`confab check` runs it in its own).
/// [`verify_in`] as `confab check` wants it: the breaches.
pub fn ledger_check(txn: &redb::ReadTransaction) -> Result<Vec<String>, ApiError> {
    verify_in(txn).map(|v| v.breaches)
}

pub fn verify_in(txn: &redb::ReadTransaction) -> Result<Verification, ApiError> {
    use std::collections::HashMap;
    let accounts = txn.open_table(WALLET_ACCOUNTS)?;
    let entries = txn.open_table(WALLET_ENTRIES)?;
    let transfers = txn.open_table(WALLET_TRANSFERS)?;
    let keys = txn.open_table(WALLET_KEYS)?;
    let schedule = txn.open_table(WALLET_SCHEDULE)?;
    let pending = txn.open_table(WALLET_PENDING)?;
    let mut v = Verification::default();
    let mut breach = |s: String| {
        if v.breaches.len() < 100 {
            v.breaches.push(s);
        }
    };
    // Entries: per account running sums, per transfer sums.
    let mut by_account: HashMap<u64, i128> = HashMap::new();
    let mut by_transfer: HashMap<u64, (i128, u32)> = HashMap::new();
    let mut running: HashMap<u64, u64> = HashMap::new();
    let mut n_entries = 0u64;
    for e in entries.range::<(u64, u64)>(..)? {
        let (k, val) = e?;
        let (account, n) = k.value();
        let rec: EntryRecord =
            store::seal::open(store::Rec::WalletEntries, (account, n), val.value())?;
        n_entries += 1;
        let sum = by_account.entry(account).or_default();
        *sum += i128::from(rec.delta);
        let t = by_transfer.entry(rec.transfer).or_default();
        t.0 += i128::from(rec.delta);
        t.1 += 1;
        let expected = if account == ISSUER { -*sum } else { *sum };
        if expected != i128::from(rec.balance_after) {
            breach(format!(
                "account {account:016x} entry {n}: running balance {} but entries sum to {expected}",
                rec.balance_after
            ));
        }
        running.insert(account, rec.balance_after);
    }
    let mut issued = 0u64;
    let mut total = 0u128;
    let mut n_accounts = 0u64;
    for a in accounts.range::<u64>(..)? {
        let (k, val) = a?;
        let (account, balance) = (k.value(), val.value());
        n_accounts += 1;
        let sum = by_account.get(&account).copied().unwrap_or(0);
        let expected = if account == ISSUER { -sum } else { sum };
        if i128::from(balance) != expected {
            breach(format!(
                "account {account:016x}: balance {balance} but its entries sum to {expected}"
            ));
        }
        if account == ISSUER {
            issued = balance;
        } else {
            if balance > MAX_AMOUNT {
                breach(format!(
                    "account {account:016x}: balance {balance} over the limit"
                ));
            }
            total += u128::from(balance);
        }
    }
    for (account, sum) in &by_account {
        if accounts.get(*account)?.is_none() && *sum != 0 {
            breach(format!("account {account:016x} has entries but no balance"));
        }
    }
    if total != u128::from(issued) {
        breach(format!(
            "user balances total {total} but {issued} was issued"
        ));
    }
    // Transfers.
    let mut runs: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut n_transfers = 0u64;
    let mut scheduled = 0u64;
    for t in transfers.range::<u64>(..)? {
        let (k, val) = t?;
        let id = k.value();
        let rec = decode_transfer(id, val.value())?;
        n_transfers += 1;
        let (sum, count) = by_transfer.remove(&id).unwrap_or((0, 0));
        match rec.state {
            State::Executed => {
                if count != 2 || sum != 0 {
                    breach(format!(
                        "transfer {id:016x} executed with {count} entries summing to {sum}"
                    ));
                }
            }
            _ => {
                if count != 0 {
                    breach(format!(
                        "transfer {id:016x} is {} but has {count} entries",
                        rec.state.name()
                    ));
                }
            }
        }
        if rec.state == State::Scheduled {
            scheduled += 1;
            if schedule.get((rec.execute_at, id))?.is_none() {
                breach(format!(
                    "transfer {id:016x} is scheduled but not in the schedule"
                ));
            }
            if pending.get((rec.from, id))?.is_none() {
                breach(format!(
                    "transfer {id:016x} is scheduled but not among its sender's pending transfers"
                ));
            }
        }
        if let Some((parent, k)) = rec.parent {
            runs.entry(parent).or_default().push(k);
        } else if rec.from != ISSUER {
            match keys.get((rec.from, rec.key.as_str()))? {
                Some(g) if g.value() == id => {}
                _ => breach(format!(
                    "transfer {id:016x}: its idempotency key does not lead back to it"
                )),
            }
        }
    }
    for (id, (sum, count)) in by_transfer {
        breach(format!(
            "{count} entries (sum {sum}) belong to a missing transfer {id:016x}"
        ));
    }
    for (parent, mut ks) in runs {
        let Some(g) = transfers.get(parent)? else {
            breach(format!(
                "runs of a missing recurring transfer {parent:016x}"
            ));
            continue;
        };
        let rec = decode_transfer(parent, g.value())?;
        ks.sort_unstable();
        let want: Vec<u32> = (0..rec.runs).collect();
        if ks != want {
            breach(format!(
                "recurring transfer {parent:016x}: {} runs recorded, run numbers {ks:?}",
                rec.runs
            ));
        }
    }
    if schedule.len()? != scheduled {
        breach(format!(
            "{} schedule entries for {scheduled} scheduled transfers",
            schedule.len()?
        ));
    }
    if pending.len()? != scheduled {
        breach(format!(
            "{} pending-transfer entries for {scheduled} scheduled transfers",
            pending.len()?
        ));
    }
    v.accounts = n_accounts;
    v.transfers = n_transfers;
    v.entries = n_entries;
    v.issued = issued;
    v.total_balances = total as u64;
    v.scheduled = scheduled;
    Ok(v)
}
