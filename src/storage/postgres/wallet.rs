//! Wallet writes in the PostgreSQL backend, inside the writer's batch
//! transaction (see [`crate::wallet`] for the model): a transfer's entries,
//! balances, state and payment message commit together or not at all. The
//! same rules, answers, metrics and notices as the embedded writer's
//! (`writes/wallet.rs`).
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
    balance, by_key, entry, insert_transfer, lock_accounts, next_transfer_id, update_transfer,
    view_for,
};
use super::base;
use super::context::{BatchState, Ctx};
use super::ledger::{TRANSFER_COLUMNS, transfer_record};
use super::rows::{self, b, db_err};
use crate::error::ApiError;
use crate::frames::{Message, Room};
use crate::ids::UserId;
use crate::store::{PaymentInfo, now_ms};
use crate::wallet::{
    self, ISSUER, MAX_AMOUNT, MAX_CATCH_UP_RUNS, State, TransferRecord, TransferRequest,
    TransferView,
};
use crate::writes::{Effect, Notices, Reply, WalletOp, announce_wallet};

/// Most due transfers one run of the scheduler takes.
const DUE_BATCH: i64 = 500;

/// When everything due is being run by another node (locked, so skipped
/// here), the scheduler asks again this much later rather than at once.
const BUSY_RETRY_MS: i64 = 1_000;

fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(hyper::StatusCode::CONFLICT, code, message)
}

fn count(outcome: &'static str) {
    metrics::counter!("confab_wallet_transfers_total", "outcome" => outcome).increment(1);
}

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
        .map_err(|e| ApiError::internal(format!("signup bonus: {}", e.message)))
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
    if amount == 0 || amount > MAX_AMOUNT {
        return Ok(Err(ApiError::bad_request(
            "invalid_amount",
            format!("amount must be 1..={MAX_AMOUNT}"),
        )));
    }
    let balance_now = balance(txn, user.0).await?;
    let Some(new_balance) = balance_now.checked_add(amount).filter(|b| *b <= MAX_AMOUNT) else {
        return Ok(Err(conflict(
            "balance_limit",
            format!("a balance may not exceed {MAX_AMOUNT}"),
        )));
    };
    let issued = balance(txn, ISSUER)
        .await?
        .checked_add(amount)
        .filter(|v| i64::try_from(*v).is_ok())
        .ok_or_else(|| ApiError::internal("issued total overflow"))?;
    let now = now_ms();
    let id = next_transfer_id(txn).await?;
    let rec = TransferRecord {
        from: ISSUER,
        to: user.0,
        amount,
        note: Some("credit".into()),
        key: key.map_or_else(|| format!("credit-{id}"), str::to_string),
        state: State::Executed,
        created_at: now,
        execute_at: now,
        executed_at: Some(now),
        repeat: None,
        parent: None,
        runs: 0,
        failure: None,
        requested_at: None,
    };
    entry(txn, ISSUER, id, -(amount as i64), issued, now).await?;
    entry(txn, user.0, id, amount as i64, new_balance, now).await?;
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
        if !req.same_as(&rec) {
            count("conflict");
            return Ok(Err(conflict(
                "idempotency_conflict",
                "this idempotency_key was already used for a different transfer",
            )));
        }
        count("replayed");
        return Ok(Ok((view_for(w, txn, id, &rec, from.0).await?, true)));
    }
    let now = now_ms();
    if let Err(e) = req.check_new(now) {
        count("rejected");
        return Ok(Err(e));
    }
    if !to_exists {
        count("rejected");
        return Ok(Err(ApiError::user_not_found()));
    }
    let scheduled = req.repeat.is_some() || req.execute_at.is_some_and(|at| at > now);
    if scheduled && let Err(e) = room_to_schedule(w, txn, from).await? {
        // Nothing is stored: the same key may be retried later.
        count("rejected");
        return Ok(Err(e));
    }
    let mut rec = TransferRecord {
        from: from.0,
        to: req.to.0,
        amount: req.amount,
        note: req.note.clone(),
        key: req.key.clone(),
        state: State::Scheduled,
        created_at: now,
        execute_at: req.execute_at.unwrap_or(now),
        executed_at: None,
        repeat: req.repeat,
        parent: None,
        runs: 0,
        failure: None,
        requested_at: req.execute_at,
    };
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

/// Room for one more scheduled transfer of `from`: fewer than
/// `max_scheduled_transfers` of theirs waiting (state 0), else 409
/// `too_many_scheduled`. The caller holds the sender's account lock.
async fn room_to_schedule(
    w: &Ctx,
    txn: &Transaction<'_>,
    from: UserId,
) -> Result<Result<(), ApiError>, ApiError> {
    let max = w.wallet.settings.max_scheduled;
    let row = txn
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM wallet_transfers
                 WHERE from_account = $1 AND state = 0 LIMIT $2) waiting",
            &[&b(from.0), &i64::try_from(max).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(db_err)?;
    let pending: i64 = row.try_get(0).map_err(db_err)?;
    if usize::try_from(pending).is_ok_and(|p| p < max) {
        return Ok(Ok(()));
    }
    Ok(Err(conflict(
        "too_many_scheduled",
        format!(
            "at most {max} scheduled transfers may wait at a time: cancel one, or wait until one has run"
        ),
    )))
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
    let from_balance = balance(txn, rec.from).await?;
    let Some(from_after) = from_balance.checked_sub(rec.amount) else {
        return Ok(Err(conflict(
            "insufficient_funds",
            format!(
                "not enough money: the balance is {}",
                wallet::format_amount(from_balance, &w.wallet.settings.currency)
            ),
        )));
    };
    let to_balance = balance(txn, rec.to).await?;
    let Some(to_after) = to_balance
        .checked_add(rec.amount)
        .filter(|b| *b <= MAX_AMOUNT)
    else {
        return Ok(Err(conflict(
            "balance_limit",
            "the recipient's balance would exceed the limit",
        )));
    };
    entry(txn, rec.from, id, -(rec.amount as i64), from_after, now).await?;
    entry(txn, rec.to, id, rec.amount as i64, to_after, now).await?;
    rec.state = State::Executed;
    rec.executed_at = Some(now);
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
    let amount = wallet::format_amount(rec.amount, &w.wallet.settings.currency);
    let text = match &rec.note {
        Some(n) => format!("💸 {amount} · {n}"),
        None => format!("💸 {amount}"),
    };
    let (room, created) = base::ensure_direct(txn, from, to).await?;
    let payment = PaymentInfo {
        transfer: id,
        amount: rec.amount,
        to: rec.to,
        note: rec.note.clone(),
    };
    // The stored id: stable whatever the key of public ids (shown as the
    // public id by `rows::message`).
    let client_id = format!("pay-{}", wallet::stored_hex(id));
    let msg = base::append_message(
        w,
        txn,
        state,
        room,
        from,
        &client_id,
        &text,
        Some(&payment),
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
    let not_found = || ApiError::not_found("transfer_not_found", "no such transfer");
    // Locked: a run in progress on another node finishes first (then this
    // finds it executed or failed).
    let row = txn
        .query_opt(
            &format!("SELECT {TRANSFER_COLUMNS} FROM wallet_transfers WHERE id = $1 FOR UPDATE"),
            &[&b(id)],
        )
        .await
        .map_err(db_err)?;
    let Some((id, mut rec)) = row.as_ref().map(transfer_record).transpose()? else {
        return Ok(Err(not_found()));
    };
    // A transfer the caller may not see answers exactly as a missing one.
    if !rec.visible_to(by.0) {
        return Ok(Err(not_found()));
    }
    if rec.from != by.0 {
        return Ok(Err(ApiError::forbidden(
            "forbidden",
            "only the sender can cancel a transfer",
        )));
    }
    match rec.state {
        State::Cancelled => return Ok(Ok(view_for(w, txn, id, &rec, by.0).await?)),
        State::Scheduled => {}
        State::Executed | State::Failed => {
            return Ok(Err(conflict(
                "not_cancellable",
                format!("the transfer has already {}", rec.state.name()),
            )));
        }
    }
    rec.state = State::Cancelled;
    update_transfer(txn, id, &rec).await?;
    notices.wake = true;
    let view = view_for(w, txn, id, &rec, by.0).await?;
    notices.frames.push((by, view.clone()));
    count("cancelled");
    Ok(Ok(view))
}

/// Runs what is due at `now` (at most [`DUE_BATCH`] transfers, the
/// earliest first): a one-off transfer runs itself; a recurring one makes
/// each due run (up to [`MAX_CATCH_UP_RUNS`] at once) as a transfer of its
/// own, keyed `{key}#{k}`, and moves on to its next run time. Returns how
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
        metrics::histogram!("confab_wallet_scheduler_lag_seconds")
            .record((now - rec.execute_at).max(0) as f64 / 1000.0);
        match rec.repeat {
            None => {
                // Executed or failed: either way no longer scheduled.
                run_once(w, txn, state, id, &mut rec, now, notices).await?;
                update_transfer(txn, id, &rec).await?;
            }
            Some(repeat) => {
                let first = rec.requested_at.unwrap_or(rec.execute_at);
                let mut made = 0;
                while made < MAX_CATCH_UP_RUNS {
                    let k = rec.runs;
                    let run_at = wallet::run_time(first, repeat, k);
                    if run_at > now {
                        break;
                    }
                    // One run: its own transfer, keyed by (recurring id, run number).
                    let child_id = next_transfer_id(txn).await?;
                    let mut child = TransferRecord {
                        key: format!("{}#{k}", rec.key),
                        state: State::Scheduled,
                        created_at: now,
                        execute_at: run_at,
                        executed_at: None,
                        repeat: None,
                        parent: Some((id, k)),
                        runs: 0,
                        failure: None,
                        requested_at: Some(run_at),
                        ..rec.clone()
                    };
                    run_once(w, txn, state, child_id, &mut child, now, notices).await?;
                    insert_transfer(txn, child_id, &child).await?;
                    rec.runs += 1;
                    made += 1;
                }
                rec.execute_at = wallet::run_time(first, repeat, rec.runs);
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
        rec.state = State::Failed;
        rec.executed_at = Some(now);
        rec.failure = Some(e.message.clone());
        notices
            .frames
            .push((UserId(rec.from), view_for(w, txn, id, rec, rec.from).await?));
        count("failed");
    }
    Ok(())
}
