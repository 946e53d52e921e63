//! `confab migrate`: moves a single node's data — its embedded store, or a
//! backup file — into a cluster's PostgreSQL database, verified, and safe
//! to run again (docs/SCALEOUT.md, "Moving a single node to a cluster").
//!
//! 1. **The source** is read in one redb snapshot, opened read-only (a
//!    running server holds its store: that is refused, naming it); a backup
//!    is first restored — fully verified — into a temporary directory. It
//!    is read whole once before anything is written (the figures the
//!    database must match), so that a page redb cannot read stops the
//!    migration with the database untouched.
//! 2. **The target** is checked before anything is written: reachable,
//!    the credentials accepted, its schema not newer than this binary's,
//!    and either empty or holding this same source's migration (its
//!    `meta` rows `migrated_from`, `migrated_log_head`, …). Anything else
//!    is refused and nothing is changed. Then its schema is brought up to
//!    date (`storage::postgres::schema`), the source is recorded, and the
//!    message stream position and the transfer id sequence are moved past
//!    the source's, so that later positions and ids never collide.
//! 3. **The copy**: every table, as batches of rows sent as `unnest`
//!    arrays, each batch its own transaction, every insert `ON CONFLICT
//!    (primary key) DO NOTHING` — so a run cut short (kill -9, a lost
//!    connection) is resumed by running it again, and a re-run of a
//!    finished migration inserts nothing. Messages go in stream order; a
//!    resumed run starts after the last position the database holds.
//!    Damaged records of the source are reported and left out, never made
//!    up.
//! 4. **The verification** compares the source with the database: rows per
//!    table, every room's last seq and message count, every balance, the
//!    issued total; and runs the database's own ledger check. It is
//!    recorded (`migration_verified_at`) the first time it passes.
//!
//! Files, each importing only those before it: `batch` (the tables
//! filled, a batch of rows as arrays), `report` (progress, report,
//! failure), `scan` (reads of the redb snapshot that survive damage),
//! `verify` (the figures of either side and their comparison), `source`
//! (the snapshot: batches and its figures), `target` (the database:
//! checks, schema, inserts, its figures) and this file (the run).

mod batch;
mod report;
mod scan;
mod source;
mod target;
mod verify;

use std::path::PathBuf;
use std::time::Instant;

use batch::Batch;
use report::resume_hint;
pub use report::{Compared, Failure, Progress, Report};

/// Where the data comes from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A stopped node's data directory.
    DataDir(PathBuf),
    /// A backup file (`confab backup`).
    Backup(PathBuf),
}

/// What `confab migrate` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub from: Input,
    /// The cluster's database (libpq connection string or URL).
    pub database_url: String,
    /// The node's configured `jwt_secret` (empty: it used the data
    /// directory's `jwt_secret` file). Only a hash of it is kept, to tell
    /// this node's migration from another's.
    pub configured_secret: String,
}

/// Batches the source's reader may be ahead of the database.
const AHEAD: usize = 4;

/// Runs a migration (see the module docs). `progress` hears of the backup
/// restore, the copy and the verification.
pub fn run(opts: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Report, Failure> {
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::unchanged(format!("cannot start the runtime: {e}")))?;
    let secret = (!opts.configured_secret.is_empty()).then_some(opts.configured_secret.as_bytes());
    let src = match &opts.from {
        Input::DataDir(dir) => source::Source::open_dir(dir, secret),
        Input::Backup(file) => source::Source::open_backup(file, secret, &mut |done, total| {
            progress(Progress {
                stage: "restoring the backup",
                done,
                total,
            })
        }),
    }
    .map_err(Failure::unchanged)?;
    let snapshot = src.snapshot();
    let mut db = runtime
        .block_on(target::Target::connect(&opts.database_url))
        .map_err(Failure::unchanged)?;
    // The whole source is read once before anything is written: damage
    // that stops the migration stops it here, with the database untouched.
    let now_secs = crate::auth::now_secs();
    progress(Progress {
        stage: "reading the source",
        done: 0,
        total: 1,
    });
    let (expected, mut damage) = src.summary(now_secs).map_err(Failure::unchanged)?;
    let prepared = runtime.block_on(db.prepare(&snapshot))?;

    // The copy: the source read on a thread of its own, the batches
    // inserted here as they come.
    let copy_started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(AHEAD);
    let total = src.messages_after(prepared.resume_after);
    let (produced, consumed) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let copied = src.produce(prepared.resume_after, now_secs, &mut |batch| {
                tx.blocking_send(batch).is_ok()
            });
            drop(tx);
            copied
        });
        let consumed = runtime.block_on(db.copy(&mut rx, &mut |done| {
            progress(Progress {
                stage: "copying",
                done,
                total,
            })
        }));
        // A failed insert drops the receiver: the reader stops at its next batch.
        drop(rx);
        let produced = reader
            .join()
            .unwrap_or_else(|p| Err(crate::store::panic_message(&*p)));
        (produced, consumed)
    });
    let copy_seconds = copy_started.elapsed().as_secs_f64();
    let inserted = consumed.map_err(|e| Failure::midway(resume_hint(&e)))?;
    damage.absorb(produced.map_err(|e| Failure::midway(resume_hint(&e)))?);
    progress(Progress {
        stage: "verifying",
        done: 0,
        total: 1,
    });
    let found = runtime
        .block_on(db.summary(now_secs))
        .map_err(|e| Failure::midway(resume_hint(&e)))?;
    let outcome = verify::compare(&expected, &found);
    let marked = if outcome.mismatches.is_empty() {
        runtime
            .block_on(db.mark_verified())
            .map_err(|e| Failure::midway(resume_hint(&e)))?
    } else {
        false
    };
    progress(Progress {
        stage: "verifying",
        done: 1,
        total: 1,
    });
    let changed = inserted.values().any(|&n| n > 0) || prepared.changed || marked;
    let seconds = started.elapsed().as_secs_f64();
    let messages_copied = inserted.get("messages").copied().unwrap_or(0);
    Ok(Report {
        source: src.describe(),
        source_id: format!("{:016x}", snapshot.id as u64),
        source_id_from: snapshot.id_from,
        database: db.describe().to_string(),
        resumed: prepared.resumed,
        inserted,
        changed,
        verified: outcome.mismatches.is_empty(),
        compared: outcome.compared,
        rooms_checked: outcome.rooms_checked,
        accounts_checked: outcome.accounts_checked,
        mismatches: outcome.mismatches,
        ledger: found.ledger,
        damaged: damage.found,
        damaged_total: damage.total,
        lost_messages: damage.lost,
        messages_copied,
        seconds,
        copy_seconds,
        messages_per_second: messages_copied as f64 / copy_seconds.max(1e-9),
    })
}
