//! The e-wallet: a double-entry ledger in redb, transfers between users
//! (shown in their direct chat as payment messages, in the same commit), and
//! scheduled and recurring transfers run exactly once each.
//!
//! Money is an integer number of minor units (`Amount`, at most
//! [`MAX_AMOUNT`], so every figure is exact in JSON). It enters only through
//! an operator credit (`confab wallet credit`, or the signup bonus), which
//! moves it from the **issuer** account (id 0, whose balance is the total
//! issued, counted negative) to a user. Every transfer writes two immutable
//! entries (debit and credit) in the same redb transaction as the balances,
//! the transfer's state and its chat message, so it happens once or not at
//! all. All wallet writes run in the `GroupCommitWriter` (`writes/mod.rs`,
//! `apply_wallet`), never elsewhere; this module holds the types, the rules
//! (what both backends' writers apply, in [`rules`]) and the client's view
//! of a transfer. The reads are the storage's
//! (`storage::Storage::balance`, …; the embedded store's in
//! `storage/embedded/ledger.rs`).

pub mod rules;
pub mod scheduler;

pub use crate::store::ledger::{EntryRecord, Repeat, State, TransferRecord, decode_transfer};
pub use crate::store::transfer_ids::{self as ids, TransferIds};

use serde::Serialize;

use crate::error::ApiError;
use crate::ids::UserId;
use crate::store::User;

/// Largest amount in one transfer or balance: 10^15 minor units (< 2^53).
pub use crate::config::MAX_AMOUNT;
/// How far in the past an `execute_at` may be and still run at once (clock skew).
pub const PAST_TOLERANCE_MS: i64 = 5_000;
/// The issuer account: where operator credits come from.
pub const ISSUER: u64 = 0;
/// Missed runs of a recurring transfer made up after downtime, at most.
pub const MAX_CATCH_UP_RUNS: u32 = 60;

/// Wallet settings the writer needs.
#[derive(Clone, Debug)]
pub struct WalletSettings {
    pub currency: String,
    pub signup_bonus: u64,
    /// `max_scheduled_transfers`: pending scheduled (and recurring)
    /// transfers per sender. Scheduling costs nothing until the run, so
    /// without a limit one user could queue any amount of work and rows.
    pub max_scheduled: usize,
}

impl Default for WalletSettings {
    fn default() -> Self {
        WalletSettings {
            currency: "KRW".into(),
            signup_bonus: 0,
            max_scheduled: 50,
        }
    }
}

/// A validated transfer request.
#[derive(Clone, Debug)]
pub struct TransferRequest {
    pub to: UserId,
    pub amount: u64,
    pub key: String,
    pub note: Option<String>,
    /// None or not in the future: now.
    pub execute_at: Option<i64>,
    pub repeat: Option<Repeat>,
}

impl TransferRequest {
    /// The checks that depend on when the request arrives, for a *new*
    /// transfer only: a repeated request (same idempotency key) answers the
    /// original transfer however much later it comes, so these run after
    /// the key was looked up, not in [`parse_request`].
    pub fn check_new(&self, now: i64) -> Result<(), ApiError> {
        if self
            .execute_at
            .is_some_and(|at| at < now - PAST_TOLERANCE_MS)
        {
            return Err(invalid("invalid_execute_at", "execute_at is in the past"));
        }
        Ok(())
    }

    /// Whether a stored transfer was made from the same request (idempotency).
    pub fn same_as(&self, t: &TransferRecord) -> bool {
        t.to == self.to.0
            && t.amount == self.amount
            && t.note == self.note
            && t.repeat == self.repeat
            && t.requested_at == self.execute_at
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

/// Parses and checks a `POST /wallet/transfers` body. `now` in ms. An
/// `execute_at` in the past is only refused for a new transfer (see
/// [`TransferRequest::check_new`]).
pub fn parse_request(
    body: &serde_json::Value,
    from: UserId,
    currency: &str,
    now: i64,
) -> Result<TransferRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("invalid_json", "the body must be a JSON object"))?;
    let to = match obj.get("to_user_id").and_then(|v| v.as_str()) {
        Some(s) => s
            .parse::<UserId>()
            .map_err(|_| invalid("bad_id", "to_user_id is not a user id"))?,
        None => {
            return Err(invalid(
                "invalid_recipient",
                "to_user_id (a user id) is required",
            ));
        }
    };
    if to == from {
        return Err(invalid(
            "invalid_recipient",
            "you cannot send money to yourself",
        ));
    }
    let amount = parse_amount(obj.get("amount"))?;
    if let Some(c) = obj.get("currency")
        && c.as_str() != Some(currency)
    {
        return Err(invalid(
            "invalid_currency",
            format!("this wallet holds {currency} only"),
        ));
    }
    let key = match obj.get("idempotency_key").and_then(|v| v.as_str()) {
        Some(k) if !k.is_empty() && k.len() <= 128 => k.to_string(),
        _ => {
            return Err(invalid(
                "invalid_idempotency_key",
                "idempotency_key (1–128 characters, new for each intended transfer) is required",
            ));
        }
    };
    let note = match obj.get("note") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.chars().count() <= 200 => {
            let s = s.trim();
            (!s.is_empty()).then(|| s.to_string())
        }
        Some(_) => {
            return Err(invalid(
                "invalid_note",
                "note must be text of at most 200 characters",
            ));
        }
    };
    let execute_at = match obj.get("execute_at") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let at = v.as_i64().ok_or_else(|| {
                invalid(
                    "invalid_execute_at",
                    "execute_at must be a time in Unix milliseconds",
                )
            })?;
            // This bound may stay here: a repeat of a stored request met
            // it when it was new, and time only moves it further out.
            if at > now + 10 * 366 * 86_400_000 {
                return Err(invalid(
                    "invalid_execute_at",
                    "execute_at is more than 10 years ahead",
                ));
            }
            Some(at)
        }
    };
    let repeat = match obj.get("repeat") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_str() {
            Some("weekly") => Some(Repeat::Weekly),
            Some("monthly") => Some(Repeat::Monthly),
            _ => {
                return Err(invalid(
                    "invalid_repeat",
                    "repeat must be \"weekly\" or \"monthly\"",
                ));
            }
        },
    };
    if repeat.is_some() && execute_at.is_none() {
        return Err(invalid(
            "invalid_execute_at",
            "a recurring transfer needs execute_at (its first run)",
        ));
    }
    Ok(TransferRequest {
        to,
        amount,
        key,
        note,
        execute_at,
        repeat,
    })
}

/// An amount: a JSON integer in 1..=MAX_AMOUNT.
pub fn parse_amount(v: Option<&serde_json::Value>) -> Result<u64, ApiError> {
    let bad = || {
        invalid(
            "invalid_amount",
            format!("amount must be a whole number of minor units between 1 and {MAX_AMOUNT}"),
        )
    };
    match v.and_then(|v| v.as_u64()) {
        Some(a) if (1..=MAX_AMOUNT).contains(&a) => Ok(a),
        _ => Err(bad()),
    }
}

/// Digits after the decimal point for a currency (ISO 4217 minor units).
pub fn minor_digits(currency: &str) -> u32 {
    match currency {
        "KRW" | "JPY" | "VND" | "CLP" | "ISK" | "UGX" | "PYG" | "XAF" | "XOF" => 0,
        "BHD" | "KWD" | "OMR" | "JOD" | "TND" => 3,
        _ => 2,
    }
}

/// "10,000 KRW", "12.50 USD".
pub fn format_amount(minor: u64, currency: &str) -> String {
    let d = minor_digits(currency);
    let unit = 10u64.pow(d);
    let whole = (minor / unit).to_string();
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if d == 0 {
        format!("{grouped} {currency}")
    } else {
        format!(
            "{grouped}.{:0width$} {currency}",
            minor % unit,
            width = d as usize
        )
    }
}

/// The time of run `k` (0 = the first) of a recurring transfer first due at `first`.
pub fn run_time(first: i64, repeat: Repeat, k: u32) -> i64 {
    match repeat {
        Repeat::Weekly => first + i64::from(k) * 7 * 86_400_000,
        Repeat::Monthly => {
            let day_ms = first.rem_euclid(86_400_000);
            let (y, m, d) = civil_from_days(first.div_euclid(86_400_000));
            let months = i64::from(m) - 1 + i64::from(k);
            let (y2, m2) = (
                y + months.div_euclid(12),
                (months.rem_euclid(12) + 1) as u32,
            );
            let d2 = d.min(days_in_month(y2, m2));
            days_from_civil(y2, m2, d2) * 86_400_000 + day_ms
        }
    }
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (UTC).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A transfer as clients see it (`direction` from the viewer's side).
#[derive(Serialize, Clone, Debug)]
pub struct TransferView {
    pub id: String,
    pub direction: &'static str,
    pub counterparty: Option<User>,
    pub amount: u64,
    pub currency: String,
    pub note: Option<String>,
    pub state: &'static str,
    pub created_at: i64,
    pub execute_at: i64,
    pub executed_at: Option<i64>,
    pub repeat: Option<&'static str>,
    /// For one run of a recurring transfer: the recurring transfer's id.
    pub recurring: Option<String>,
    pub failure: Option<String>,
}

/// A stored transfer id in its stored form (16 hex digits), for what is
/// stored or only the operator sees (`pay-…` client ids of payment
/// messages, `wallet verify`). Clients get [`TransferIds::show`].
pub fn stored_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// Builds the client view of a transfer for `viewer`.
pub fn view(
    id: u64,
    t: &TransferRecord,
    viewer: u64,
    currency: &str,
    ids: &TransferIds,
    user: impl Fn(u64) -> Option<User>,
) -> TransferView {
    let outgoing = t.from == viewer;
    let other = if outgoing { t.to } else { t.from };
    TransferView {
        id: ids.show(id),
        direction: if outgoing { "out" } else { "in" },
        counterparty: if other == ISSUER { None } else { user(other) },
        amount: t.amount,
        currency: currency.to_string(),
        note: t.note.clone(),
        state: t.state.name(),
        created_at: t.created_at,
        execute_at: t.execute_at,
        executed_at: t.executed_at,
        repeat: t.repeat.map(Repeat::name),
        recurring: t.parent.map(|(p, _)| ids.show(p)),
        failure: t.failure.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monthly_runs_keep_the_day_and_clamp_short_months() {
        // 2026-01-31 09:00 UTC
        let first = days_from_civil(2026, 1, 31) * 86_400_000 + 9 * 3_600_000;
        let day = |t: i64| civil_from_days(t.div_euclid(86_400_000));
        assert_eq!(day(run_time(first, Repeat::Monthly, 1)), (2026, 2, 28));
        assert_eq!(day(run_time(first, Repeat::Monthly, 2)), (2026, 3, 31));
        assert_eq!(day(run_time(first, Repeat::Monthly, 12)), (2027, 1, 31));
        assert_eq!(
            run_time(first, Repeat::Monthly, 1).rem_euclid(86_400_000),
            9 * 3_600_000
        );
        assert_eq!(run_time(first, Repeat::Weekly, 2) - first, 14 * 86_400_000);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2024, 2, 29), civil_days(2024, 2, 29));
    }

    fn civil_days(y: i64, m: u32, d: u32) -> i64 {
        let (mut n, mut yy, mut mm) = (0i64, 1970i64, 1u32);
        while (yy, mm) != (y, m) {
            n += i64::from(days_in_month(yy, mm));
            mm += 1;
            if mm == 13 {
                mm = 1;
                yy += 1;
            }
        }
        n + i64::from(d) - 1
    }

    #[test]
    fn amounts_are_formatted_per_currency() {
        assert_eq!(format_amount(10_000, "KRW"), "10,000 KRW");
        assert_eq!(format_amount(1_250, "USD"), "12.50 USD");
        assert_eq!(format_amount(5, "USD"), "0.05 USD");
        assert_eq!(format_amount(1_000_000, "KRW"), "1,000,000 KRW");
    }
}

/// What `confab wallet verify` found.
#[derive(Serialize, Debug, Default)]
pub struct Verification {
    pub accounts: u64,
    pub transfers: u64,
    pub entries: u64,
    pub issued: u64,
    pub total_balances: u64,
    pub scheduled: u64,
    /// Every breach of a ledger invariant (empty = the ledger is sound).
    pub breaches: Vec<String>,
}
