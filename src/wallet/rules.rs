//! The wallet's rules as both storage backends' writers apply them
//! (`writes/wallet.rs` on redb, `storage/postgres/wallet.rs` on
//! PostgreSQL): what a transfer is stored as when it is made, run or
//! cancelled, what moving its money may refuse, its payment message, and
//! the `confab_wallet_*` metrics. The backends read and write the rows;
//! what the rows become, and every refusal's code and message, is decided
//! here, once.

use crate::error::ApiError;
use crate::ids::UserId;
use crate::store::PaymentInfo;

use super::{
    EntryRecord, ISSUER, MAX_AMOUNT, MAX_CATCH_UP_RUNS, Repeat, State, TransferRecord,
    TransferRequest, format_amount, run_time, stored_hex,
};

/// A 409 refusal.
pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(hyper::StatusCode::CONFLICT, code, message)
}

/// Counts a transfer's outcome (`confab_wallet_transfers_total`):
/// credited, scheduled, executed, failed, cancelled, replayed, conflict,
/// rejected.
pub fn count(outcome: &'static str) {
    metrics::counter!("confab_wallet_transfers_total", "outcome" => outcome).increment(1);
}

/// Records how late the scheduler ran a transfer due at `due`
/// (`confab_wallet_scheduler_lag_seconds`).
pub fn record_lag(due: i64, now: i64) {
    metrics::histogram!("confab_wallet_scheduler_lag_seconds")
        .record((now - due).max(0) as f64 / 1000.0);
}

/// The one answer for a transfer that is missing or not the caller's to
/// see (the API's reads answer the same).
pub fn transfer_not_found() -> ApiError {
    ApiError::not_found("transfer_not_found", "no such transfer")
}

impl TransferRequest {
    /// Whether this request, new at `now`, is scheduled (`execute_at`
    /// ahead, or `repeat`) rather than run at once.
    pub fn is_scheduled(&self, now: i64) -> bool {
        self.repeat.is_some() || self.execute_at.is_some_and(|at| at > now)
    }

    /// The record the new transfer of `from` starts as, made at `now`:
    /// scheduled, until it runs (at once, or at its `execute_at`).
    pub fn record(&self, from: UserId, now: i64) -> TransferRecord {
        TransferRecord {
            from: from.0,
            to: self.to.0,
            amount: self.amount,
            note: self.note.clone(),
            key: self.key.clone(),
            state: State::Scheduled,
            created_at: now,
            execute_at: self.execute_at.unwrap_or(now),
            executed_at: None,
            repeat: self.repeat,
            parent: None,
            runs: 0,
            failure: None,
            requested_at: self.execute_at,
        }
    }
}

/// A stored transfer met again under its idempotency key: the same request
/// answers it (counted `replayed`), a different one is 409
/// `idempotency_conflict` (counted `conflict`).
pub fn check_replay(req: &TransferRequest, stored: &TransferRecord) -> Result<(), ApiError> {
    if !req.same_as(stored) {
        count("conflict");
        return Err(conflict(
            "idempotency_conflict",
            "this idempotency_key was already used for a different transfer",
        ));
    }
    count("replayed");
    Ok(())
}

/// The checks of a new transfer at `now` before anything is stored: the
/// request's own ([`TransferRequest::check_new`]), then that the recipient
/// is a user. A refusal is counted `rejected`.
pub fn check_new_transfer(
    req: &TransferRequest,
    now: i64,
    recipient_exists: bool,
) -> Result<(), ApiError> {
    let checked = req.check_new(now).and_then(|()| {
        if recipient_exists {
            Ok(())
        } else {
            Err(ApiError::user_not_found())
        }
    });
    if checked.is_err() {
        count("rejected");
    }
    checked
}

/// Room for one more scheduled transfer of a sender with `pending` waiting:
/// fewer than `max` (`max_scheduled_transfers`), else 409
/// `too_many_scheduled` (counted `rejected`; nothing is stored, so the same
/// key may be retried later).
pub fn check_room_to_schedule(pending: usize, max: usize) -> Result<(), ApiError> {
    if pending < max {
        return Ok(());
    }
    count("rejected");
    Err(conflict(
        "too_many_scheduled",
        format!(
            "at most {max} scheduled transfers may wait at a time: cancel one, or wait until one has run"
        ),
    ))
}

/// `balance` plus `amount`, if that stays within [`MAX_AMOUNT`].
fn within_limit(balance: u64, amount: u64) -> Option<u64> {
    balance.checked_add(amount).filter(|b| *b <= MAX_AMOUNT)
}

/// The balance an operator credit of `amount` leaves on the user's
/// `balance`: the amount must be 1..=[`MAX_AMOUNT`] (else 400
/// `invalid_amount`), and so must the balance after (else 409
/// `balance_limit`).
pub fn credited_balance(balance: u64, amount: u64) -> Result<u64, ApiError> {
    if amount == 0 || amount > MAX_AMOUNT {
        return Err(ApiError::bad_request(
            "invalid_amount",
            format!("amount must be 1..={MAX_AMOUNT}"),
        ));
    }
    within_limit(balance, amount).ok_or_else(|| {
        conflict(
            "balance_limit",
            format!("a balance may not exceed {MAX_AMOUNT}"),
        )
    })
}

/// The record of an operator credit of `amount` to `user` (transfer `id`,
/// executed at `now`); without a key, it is keyed `credit-{id}`.
pub fn credit_record(
    id: u64,
    user: UserId,
    amount: u64,
    key: Option<&str>,
    now: i64,
) -> TransferRecord {
    TransferRecord {
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
    }
}

/// Moving transfer `id`'s money (`rec`) at `now`, the sender's balance
/// being `from_balance` and the recipient's `to_balance`: its two ledger
/// entries ([`entries`]). Refused (409, nothing changes) when the sender is
/// short (`insufficient_funds`, with their balance in `currency`) or the
/// recipient's balance would pass [`MAX_AMOUNT`] (`balance_limit`).
pub fn transfer_entries(
    id: u64,
    rec: &TransferRecord,
    (from_balance, to_balance): (u64, u64),
    currency: &str,
    now: i64,
) -> Result<[(u64, EntryRecord); 2], ApiError> {
    let Some(from_after) = from_balance.checked_sub(rec.amount) else {
        return Err(conflict(
            "insufficient_funds",
            format!(
                "not enough money: the balance is {}",
                format_amount(from_balance, currency)
            ),
        ));
    };
    let Some(to_after) = within_limit(to_balance, rec.amount) else {
        return Err(conflict(
            "balance_limit",
            "the recipient's balance would exceed the limit",
        ));
    };
    Ok(entries(
        id,
        (rec.from, from_after),
        (rec.to, to_after),
        rec.amount,
        now,
    ))
}

/// The two ledger entries of transfer `id` moving `amount` from account
/// `from` to account `to` at `ts`, each with the balance it leaves
/// (`from_after`, `to_after`): (account, entry), the debit first.
pub fn entries(
    id: u64,
    (from, from_after): (u64, u64),
    (to, to_after): (u64, u64),
    amount: u64,
    ts: i64,
) -> [(u64, EntryRecord); 2] {
    let entry = |delta: i64, balance_after: u64| EntryRecord {
        transfer: id,
        delta,
        balance_after,
        ts,
    };
    [
        (from, entry(-(amount as i64), from_after)),
        (to, entry(amount as i64, to_after)),
    ]
}

/// A transfer whose money moved at `now`.
pub fn mark_executed(rec: &mut TransferRecord, now: i64) {
    rec.state = State::Executed;
    rec.executed_at = Some(now);
}

/// A due transfer that was refused with `why` at `now`: failed, with the
/// refusal's message.
pub fn mark_failed(rec: &mut TransferRecord, now: i64, why: &ApiError) {
    rec.state = State::Failed;
    rec.executed_at = Some(now);
    rec.failure = Some(why.message.clone());
}

/// The payment message a transfer posts in its pair's direct chat.
pub struct PaymentMessage {
    /// The stored id (`pay-` and the transfer's stored id): stable whatever
    /// the key of public ids (clients see the transfer's public id).
    pub client_id: String,
    /// "💸 10,000 KRW", with " · {note}" when it has one.
    pub text: String,
    pub payment: PaymentInfo,
}

/// The payment message of transfer `id` (`rec`), amounts in `currency`.
pub fn payment_message(id: u64, rec: &TransferRecord, currency: &str) -> PaymentMessage {
    let amount = format_amount(rec.amount, currency);
    let text = match &rec.note {
        Some(n) => format!("💸 {amount} · {n}"),
        None => format!("💸 {amount}"),
    };
    PaymentMessage {
        client_id: format!("pay-{}", stored_hex(id)),
        text,
        payment: PaymentInfo {
            transfer: id,
            amount: rec.amount,
            to: rec.to,
            note: rec.note.clone(),
        },
    }
}

/// What cancelling a transfer comes to when it may be cancelled.
pub enum Cancelling {
    /// It was cancelled already: answered as it is, nothing changes.
    Already(TransferRecord),
    /// It was scheduled: now cancelled (to be stored, and taken off the
    /// schedule).
    Now(TransferRecord),
}

/// Cancelling transfer `rec` (None: there is none) by `by`: one the caller
/// may not see answers exactly as a missing one (404
/// `transfer_not_found`); only its sender may cancel it (403 `forbidden`);
/// only a scheduled one can be (409 `not_cancellable`).
pub fn cancelling(rec: Option<TransferRecord>, by: UserId) -> Result<Cancelling, ApiError> {
    let Some(mut rec) = rec.filter(|r| r.visible_to(by.0)) else {
        return Err(transfer_not_found());
    };
    if rec.from != by.0 {
        return Err(ApiError::forbidden(
            "forbidden",
            "only the sender can cancel a transfer",
        ));
    }
    match rec.state {
        State::Cancelled => Ok(Cancelling::Already(rec)),
        State::Scheduled => {
            rec.state = State::Cancelled;
            Ok(Cancelling::Now(rec))
        }
        State::Executed | State::Failed => Err(conflict(
            "not_cancellable",
            format!("the transfer has already {}", rec.state.name()),
        )),
    }
}

/// When recurring transfer `rec`'s runs are counted from: its first run.
fn first_run(rec: &TransferRecord) -> i64 {
    rec.requested_at.unwrap_or(rec.execute_at)
}

/// The runs of recurring transfer `rec` (repeating every `repeat`) due at
/// `now` and not made yet, earliest first, at most [`MAX_CATCH_UP_RUNS`]:
/// (run number, run time).
pub fn due_runs(rec: &TransferRecord, repeat: Repeat, now: i64) -> Vec<(u32, i64)> {
    let first = first_run(rec);
    (rec.runs..)
        .take(MAX_CATCH_UP_RUNS as usize)
        .map(|k| (k, run_time(first, repeat, k)))
        .take_while(|&(_, at)| at <= now)
        .collect()
}

/// When recurring transfer `rec` runs next, after the `rec.runs` made.
pub fn next_run(rec: &TransferRecord, repeat: Repeat) -> i64 {
    run_time(first_run(rec), repeat, rec.runs)
}

/// The record of run `k` (due at `run_at`, made at `now`) of recurring
/// transfer `parent` (`parent_rec`): a transfer of its own between the
/// same accounts, keyed `{key}#{k}`, scheduled until it runs.
pub fn run_record(
    parent: u64,
    parent_rec: &TransferRecord,
    k: u32,
    run_at: i64,
    now: i64,
) -> TransferRecord {
    TransferRecord {
        key: format!("{}#{k}", parent_rec.key),
        state: State::Scheduled,
        created_at: now,
        execute_at: run_at,
        executed_at: None,
        repeat: None,
        parent: Some((parent, k)),
        runs: 0,
        failure: None,
        requested_at: Some(run_at),
        ..parent_rec.clone()
    }
}

/// A signup bonus's refusal (over the balance limit) fails the signup as
/// an internal error.
pub fn signup_bonus_failed(refusal: ApiError) -> ApiError {
    ApiError::internal(format!("signup bonus: {}", refusal.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduled(from: u64, to: u64) -> TransferRecord {
        TransferRequest {
            to: UserId(to),
            amount: 1_000,
            key: "k".into(),
            note: Some("rent".into()),
            execute_at: Some(10_000),
            repeat: Some(Repeat::Weekly),
        }
        .record(UserId(from), 5_000)
    }

    #[test]
    fn only_the_sender_cancels_what_is_scheduled() {
        let rec = scheduled(1, 2);
        assert!(matches!(
            cancelling(Some(rec.clone()), UserId(1)),
            Ok(Cancelling::Now(r)) if r.state == State::Cancelled
        ));
        // The recipient does not see a scheduled transfer at all.
        assert_eq!(
            cancelling(Some(rec.clone()), UserId(2))
                .err()
                .map(|e| e.code),
            Some("transfer_not_found")
        );
        assert_eq!(
            cancelling(None, UserId(1)).err().map(|e| e.code),
            Some("transfer_not_found")
        );
        let mut done = rec.clone();
        mark_executed(&mut done, 11_000);
        assert_eq!(
            cancelling(Some(done.clone()), UserId(2))
                .err()
                .map(|e| e.code),
            Some("forbidden")
        );
        let refused = cancelling(Some(done), UserId(1)).err().unwrap();
        assert_eq!(refused.code, "not_cancellable");
        assert_eq!(refused.message, "the transfer has already executed");
        let mut cancelled = rec;
        cancelled.state = State::Cancelled;
        assert!(matches!(
            cancelling(Some(cancelled), UserId(1)),
            Ok(Cancelling::Already(_))
        ));
    }

    #[test]
    fn due_runs_catch_up_at_most_so_many_and_then_move_on() {
        let mut rec = scheduled(1, 2);
        let week = 7 * 86_400_000;
        assert_eq!(due_runs(&rec, Repeat::Weekly, 9_999), []);
        assert_eq!(
            due_runs(&rec, Repeat::Weekly, 10_000 + week),
            [(0, 10_000), (1, 10_000 + week)]
        );
        let far = 10_000 + 1_000 * week;
        let runs = due_runs(&rec, Repeat::Weekly, far);
        assert_eq!(runs.len(), MAX_CATCH_UP_RUNS as usize);
        rec.runs = 2;
        assert_eq!(next_run(&rec, Repeat::Weekly), 10_000 + 2 * week);
        let run = run_record(7, &rec, 2, 10_000 + 2 * week, far);
        assert_eq!(run.key, "k#2");
        assert_eq!(run.parent, Some((7, 2)));
        assert_eq!((run.repeat, run.runs), (None, 0));
        assert_eq!(run.requested_at, Some(10_000 + 2 * week));
    }

    #[test]
    fn moving_money_is_refused_short_or_over_the_limit() {
        let rec = scheduled(1, 2);
        let short = transfer_entries(9, &rec, (999, 0), "KRW", 0).err().unwrap();
        assert_eq!(short.code, "insufficient_funds");
        assert_eq!(short.message, "not enough money: the balance is 999 KRW");
        let over = transfer_entries(9, &rec, (1_000, MAX_AMOUNT), "KRW", 0);
        assert_eq!(over.err().map(|e| e.code), Some("balance_limit"));
        let [(from, debit), (to, credit)] =
            transfer_entries(9, &rec, (1_500, 10), "KRW", 42).unwrap();
        assert_eq!((from, debit.delta, debit.balance_after), (1, -1_000, 500));
        assert_eq!((to, credit.delta, credit.balance_after), (2, 1_000, 1_010));
        assert_eq!((debit.transfer, credit.ts), (9, 42));
        assert_eq!(
            credited_balance(0, 0).err().map(|e| e.code),
            Some("invalid_amount")
        );
        assert_eq!(
            credited_balance(MAX_AMOUNT, 1).err().map(|e| e.code),
            Some("balance_limit")
        );
    }

    #[test]
    fn a_payment_message_shows_the_amount_and_note() {
        let pay = payment_message(0xab, &scheduled(1, 2), "KRW");
        assert_eq!(pay.text, "💸 1,000 KRW · rent");
        assert_eq!(pay.client_id, "pay-00000000000000ab");
        assert_eq!((pay.payment.transfer, pay.payment.to), (0xab, 2));
    }
}
