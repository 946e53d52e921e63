//! What a migration tells: its progress, its report, why it stopped.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::integrity::Finding;
use crate::wallet::Verification;

/// How far a migration has got (for the progress line).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub stage: &'static str,
    pub done: u64,
    pub total: u64,
}

/// One figure compared between the source and the database.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    pub source: u64,
    pub database: u64,
}

/// What a migration did and found.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The data directory or backup file migrated.
    pub source: String,
    /// The source's identity as recorded in the database (16 hex digits),
    /// and what it was derived from (`token secret` or `first user`).
    pub source_id: String,
    pub source_id_from: &'static str,
    /// Hosts and database (never the password).
    pub database: String,
    /// The database already held this source's migration (in part or
    /// whole): this run resumed or repeated it.
    pub resumed: bool,
    /// Rows this run inserted, per table (0 everywhere: nothing changed).
    pub inserted: BTreeMap<&'static str, u64>,
    /// Whether this run changed anything in the database.
    pub changed: bool,
    /// Rows per table (and the other figures) in the source and the
    /// database.
    pub compared: BTreeMap<&'static str, Compared>,
    /// Rooms whose last seq and message count were compared.
    pub rooms_checked: u64,
    /// Accounts whose balances were compared.
    pub accounts_checked: u64,
    /// Every difference found (the first 100); empty: verified.
    pub mismatches: Vec<String>,
    pub verified: bool,
    /// The database's ledger check (`wallet verify` there).
    pub ledger: Verification,
    /// Damaged records of the source, left out (the first 100), and how
    /// many in all; lost messages (placeholders of an earlier
    /// `--skip-damaged` backup) left out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<Finding>,
    pub damaged_total: u64,
    pub lost_messages: u64,
    pub messages_copied: u64,
    /// The whole run, and the copy alone (messages per second: of the
    /// copy).
    pub seconds: f64,
    pub copy_seconds: f64,
    pub messages_per_second: f64,
}

/// Why a migration did not finish.
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    /// Whether the database may have been changed (then running the same
    /// command again resumes); false: nothing was changed.
    pub changed: bool,
}

impl Failure {
    pub(super) fn unchanged(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            changed: false,
        }
    }

    pub(super) fn midway(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            changed: true,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A failure after the database was changed, with what to do about it.
pub(super) fn resume_hint(e: &str) -> String {
    format!("{e}; the database holds part of this migration: running the command again resumes it")
}
