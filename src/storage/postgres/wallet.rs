//! Wallet writes in the PostgreSQL backend, inside the writer's batch
//! transaction (see [`crate::wallet`] for the model): a transfer's entries,
//! balances, state and payment message commit together or not at all. The
//! same answers, metrics and notices as the embedded writer's
//! (`writes/wallet.rs`): the rules both apply are `wallet::rules`.
//!
//! Several nodes may run wallet ops on the database at once:
//!
//! - an account's balance and entries change only under its row's lock
//!   (`FOR UPDATE`; the row is inserted first if missing), the accounts of
//!   one op locked together in ascending `bigint` order, so that two ops
//!   never wait for each other's accounts in a cycle; an entry's number is
//!   the account's last plus one, under that lock;
//! - a sender's idempotency keys and scheduled count are read under the
//!   sender's account lock, so two nodes cannot both take the same key
//!   (the unique index would refuse the second anyway) or both take the
//!   last free scheduling slot;
//! - the scheduler's runs claim due transfers with `FOR UPDATE SKIP
//!   LOCKED`: two nodes never run the same transfer, and a cancel waits for
//!   a run in progress (then finds it executed);
//! - transfer ids come from the sequence `wallet_transfer_ids`.

use tokio_postgres::Transaction;

use super::accounts::{
    balance, by_key, entries, insert_transfer, lock_accounts, next_transfer_id, update_transfer,
    view_for,
};
use super::base;
use super::context::{BatchState, Ctx};
use super::ledger::{TRANSFER_COLUMNS, transfer_record};
use super::rows::{self, b, db_err};
use crate::error::ApiError;
use crate::frames::{Message, Room};
use crate::ids::UserId;
use crate::store::now_ms;
use crate::wallet::rules::{self, Cancelling, count};
use crate::wallet::{ISSUER, TransferRecord, TransferRequest, TransferView};
use crate::writes::{Effect, Notices, Reply, WalletOp, announce_wallet};

/// Most due transfers one run of the scheduler takes.
const DUE_BATCH: i64 = 500;

/// When everything due is being run by another node (locked, so skipped
/// here), the scheduler asks again this much later rather than at once.
const BUSY_RETRY_MS: i64 = 1_000;

/// Applies one wallet op; a refusal (insufficient funds, a reused key, …)
/// is answered after the commit, a database error fails the batch.
pub(super) async fn apply_wallet(
    w: &Ctx,
    txn: &Transaction<'_>,
    op: WalletOp,
    state: &mut BatchState,
) -> Result<Effect, ApiError> {
    let mut notices = Notices::default();
    Ok(match op {
        WalletOp::Credit {
            user,
            amount,
            key,
            reply,
        } => {
            let result = if !base::user_exists(txn, user).await? {
                Err(ApiError::user_not_found())
            } else {
                // Every credit holds the issuer's lock: a key is looked up
                // and taken by one credit at a time.
                lock_accounts(txn, &[ISSUER, user.0]).await?;
                let replay = match &key {
                    Some(k) => by_key(txn, ISSUER, k).await?.is_some(),
                    None => false,
                };
                if replay {
                    Ok(balance(txn, user.0).await?)
                } else {
                    credit(w, txn, user, amount, key.as_deref(), &mut notices).await?
                }
            };
            announce(w, notices, reply, result)
        }
        WalletOp::Transfer { from, req, reply } => {
            let result = transfer(w, txn, state, from, req, &mut notices).await?;
            announce(w, notices, reply, result)
        }
        WalletOp::Cancel { by, id, reply } => {
            let result = cancel(w, txn, by, id, &mut notices).await?;
            announce(w, notices, reply, result)
        }
        WalletOp::RunDue { now, reply } => {
            let claimed = run_due(w, txn, state, now, &mut notices).await?;
            let row = txn
                .query_one(
                    "SELECT min(execute_at), count(*) FROM wallet_transfers WHERE state = 0",
                    &[],
                )
                .await
                .map_err(db_err)?;
            let next: Option<i64> = row.try_get(0).map_err(db_err)?;
            let scheduled: i64 = row.try_get(1).map_err(db_err)?;
            metrics::gauge!("confab_wallet_scheduled").set(scheduled as f64);
            // Due but none claimable: another node holds them (running or
            // cancelling): look again shortly instead of at once.
            let next = match next {
                Some(at) if claimed == 0 && at <= now => Some(now + BUSY_RETRY_MS),
                other => other,
            };
            announce(w, notices, reply, Ok(next))
        }
    })
}

/// What `CreateUser` does when `signup_bonus` > 0: a credit without a key,
/// whose notices nobody needs (the user is new: no session yet). A refusal
/// (the bonus over the limit) fails the signup as an internal error.
pub(super) async fn signup_bonus(
    w: &Ctx,
    txn: &Transaction<'_>,
    user: UserId,
    amount: u64,
) -> Result<(), ApiError> {
    lock_accounts(txn, &[ISSUER, user.0]).await?;
    let mut ignored = Notices::default();
    credit(w, txn, user, amount, None, &mut ignored)
        .await?
        .map(|_| ())
        .map_err(rules::signup_bonus_failed)
}

/// After the commit: the notices, the scheduler's wake-up, the reply.
fn announce<T: Send + 'static>(
    w: &Ctx,
    notices: Notices,
    reply: Reply<T>,
    result: Result<T, ApiError>,
) -> Effect {
    let wake = notices.wake.then(|| w.wallet.wake.clone());
    announce_wallet(notices, wake, reply, result)
}

/// An operator credit from the issuer. The caller holds the issuer's and
/// the user's account locks.
async fn credit(
    w: &Ctx,
    txn: &Transaction<'_>,
    user: UserId,
    amount: u64,
    key: Option<&str>,
    notices: &mut Notices,
) -> Result<Result<u64, ApiError>, ApiError> {
    let new_balance = match rules::credited_balance(balance(txn, user.0).await?, amount) {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let issued = balance(txn, ISSUER)
        .await?
        .checked_add(amount)
        .filter(|v| i64::try_from(*v).is_ok())
        .ok_or_else(|| ApiError::internal("issued total overflow"))?;
    let now = now_ms();
    let id = next_transfer_id(txn).await?;
    let rec = rules::credit_record(id, user, amount, key, now);
    let moved = rules::entries(id, (ISSUER, issued), (user.0, new_balance), amount, now);
    entries(txn, moved).await?;
    insert_transfer(txn, id, &rec).await?;
    notices
        .frames
        .push((user, view_for(w, txn, id, &rec, user.0).await?));
    count("credited");
    Ok(Ok(new_balance))
}

/// A transfer now, or scheduled (`execute_at` ahead, or `repeat`); a
/// repeated idempotency key answers the first transfer (`true`) or a
/// conflict when the request differs.
async fn transfer(
    w: &Ctx,
    txn: &Transaction<'_>,
    state: &mut BatchState,
    from: UserId,
    req: TransferRequest,
    notices: &mut Notices,
) -> Result<Result<(TransferView, bool), ApiError>, ApiError> {
    // Both accounts are locked before anything is read (the sender's lock
    // also guards its keys and its scheduled count); a recipient that is
    // not a user gets no account row.
    let to_exists = base::user_exists(txn, req.to).await?;
    if to_exists {
        lock_accounts(txn, &[from.0, req.to.0]).await?;
    } else {
        lock_accounts(txn, &[from.0]).await?;
    }
    if let Some((id, rec)) = by_key(txn, from.0, &req.key).await? {
        if let Err(e) = rules::check_replay(&req, &rec) {
            return Ok(Err(e));
        }
        return Ok(Ok((view_for(w, txn, id, &rec, from.0).await?, true)));
    }
    let now = now_ms();
    if let Err(e) = rules::check_new_transfer(&req, now, to_exists) {
        return Ok(Err(e));
    }
    let scheduled = req.is_scheduled(now);
    if scheduled {
        let max = w.wallet.settings.max_scheduled;
        if let Err(e) = rules::check_room_to_schedule(pending(txn, from, max).await?, max) {
            return Ok(Err(e));
        }
    }
    let mut rec = req.record(from, now);
    let id = next_transfer_id(txn).await?;
    if scheduled {
        notices.wake = true;
        count("scheduled");
    } else if let Err(e) = execute(w, txn, state, id, &mut rec, now, notices).await? {
        // Refused now: nothing is stored, the same key may be retried.
        count("rejected");
        return Ok(Err(e));
    }
    insert_transfer(txn, id, &rec).await?;
    let view = view_for(w, txn, id, &rec, from.0).await?;
    if scheduled {
        notices.frames.push((from, view.clone()));
    }
    Ok(Ok((view, false)))
}

/// How many scheduled transfers of `from` wait (state 0), counted up to
/// `max`: what `rules::check_room_to_schedule` needs. The caller holds the
/// sender's account lock.
async fn pending(txn: &Transaction<'_>, from: UserId, max: usize) -> Result<usize, ApiError> {
    let row = txn
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM wallet_transfers
                 WHERE from_account = $1 AND state = 0 LIMIT $2) waiting",
            &[&b(from.0), &i64::try_from(max).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(db_err)?;
    let pending: i64 = row.try_get(0).map_err(db_err)?;
    Ok(usize::try_from(pending).unwrap_or(usize::MAX))
}

/// Moves the money of `rec` now and posts its payment message. A refusal
/// (insufficient funds, balance limit) changes nothing. The caller holds
/// both accounts' locks and stores `rec` afterwards.
async fn execute(
    w: &Ctx,
    txn: &Transaction<'_>,
    state: &mut BatchState,
    id: u64,
    rec: &mut TransferRecord,
    now: i64,
    notices: &mut Notices,
) -> Result<Result<(), ApiError>, ApiError> {
    let balances = (balance(txn, rec.from).await?, balance(txn, rec.to).await?);
    let currency = &w.wallet.settings.currency;
    let moved = match rules::transfer_entries(id, rec, balances, currency, now) {
        Ok(moved) => moved,
        Err(e) => return Ok(Err(e)),
    };
    entries(txn, moved).await?;
    rules::mark_executed(rec, now);
    notices
        .messages
        .push(payment_message(w, txn, state, id, rec, now).await?);
    let (from, to) = (UserId(rec.from), UserId(rec.to));
    notices
        .frames
        .push((from, view_for(w, txn, id, rec, rec.from).await?));
    notices
        .frames
        .push((to, view_for(w, txn, id, rec, rec.to).await?));
    count("executed");
    Ok(Ok(()))
}

/// The payment message in the pair's direct chat (created if needed), with
/// the room's view when it is new. Every room is in this database: the
/// message is always posted here, in the transfer's transaction.
async fn payment_message(
    w: &Ctx,
    txn: &Transaction<'_>,
    state: &mut BatchState,
    id: u64,
    rec: &TransferRecord,
    now: i64,
) -> Result<(Message, Option<Room>), ApiError> {
    let (from, to) = (UserId(rec.from), UserId(rec.to));
    let pay = rules::payment_message(id, rec, &w.wallet.settings.currency);
    let (room, created) = base::ensure_direct(txn, from, to).await?;
    // Shown as the transfer's public id by `rows::message`.
    let msg = base::append_message(
        w,
        txn,
        state,
        room,
        from,
        &pay.client_id,
        &pay.text,
        Some(&pay.payment),
        now,
    )
    .await?;
    let view = if created {
        rows::room_view(txn, room).await?
    } else {
        None
    };
    Ok((msg, view))
}

/// Cancels a scheduled (or recurring) transfer of `by`; cancelling a
/// cancelled one answers it as it is.
async fn cancel(
    w: &Ctx,
    txn: &Transaction<'_>,
    by: UserId,
    id: u64,
    notices: &mut Notices,
) -> Result<Result<TransferView, ApiError>, ApiError> {
    // Locked: a run in progress on another node finishes first (then this
    // finds it executed or failed).
    let row = txn
        .query_opt(
            &format!("SELECT {TRANSFER_COLUMNS} FROM wallet_transfers WHERE id = $1 FOR UPDATE"),
            &[&b(id)],
        )
        .await
        .map_err(db_err)?;
    let found = row.as_ref().map(transfer_record).transpose()?;
    let rec = match rules::cancelling(found.map(|(_, rec)| rec), by) {
        Ok(Cancelling::Now(rec)) => rec,
        Ok(Cancelling::Already(rec)) => return Ok(Ok(view_for(w, txn, id, &rec, by.0).await?)),
        Err(e) => return Ok(Err(e)),
    };
    update_transfer(txn, id, &rec).await?;
    notices.wake = true;
    let view = view_for(w, txn, id, &rec, by.0).await?;
    notices.frames.push((by, view.clone()));
    count("cancelled");
    Ok(Ok(view))
}

/// Runs what is due at `now` (at most [`DUE_BATCH`] transfers, the
/// earliest first): a one-off transfer runs itself; a recurring one makes
/// each due run ([`rules::due_runs`]) as a transfer of its own
/// ([`rules::run_record`]) and moves on to its next run time. Returns how
/// many transfers it claimed.
async fn run_due(
    w: &Ctx,
    txn: &Transaction<'_>,
    state: &mut BatchState,
    now: i64,
    notices: &mut Notices,
) -> Result<usize, ApiError> {
    // Claimed: locked until the commit, and skipped by other nodes' runs.
    let rows = txn
        .query(
            &format!(
                "SELECT {TRANSFER_COLUMNS} FROM wallet_transfers
                 WHERE state = 0 AND execute_at <= $1
                 ORDER BY execute_at, id LIMIT $2
                 FOR UPDATE SKIP LOCKED"
            ),
            &[&now, &DUE_BATCH],
        )
        .await
        .map_err(db_err)?;
    let due = rows
        .iter()
        .map(transfer_record)
        .collect::<Result<Vec<_>, _>>()?;
    if due.is_empty() {
        return Ok(0);
    }
    // Every account these may touch, locked at once and in order.
    let accounts: Vec<u64> = due.iter().flat_map(|(_, r)| [r.from, r.to]).collect();
    lock_accounts(txn, &accounts).await?;
    let claimed = due.len();
    for (id, mut rec) in due {
        rules::record_lag(rec.execute_at, now);
        match rec.repeat {
            None => {
                // Executed or failed: either way no longer scheduled.
                run_once(w, txn, state, id, &mut rec, now, notices).await?;
                update_transfer(txn, id, &rec).await?;
            }
            Some(repeat) => {
                for (k, run_at) in rules::due_runs(&rec, repeat, now) {
                    // One run: its own transfer, keyed by (recurring id, run number).
                    let child_id = next_transfer_id(txn).await?;
                    let mut child = rules::run_record(id, &rec, k, run_at, now);
                    run_once(w, txn, state, child_id, &mut child, now, notices).await?;
                    insert_transfer(txn, child_id, &child).await?;
                    rec.runs += 1;
                }
                rec.execute_at = rules::next_run(&rec, repeat);
                update_transfer(txn, id, &rec).await?;
            }
        }
    }
    Ok(claimed)
}

/// Executes a due transfer, or marks it failed (and tells the sender).
/// The caller stores `rec`.
async fn run_once(
    w: &Ctx,
    txn: &Transaction<'_>,
    state: &mut BatchState,
    id: u64,
    rec: &mut TransferRecord,
    now: i64,
    notices: &mut Notices,
) -> Result<(), ApiError> {
    if let Err(e) = execute(w, txn, state, id, rec, now, notices).await? {
        rules::mark_failed(rec, now, &e);
        notices
            .frames
            .push((UserId(rec.from), view_for(w, txn, id, rec, rec.from).await?));
        count("failed");
    }
    Ok(())
}
