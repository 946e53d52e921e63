//! Finding damage: reads that survive it (a record that fails its checksum,
//! a page redb cannot read), `confab check` (the whole store), and the
//! server's background scrub.
//!
//! - [`visit_messages`] walks `messages` in key order and, when a page
//!   cannot be read, goes on past it: the rooms after it one by one, and
//!   the keys it hid (known from `message_log`) by point lookups, naming
//!   each one it cannot read. Backups (`--skip-damaged`), exports and
//!   `confab check` use it.
//! - [`check`] verifies everything in one snapshot: every record's checksum
//!   and decoding, every page of every table readable, every room's seq
//!   chain (1..=last, no gaps) and `message_log` against it, and the
//!   ledger (`wallet verify`). [`engine_check`] adds redb's own page
//!   checksums when the store can be opened by this process alone.
//! - [`scrub`] is the background version of the record check: small read
//!   transactions with pauses, on a low-priority thread.
//!
//! The module's files, each importing only those above it: `visit`
//! (reads that survive damage), `check` (the report and the whole check),
//! `offline` (the check with no server running, and redb's own) and
//! `scrub` (the background scrub).

mod check;
mod offline;
mod scrub;
mod visit;

pub use check::{Finding, LedgerCheck, Progress, Report, check};
pub use offline::{check_offline, engine_check};
pub use scrub::{Scrub, ScrubStatus, spawn_scrub};
pub use visit::{Item, catch, visit_messages};
