//! The wallet's stored records (`wallet_transfers`, `wallet_entries`
//! values; docs/STORAGE.md): their format is the store's, their rules are
//! the wallet's (`wallet/`).

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Repeat {
    Weekly,
    Monthly,
}

impl Repeat {
    pub fn name(self) -> &'static str {
        match self {
            Repeat::Weekly => "weekly",
            Repeat::Monthly => "monthly",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum State {
    /// Waiting for its `execute_at` (a recurring transfer stays here between runs).
    Scheduled,
    Executed,
    Failed,
    Cancelled,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Scheduled => "scheduled",
            State::Executed => "executed",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

/// `wallet_transfers` value.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferRecord {
    pub from: u64,
    pub to: u64,
    pub amount: u64,
    pub note: Option<String>,
    pub key: String,
    pub state: State,
    pub created_at: i64,
    /// When it runs (scheduled) or ran; for a recurring transfer, the next run.
    pub execute_at: i64,
    pub executed_at: Option<i64>,
    pub repeat: Option<Repeat>,
    /// For one run of a recurring transfer: the recurring transfer and the run number.
    pub parent: Option<(u64, u32)>,
    /// Runs made so far (recurring transfers).
    pub runs: u32,
    pub failure: Option<String>,
    /// The request's `execute_at` as given (idempotency; first run of a recurring one).
    pub requested_at: Option<i64>,
}

impl TransferRecord {
    /// Whether `viewer` may see this transfer at all. The sender always
    /// may; the recipient only once it has moved money to them. Until then
    /// it is the sender's plan, not a payment: showing it would let anyone
    /// fill a stranger's history with "incoming" transfers they cannot pay
    /// (or cancel at the last moment). So a scheduled, failed or cancelled
    /// transfer, and a recurring transfer itself (its runs are separate
    /// transfers), are invisible to the recipient — answered like a
    /// transfer that does not exist.
    pub fn visible_to(&self, viewer: u64) -> bool {
        self.from == viewer || (self.to == viewer && self.state == State::Executed)
    }
}

/// `wallet_entries` value: one side of a transfer, never changed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryRecord {
    pub transfer: u64,
    /// Signed change of the account (debit < 0).
    pub delta: i64,
    pub balance_after: u64,
    pub ts: i64,
}

/// Decodes the stored transfer `id` (unseals it: damage is reported and
/// answered as `storage_damaged`).
pub fn decode_transfer(id: u64, bytes: &[u8]) -> Result<TransferRecord, ApiError> {
    super::seal::open(super::seal::Rec::WalletTransfers, id, bytes)
}
