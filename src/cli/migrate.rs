//! `confab migrate`: a stopped single node's data directory (or a backup
//! file) into the cluster's PostgreSQL database, verified (the work is
//! `confab::migrate`). Exit 0: copied and verified; 1: copied, but the
//! verification found differences (named); 2: did not run or stopped
//! (saying whether the database was changed: then running the same
//! command again resumes).

use std::process::ExitCode;

use confab::migrate::{self, Input, Options, Progress, Report};

use super::output::{print_json, progress_bar};
use crate::{MigrateArgs, load_config};

pub(crate) fn run_migrate(args: MigrateArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let url = config.store.database_url.clone();
    if url.is_empty() {
        eprintln!(
            "confab: migrate needs the cluster's database: --database-url URL (or `database_url` in the config)"
        );
        return ExitCode::from(2);
    }
    let from = match &args.from_backup {
        Some(file) => Input::Backup(file.clone()),
        None => Input::DataDir(config.server.data_dir.clone()),
    };
    into_database(from, &config, args.json)
}

/// Copies `from` into the configured database, verified, and reports
/// (`json`: as JSON). `confab restore` into a database comes here too.
pub(super) fn into_database(from: Input, config: &confab::config::Config, json: bool) -> ExitCode {
    let from_what = match &from {
        Input::DataDir(_) => "the node had",
        Input::Backup(_) => "the backup holds",
    };
    let opts = Options {
        from,
        database_url: config.store.database_url.clone(),
        configured_secret: config.auth.jwt_secret.clone(),
    };
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
    let mut stage = "";
    let mut drawing = false;
    let mut drawn = None;
    let result = migrate::run(&opts, &mut |p: Progress| {
        if p.stage != stage {
            if drawing {
                eprintln!();
                drawing = false;
            }
            stage = p.stage;
            if p.stage == "verifying" || p.stage == "reading the source" {
                eprintln!("{}", p.stage);
                return;
            }
        }
        let finished = p.done >= p.total && drawn != Some(p.done);
        let bar = p.stage == "copying" || p.stage == "restoring the backup";
        if bar && (last.elapsed().as_millis() >= 100 || finished) {
            last = std::time::Instant::now();
            drawn = Some(p.done);
            drawing = true;
            progress_bar(p.stage, p.done, p.total, "");
        }
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confab: migrate: {e}");
            if !e.changed {
                eprintln!("nothing was changed in the database");
            }
            return ExitCode::from(2);
        }
    };
    if json {
        print_json(&report);
    } else {
        print_report(&report, from_what);
    }
    if report.damaged_total > 0 {
        eprintln!(
            "warning: the source has {} damaged record(s), which are NOT in the database (see `damaged`; `confab check` on the source names all of them)",
            report.damaged_total
        );
    }
    if report.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The report for people; `from_what`: what the source is ("the node
/// had", "the backup holds").
fn print_report(r: &Report, from_what: &str) {
    let inserted: u64 = r.inserted.values().sum();
    println!(
        "migrated {} (source {}, by its {}) into {} in {:.2} s",
        r.source, r.source_id, r.source_id_from, r.database, r.seconds
    );
    if r.changed {
        println!(
            "copied {inserted} rows, {} of them messages, in {:.2} s ({:.0} messages/s){}",
            r.messages_copied,
            r.copy_seconds,
            r.messages_per_second,
            if r.resumed {
                " — resuming an earlier run of this migration"
            } else {
                ""
            }
        );
    } else {
        println!("nothing changed: the database already held all of it");
    }
    println!("{:<18} {:>12} {:>12}", "", "source", "database");
    for (name, c) in &r.compared {
        let mark = if c.source == c.database { "" } else { "  ≠" };
        println!("{name:<18} {:>12} {:>12}{mark}", c.source, c.database);
    }
    println!(
        "compared every room's last seq and message count ({} rooms) and every balance ({} accounts); the database's ledger check: {}",
        r.rooms_checked,
        r.accounts_checked,
        if r.ledger.breaches.is_empty() {
            "clean"
        } else {
            "breaches (below)"
        }
    );
    if r.lost_messages > 0 {
        println!(
            "lost: {} message(s) were placeholders for messages lost to earlier damage, and are not copied",
            r.lost_messages
        );
    }
    for f in &r.damaged {
        println!("damaged (not copied): {}", f.line());
    }
    for m in &r.mismatches {
        println!("mismatch: {m}");
    }
    if r.verified {
        println!(
            "result: verified — the database holds everything {from_what}; start the cluster's nodes on it"
        );
        println!(
            "note: users stay logged in and see the same transfer ids only if the cluster signs with the node's secret (cluster_secret = the node's jwt_secret; docs/SCALEOUT.md)"
        );
    } else {
        println!(
            "result: {} difference(s) between the source and the database; do not start the cluster on it",
            r.mismatches.len()
        );
    }
}
