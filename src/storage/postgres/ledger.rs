//! The wallet's reads in the PostgreSQL backend: balances, a user's
//! transfers, one transfer, and the ledger's invariants checked in one
//! repeatable-read snapshot. The same answers as `storage/embedded/ledger.rs`.
//!
//! Also the `wallet_transfers` row format both this module and the wallet's
//! writes (`wallet.rs`) use: [`TRANSFER_COLUMNS`], [`transfer_record`] and
//! the codes of [`State`] and [`Repeat`].
//!
//! What the embedded store keeps in index tables is a query here: a user's
//! transfers (`wallet_user_transfers`) are the rows they sent plus the
//! executed ones they received; the schedule and the pending sets are the
//! rows in state 0; an idempotency key is the `key` column itself (unique
//! per sender among non-runs).

use std::collections::{HashMap, HashSet};

use tokio_postgres::{Client, GenericClient, Row};

use super::rows::{self, b, db_err, u};
use crate::error::ApiError;
use crate::frames::User;
use crate::ids::UserId;
use crate::wallet::{
    ISSUER, MAX_AMOUNT, Repeat, State, TransferIds, TransferRecord, TransferView, Verification,
    view,
};

/// The columns [`transfer_record`] reads, in its order.
pub const TRANSFER_COLUMNS: &str = "id, from_account, to_account, amount, note, key, \
     state, created_at, execute_at, executed_at, repeat, parent, parent_run, runs, failure, \
     requested_at";

/// Most breaches a verification lists (as the embedded store's).
const MAX_BREACHES: usize = 100;

/// `state` column code of a [`State`].
pub fn state_code(s: State) -> i16 {
    match s {
        State::Scheduled => 0,
        State::Executed => 1,
        State::Failed => 2,
        State::Cancelled => 3,
    }
}

fn state_of(code: i16) -> Option<State> {
    Some(match code {
        0 => State::Scheduled,
        1 => State::Executed,
        2 => State::Failed,
        3 => State::Cancelled,
        _ => return None,
    })
}

/// `repeat` column code of a [`Repeat`].
pub fn repeat_code(r: Repeat) -> i16 {
    match r {
        Repeat::Weekly => 0,
        Repeat::Monthly => 1,
    }
}

fn repeat_of(code: i16) -> Option<Repeat> {
    match code {
        0 => Some(Repeat::Weekly),
        1 => Some(Repeat::Monthly),
        _ => None,
    }
}

/// A `wallet_transfers` row (selected with [`TRANSFER_COLUMNS`]) as its
/// stored id and record. A row no confab writes (an unknown state or
/// repeat code, a run without its run number) is an internal error.
pub fn transfer_record(row: &Row) -> Result<(u64, TransferRecord), ApiError> {
    let id = u(row.try_get(0).map_err(db_err)?);
    let bad = |what: String| ApiError::internal(format!("transfer {id:016x}: {what}"));
    let state: i16 = row.try_get(6).map_err(db_err)?;
    let state = state_of(state).ok_or_else(|| bad(format!("unknown state {state}")))?;
    let repeat = match row.try_get::<_, Option<i16>>(10).map_err(db_err)? {
        None => None,
        Some(r) => Some(repeat_of(r).ok_or_else(|| bad(format!("unknown repeat {r}")))?),
    };
    let parent = match (
        row.try_get::<_, Option<i64>>(11).map_err(db_err)?,
        row.try_get::<_, Option<i32>>(12).map_err(db_err)?,
    ) {
        (None, None) => None,
        (Some(p), Some(k)) => Some((
            u(p),
            u32::try_from(k).map_err(|_| bad(format!("run number {k}")))?,
        )),
        _ => {
            return Err(bad(
                "a run without its recurring transfer or run number".into()
            ));
        }
    };
    let runs: i32 = row.try_get(13).map_err(db_err)?;
    let rec = TransferRecord {
        from: u(row.try_get(1).map_err(db_err)?),
        to: u(row.try_get(2).map_err(db_err)?),
        amount: u(row.try_get(3).map_err(db_err)?),
        note: row.try_get(4).map_err(db_err)?,
        key: row.try_get(5).map_err(db_err)?,
        state,
        created_at: row.try_get(7).map_err(db_err)?,
        execute_at: row.try_get(8).map_err(db_err)?,
        executed_at: row.try_get(9).map_err(db_err)?,
        repeat,
        parent,
        runs: u32::try_from(runs).map_err(|_| bad(format!("{runs} runs")))?,
        failure: row.try_get(14).map_err(db_err)?,
        requested_at: row.try_get(15).map_err(db_err)?,
    };
    Ok((id, rec))
}

/// The transfer with stored id `id`, if any.
pub(super) async fn load(
    c: &impl GenericClient,
    id: u64,
) -> Result<Option<(u64, TransferRecord)>, ApiError> {
    let row = c
        .query_opt(
            &format!("SELECT {TRANSFER_COLUMNS} FROM wallet_transfers WHERE id = $1"),
            &[&b(id)],
        )
        .await
        .map_err(db_err)?;
    row.as_ref().map(transfer_record).transpose()
}

/// The client view of a transfer for `viewer`, its counterparty read from
/// `users` (none for the issuer, or a user that is not there).
pub(super) async fn view_in(
    c: &impl GenericClient,
    ids: &TransferIds,
    currency: &str,
    id: u64,
    rec: &TransferRecord,
    viewer: u64,
) -> Result<TransferView, ApiError> {
    let other = if rec.from == viewer { rec.to } else { rec.from };
    let user = if other == ISSUER {
        None
    } else {
        rows::user_by_id(c, UserId(other)).await?
    };
    Ok(view(id, rec, viewer, currency, ids, |_| user.clone()))
}

/// A user's balance (0 for an account that has none yet).
pub async fn balance(c: &impl GenericClient, user: UserId) -> Result<u64, ApiError> {
    let row = c
        .query_opt(
            "SELECT balance FROM wallet_accounts WHERE account = $1",
            &[&b(user.0)],
        )
        .await
        .map_err(db_err)?;
    Ok(row.map_or(0, |r| u(r.get(0))))
}

/// A page of `user`'s transfers, newest first: those with a stored id below
/// `before` (all when None) that are [`TransferRecord::visible_to`] them —
/// the ones they sent, and the executed ones they received (credits
/// included). Returns the page and, when more follow, the cursor for the
/// next (the last shown transfer's public id). `before` must be one of the
/// user's own visible transfers (every cursor given out is): any other id
/// would cut the page at that transfer's place in the sequence and so tell
/// the caller that it exists, and roughly when it was made.
///
/// Stored ids come from the sequence `wallet_transfer_ids` (1, 2, …), so
/// their `bigint` order is their `u64` order and the pages are cut in SQL.
pub async fn transactions(
    c: &impl GenericClient,
    ids: &TransferIds,
    user: UserId,
    before: Option<u64>,
    limit: usize,
    currency: &str,
) -> Result<(Vec<TransferView>, Option<String>), ApiError> {
    let me = b(user.0);
    if let Some(before) = before {
        let mine = c
            .query_opt(
                "SELECT 1 FROM wallet_transfers
                 WHERE id = $2 AND (from_account = $1 OR (to_account = $1 AND state = 1))",
                &[&me, &b(before)],
            )
            .await
            .map_err(db_err)?;
        if mine.is_none() {
            return Err(ApiError::bad_request(
                "bad_request",
                "before must be a next_before from your own history",
            ));
        }
    }
    let below = before.map_or(i64::MAX, b);
    // One more than the page: whether a next page exists.
    let take = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
    // Each half walks its own index ((from_account, id), (to_account, id)).
    let sql = format!(
        "SELECT {TRANSFER_COLUMNS} FROM (
             (SELECT {TRANSFER_COLUMNS} FROM wallet_transfers
               WHERE from_account = $1 AND id < $2
               ORDER BY id DESC LIMIT $3)
             UNION ALL
             (SELECT {TRANSFER_COLUMNS} FROM wallet_transfers
               WHERE to_account = $1 AND from_account <> $1 AND state = 1 AND id < $2
               ORDER BY id DESC LIMIT $3)
         ) mine ORDER BY id DESC LIMIT $3"
    );
    let rows = c.query(&sql, &[&me, &below, &take]).await.map_err(db_err)?;
    let more = rows.len() > limit;
    let records = rows
        .iter()
        .take(limit)
        .map(transfer_record)
        .collect::<Result<Vec<_>, _>>()?;
    let others: Vec<u64> = records
        .iter()
        .map(|(_, r)| if r.from == user.0 { r.to } else { r.from })
        .filter(|&o| o != ISSUER)
        .collect();
    let users = users_by_id(c, &others).await?;
    let page = records
        .iter()
        .map(|(id, rec)| view(*id, rec, user.0, currency, ids, |o| users.get(&o).cloned()))
        .collect();
    let cursor = if more {
        records.last().map(|(id, _)| ids.show(*id))
    } else {
        None
    };
    Ok((page, cursor))
}

/// The users with these ids (those that exist), by id.
async fn users_by_id(c: &impl GenericClient, ids: &[u64]) -> Result<HashMap<u64, User>, ApiError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let wanted: Vec<i64> = ids
        .iter()
        .copied()
        .collect::<HashSet<u64>>()
        .into_iter()
        .map(b)
        .collect();
    let rows = c
        .query(
            "SELECT id, username, display_name FROM users WHERE id = ANY($1)",
            &[&wanted],
        )
        .await
        .map_err(db_err)?;
    Ok(rows
        .iter()
        .map(rows::user)
        .map(|user| (user.id.0, user))
        .collect())
}

/// One transfer (by stored id) as `viewer` sees it: None when there is none
/// or it is not [`TransferRecord::visible_to`] them — the two answers must
/// not differ, or a stranger could tell which ids exist.
pub async fn transfer(
    c: &Client,
    ids: &TransferIds,
    id: u64,
    viewer: UserId,
    currency: &str,
) -> Result<Option<TransferView>, ApiError> {
    let Some((id, rec)) = load(c, id).await? else {
        return Ok(None);
    };
    if !rec.visible_to(viewer.0) {
        return Ok(None);
    }
    Ok(Some(view_in(c, ids, currency, id, &rec, viewer.0).await?))
}

/// Checks the ledger invariants in one consistent snapshot (a
/// `REPEATABLE READ, READ ONLY` transaction), with SQL aggregates: each
/// entry's running balance is right and each balance equals the sum of its
/// entries; nothing is over the limit; user balances add up to what was
/// issued; every executed transfer has two entries summing to zero and no
/// other transfer has any; no entry belongs to a missing transfer; every
/// run of a recurring transfer exists exactly once (numbers `0..runs`);
/// rows are well-formed and no run waits in the schedule.
///
/// The embedded store's checks of its index tables have nothing to check
/// here, as they hold by construction: an idempotency key is the
/// transfer's own `key` column (unique per sender by an index), and the
/// schedule and a sender's pending transfers are the rows in state 0
/// (`scheduled`) — not copies that could disagree with the transfers.
///
/// `accounts` counts the accounts with entries (as the embedded store's
/// account rows, which come with the first entry): the writer's locking
/// may leave an entry-less row with balance 0, which is no account yet.
pub async fn verify(c: &mut Client) -> Result<Verification, ApiError> {
    let txn = rows::snapshot(c).await?;
    let v = verify_in(&txn).await?;
    txn.commit().await.map_err(db_err)?;
    Ok(v)
}

/// Runs a breach query: its rows, at most [`MAX_BREACHES`].
async fn breach_rows(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, ApiError> {
    let sql = format!("{sql} LIMIT {MAX_BREACHES}");
    c.query(&sql, params).await.map_err(db_err)
}

/// [`verify`] inside a snapshot the caller opened.
async fn verify_in(txn: &impl GenericClient) -> Result<Verification, ApiError> {
    let mut breaches: Vec<String> = Vec::new();
    let mut breach = |s: String| {
        if breaches.len() < MAX_BREACHES {
            breaches.push(s);
        }
    };
    // Sums are numeric (no overflow, whatever is stored), shown as text.
    // Entries: each running balance against the sum so far.
    for r in breach_rows(
        txn,
        "SELECT account, n, balance_after, expected::text FROM (
             SELECT account, n, balance_after,
                    CASE WHEN account = 0 THEN -s ELSE s END AS expected
             FROM (SELECT account, n, balance_after,
                          SUM(delta) OVER (PARTITION BY account ORDER BY n) AS s
                   FROM wallet_entries) w
         ) e
         WHERE balance_after <> expected
         ORDER BY account, n",
        &[],
    )
    .await?
    {
        let (account, n, after, expected): (i64, i64, i64, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        breach(format!(
            "account {:016x} entry {n}: running balance {after} but entries sum to {expected}",
            u(account)
        ));
    }
    // Balances against their entries.
    for r in breach_rows(
        txn,
        "SELECT account, balance, expected::text FROM (
             SELECT a.account, a.balance,
                    CASE WHEN a.account = 0 THEN -COALESCE(s.sum, 0)
                         ELSE COALESCE(s.sum, 0) END AS expected
             FROM wallet_accounts a
             LEFT JOIN (SELECT account, SUM(delta) AS sum FROM wallet_entries
                        GROUP BY account) s USING (account)
         ) x
         WHERE balance <> expected
         ORDER BY account",
        &[],
    )
    .await?
    {
        let (account, balance, expected): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
        breach(format!(
            "account {:016x}: balance {balance} but its entries sum to {expected}",
            u(account)
        ));
    }
    let max = b(MAX_AMOUNT);
    for r in breach_rows(
        txn,
        "SELECT account, balance FROM wallet_accounts
         WHERE account <> 0 AND balance > $1 ORDER BY account",
        &[&max],
    )
    .await?
    {
        let (account, balance): (i64, i64) = (r.get(0), r.get(1));
        breach(format!(
            "account {:016x}: balance {balance} over the limit",
            u(account)
        ));
    }
    for r in breach_rows(
        txn,
        "SELECT e.account FROM wallet_entries e
         LEFT JOIN wallet_accounts a USING (account)
         WHERE a.account IS NULL
         GROUP BY e.account HAVING SUM(e.delta) <> 0
         ORDER BY e.account",
        &[],
    )
    .await?
    {
        let account: i64 = r.get(0);
        breach(format!(
            "account {:016x} has entries but no balance",
            u(account)
        ));
    }
    // Totals and counts.
    let totals = txn
        .query_one(
            "SELECT
                 (SELECT COALESCE(SUM(balance), 0)::text FROM wallet_accounts
                   WHERE account <> 0),
                 (SELECT balance FROM wallet_accounts WHERE account = 0),
                 (SELECT count(*) FROM wallet_accounts a WHERE EXISTS
                     (SELECT 1 FROM wallet_entries e WHERE e.account = a.account)),
                 (SELECT count(*) FROM wallet_entries),
                 (SELECT count(*) FROM wallet_transfers),
                 (SELECT count(*) FROM wallet_transfers WHERE state = 0)",
            &[],
        )
        .await
        .map_err(db_err)?;
    let total_text: String = totals.try_get(0).map_err(db_err)?;
    let total: u128 = total_text
        .parse()
        .map_err(|_| ApiError::internal(format!("user balances total {total_text}")))?;
    let issued = totals
        .try_get::<_, Option<i64>>(1)
        .map_err(db_err)?
        .map_or(0, u);
    let count =
        |i: usize| -> Result<u64, ApiError> { Ok(u(totals.try_get::<_, i64>(i).map_err(db_err)?)) };
    let v_accounts = count(2)?;
    let v_entries = count(3)?;
    let v_transfers = count(4)?;
    let v_scheduled = count(5)?;
    if total != u128::from(issued) {
        breach(format!(
            "user balances total {total} but {issued} was issued"
        ));
    }
    // Transfers against their entries.
    for r in breach_rows(
        txn,
        "SELECT t.id, t.state, COALESCE(x.n, 0), COALESCE(x.sum, 0)::text
         FROM wallet_transfers t
         LEFT JOIN (SELECT transfer, count(*) AS n, SUM(delta) AS sum
                    FROM wallet_entries GROUP BY transfer) x ON x.transfer = t.id
         WHERE CASE WHEN t.state = 1
                    THEN COALESCE(x.n, 0) <> 2 OR COALESCE(x.sum, 0) <> 0
                    ELSE COALESCE(x.n, 0) <> 0 END
         ORDER BY t.id",
        &[],
    )
    .await?
    {
        let (id, state, n, sum): (i64, i16, i64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let id = u(id);
        if state_of(state) == Some(State::Executed) {
            breach(format!(
                "transfer {id:016x} executed with {n} entries summing to {sum}"
            ));
        } else {
            let name = state_of(state).map_or("in an unknown state", State::name);
            breach(format!("transfer {id:016x} is {name} but has {n} entries"));
        }
    }
    // Rows as only confab writes them; a run never waits (it is executed
    // or failed the moment it is made), so no run is scheduled.
    for r in breach_rows(
        txn,
        "SELECT id, state, repeat, (parent IS NULL) <> (parent_run IS NULL),
                parent IS NOT NULL AND state = 0
         FROM wallet_transfers
         WHERE state NOT BETWEEN 0 AND 3 OR repeat NOT BETWEEN 0 AND 1
            OR (parent IS NULL) <> (parent_run IS NULL)
            OR (parent IS NOT NULL AND state = 0)
         ORDER BY id",
        &[],
    )
    .await?
    {
        let id = u(r.get(0));
        let state: i16 = r.get(1);
        let repeat: Option<i16> = r.get(2);
        let half_run: bool = r.get(3);
        let waiting_run: bool = r.get(4);
        if state_of(state).is_none() {
            breach(format!("transfer {id:016x} has an unknown state {state}"));
        }
        if waiting_run {
            breach(format!(
                "transfer {id:016x} is a run of a recurring transfer but is scheduled"
            ));
        }
        if let Some(code) = repeat.filter(|c| repeat_of(*c).is_none()) {
            breach(format!("transfer {id:016x} has an unknown repeat {code}"));
        }
        if half_run {
            breach(format!(
                "transfer {id:016x}: a run without its recurring transfer or run number"
            ));
        }
    }
    for r in breach_rows(
        txn,
        "SELECT e.transfer, count(*), SUM(e.delta)::text FROM wallet_entries e
         LEFT JOIN wallet_transfers t ON t.id = e.transfer
         WHERE t.id IS NULL
         GROUP BY e.transfer ORDER BY e.transfer",
        &[],
    )
    .await?
    {
        let (id, n, sum): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
        breach(format!(
            "{n} entries (sum {sum}) belong to a missing transfer {:016x}",
            u(id)
        ));
    }
    // Runs of recurring transfers: each of 0..runs exactly once. Run
    // numbers are unique per recurring transfer (an index), so a count of
    // `runs` from 0 to `runs - 1` is exactly that set. Unlike the embedded
    // check, a recurring transfer with runs recorded but none stored at all
    // is a breach too.
    for r in breach_rows(
        txn,
        "SELECT DISTINCT c.parent FROM wallet_transfers c
         LEFT JOIN wallet_transfers p ON p.id = c.parent
         WHERE c.parent IS NOT NULL AND p.id IS NULL
         ORDER BY c.parent",
        &[],
    )
    .await?
    {
        let parent: i64 = r.get(0);
        breach(format!(
            "runs of a missing recurring transfer {:016x}",
            u(parent)
        ));
    }
    for r in breach_rows(
        txn,
        "SELECT p.id, p.runs, COALESCE(r.ks, '{}')
         FROM wallet_transfers p
         LEFT JOIN (SELECT parent, count(*) AS n, min(parent_run) AS lo,
                           max(parent_run) AS hi,
                           array_agg(parent_run ORDER BY parent_run) AS ks
                    FROM wallet_transfers WHERE parent IS NOT NULL
                    GROUP BY parent) r ON r.parent = p.id
         WHERE (r.parent IS NOT NULL OR p.runs <> 0)
           AND (COALESCE(r.n, 0) <> p.runs
                OR (r.n > 0 AND (r.lo <> 0 OR r.hi <> p.runs - 1)))
         ORDER BY p.id",
        &[],
    )
    .await?
    {
        let (parent, runs, ks): (i64, i32, Vec<i32>) = (r.get(0), r.get(1), r.get(2));
        breach(format!(
            "recurring transfer {:016x}: {runs} runs recorded, run numbers {ks:?}",
            u(parent)
        ));
    }
    Ok(Verification {
        accounts: v_accounts,
        transfers: v_transfers,
        entries: v_entries,
        issued,
        total_balances: total as u64,
        scheduled: v_scheduled,
        breaches,
    })
}
