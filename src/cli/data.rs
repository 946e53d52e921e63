//! The commands on a store's data: `confab backup` and `confab restore`,
//! `confab export` of a user or a room, and `confab check` — each through
//! the running server's admin socket when there is one, else on the file
//! itself.

use confab::admin::AdminError;
use confab::backup;

use std::process::ExitCode;

use super::output::{mb, not_accepting_or, print_json, progress_bar};
use crate::{BackupArgs, CheckArgs, ExportArgs, RestoreArgs, load_config, runtime};

/// `confab backup --to FILE`.
pub(crate) fn run_backup(args: BackupArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let to = match std::path::absolute(&args.to) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("confab: bad backup path {}: {e}", args.to.display());
            return ExitCode::from(2);
        }
    };
    if to.exists() && !args.force {
        eprintln!(
            "confab: {} exists; choose another name or pass --force to replace it",
            to.display()
        );
        return ExitCode::FAILURE;
    }
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let dir = config.server.data_dir.clone();
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
    // Whether a progress bar was drawn (and its line needs ending).
    let drew = std::cell::Cell::new(false);
    let mut show = |p: backup::Progress| {
        if last.elapsed().as_millis() >= 100 || p.messages == p.total_messages {
            last = std::time::Instant::now();
            drew.set(true);
            progress_bar(
                "backing up",
                p.messages,
                p.total_messages,
                &format!(", {}", mb(p.bytes)),
            )
        }
    };
    let url = config.store.database_url.clone();
    if !url.is_empty() {
        // A cluster's data is its database's, not a node's: read from it
        // directly, whether or not any node runs.
        let secret = backup::secret_file(&dir);
        let result = backup::from_postgres(&url, secret.as_deref(), &to, &mut show)
            .and_then(|s| serde_json::to_value(s).map_err(|e| e.to_string()));
        if drew.get() {
            eprintln!();
        }
        return backed_up(result, &to, " from the database");
    }
    let req = serde_json::json!({"cmd": "backup", "to": to, "skip_damaged": args.skip_damaged});
    let on_damage = if args.skip_damaged {
        backup::OnDamage::Skip
    } else {
        backup::OnDamage::Refuse
    };
    let wait = std::time::Duration::from_secs(args.timeout);
    let online = runtime.block_on(confab::admin::request(&dir, &req, wait, |p| {
        if let Ok(p) = serde_json::from_value::<backup::Progress>(p.clone()) {
            show(p);
        }
    }));
    let by_server = online.is_some();
    let result = match online {
        Some(Ok(answer)) => match answer["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => serde_json::from_value::<serde_json::Value>(answer["backup"].clone())
                .map_err(|e| e.to_string()),
        },
        Some(Err(AdminError::Silent(t))) => Err(format!(
            "the server reported no progress for {} s, so this command gave up (the server cancels the backup); is it overloaded or its disk stuck? see its log (--timeout SECS waits longer)",
            t.as_secs()
        )),
        Some(Err(e)) => Err(not_accepting_or(e)),
        None => backup::offline(&dir, &to, on_damage, &mut show)
            .and_then(|s| serde_json::to_value(s).map_err(|e| e.to_string())),
    };
    if drew.get() {
        eprintln!();
    }
    backed_up(
        result,
        &to,
        if by_server {
            " by the running server"
        } else {
            ""
        },
    )
}

/// Says how a backup went (`how`: by whom, for the message).
fn backed_up(
    result: Result<serde_json::Value, String>,
    to: &std::path::Path,
    how: &str,
) -> ExitCode {
    match result {
        Ok(summary) => {
            let secs = summary["seconds"].as_f64().unwrap_or(0.0).max(1e-9);
            let messages = summary["messages"].as_u64().unwrap_or(0);
            let bytes = summary["bytes"].as_u64().unwrap_or(0);
            let damaged = summary["damaged_total"].as_u64().unwrap_or(0);
            if damaged > 0 {
                eprintln!(
                    "warning: the store is damaged: {damaged} damaged record(s) or page(s) were skipped and are NOT in this backup (damaged messages are kept as unreadable placeholders):"
                );
                for f in summary["damaged"].as_array().into_iter().flatten() {
                    if let Ok(f) =
                        serde_json::from_value::<confab::store::integrity::Finding>(f.clone())
                    {
                        eprintln!("  {}", f.line());
                    }
                }
            }
            eprintln!(
                "backup written to {}: {messages} messages, {} in {secs:.2} s ({:.0} messages/s, {:.1} MB/s){}",
                to.display(),
                mb(bytes),
                messages as f64 / secs,
                bytes as f64 / 1e6 / secs,
                how
            );
            print_json(&summary);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("confab: backup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `confab restore --from FILE --data-dir DIR [--force]`.
pub(crate) fn run_restore(args: RestoreArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !config.store.database_url.is_empty() {
        // Into a cluster's database: what `confab migrate --from-backup`
        // does — verified, refused unless the database is empty (or holds
        // this same restore, cut short: then it resumes).
        return super::migrate::into_database(
            confab::migrate::Input::Backup(args.from.clone()),
            &config,
            false,
        );
    }
    let dir = config.server.data_dir.clone();
    let mut last = std::time::Instant::now();
    let mut stage = String::new();
    let result = backup::restore(&args.from, &dir, args.force, &mut |s, p| {
        if s != stage {
            if !stage.is_empty() {
                eprintln!();
            }
            stage = s.to_string();
        }
        if last.elapsed().as_millis() >= 200 {
            last = std::time::Instant::now();
            progress_bar(
                s,
                p.messages,
                p.total_messages,
                &format!(", {}", mb(p.bytes)),
            );
        }
    });
    eprintln!();
    match result {
        Ok(r) => {
            let secs = r.seconds.max(1e-9);
            eprintln!(
                "restored {} messages ({}) into {} in {secs:.2} s ({:.0} messages/s)",
                r.contents.messages,
                mb(r.contents.bytes),
                dir.display(),
                r.contents.messages as f64 / secs
            );
            match &r.wallet {
                Some(v) => eprintln!(
                    "ledger verified: {} accounts, {} transfers, every invariant holds",
                    v.accounts, v.transfers
                ),
                None => eprintln!(
                    "the backup holds schema {}; the server migrates it on its first start",
                    r.contents.schema_version
                ),
            }
            if r.contents.damaged > 0 {
                eprintln!(
                    "warning: this backup was taken with --skip-damaged: {} damaged record(s) of the original store are not in it (tables: {})",
                    r.contents.damaged,
                    r.contents.damaged_tables.join(", ")
                );
            }
            if let Some(v) = r.wallet.as_ref().filter(|v| !v.breaches.is_empty()) {
                eprintln!(
                    "warning: the ledger is incomplete (records were left out of the backup): {}",
                    v.breaches.join("; ")
                );
            }
            if !r.secret_restored {
                eprintln!(
                    "the backup has no jwt_secret (it was configured): keep the same `jwt_secret` in the config for old tokens to stay valid"
                );
            }
            eprintln!("the search index rebuilds itself when the server starts");
            print_json(&r);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("confab: restore refused: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Transfer ids for an export made without the server: under the key the
/// server uses (its token secret), so that they match the API's, and with
/// its currency. With no
/// secret at all, no server has shown an id yet (it would create the file
/// first); the export then uses a one-off key and says so.
pub(super) fn export_transfer_ids(
    config: &confab::config::Config,
) -> Result<confab::wallet::TransferIds, String> {
    let mut auth = config.auth.clone();
    auth.jwt_secret = config.token_secret().to_string();
    let ids = match confab::auth::existing_secret(&auth, &config.server.data_dir)? {
        Some(secret) => confab::wallet::TransferIds::new(&secret),
        None => {
            eprintln!(
                "confab: no token secret in the config or the data directory: transfer ids in this export are not the ones a server would show"
            );
            confab::wallet::TransferIds::new(&rand::random::<[u8; 32]>())
        }
    };
    Ok(ids.with_currency(&config.wallet.wallet_currency))
}

/// `confab export --user NAME | --room ID [--out FILE]`.
pub(crate) fn run_export(args: ExportArgs) -> ExitCode {
    use std::io::Write;
    let config = match load_config(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let dir = config.server.data_dir.clone();
    let req = match (&args.user, &args.room) {
        (Some(u), _) => serde_json::json!({"cmd": "export", "user": u}),
        (_, Some(r)) => serde_json::json!({"cmd": "export", "room": r}),
        _ => return ExitCode::from(2),
    };
    let mut out: Box<dyn Write + Send> = match &args.out {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
            {
                Ok(f) => Box::new(std::io::BufWriter::with_capacity(1 << 20, f)),
                Err(e) => {
                    eprintln!("confab: cannot create {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        None => Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )),
    };
    let wait = std::time::Duration::from_secs(args.timeout);
    let online = runtime.block_on(confab::admin::export_to(&dir, &req, wait, &mut out));
    let result = match online {
        Some(Ok(())) => Ok(()),
        Some(Err(AdminError::Silent(t))) => Err(format!(
            "the server sent no data for {} s, so this command gave up and the output is incomplete; is it overloaded? see its log (--timeout SECS waits longer)",
            t.as_secs()
        )),
        Some(Err(e)) => Err(not_accepting_or(e)),
        None => (|| {
            let reader = backup::open_reader(&dir)?;
            let txn = reader.begin_read()?;
            let scope = confab::export::scope_of(&req).map_err(|e| e.message)?;
            let ids = export_transfer_ids(&config)?;
            // The damage this export meets, each record reported once.
            let damage = std::sync::Arc::new(confab::store::seal::DamageLog::default());
            damage
                .scope(|| {
                    confab::store::guard("the export", || {
                        confab::export::write(&txn, scope, &ids, &mut out)
                    })
                })
                .map(drop)
                .map_err(|e| e.message)
        })(),
    };
    let result = result.and_then(|_| out.flush().map_err(|e| e.to_string()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: export failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `confab check`: through the running server's admin socket, else on the
/// file itself (read-only; redb's page checksums too).
pub(crate) fn run_check(args: CheckArgs) -> ExitCode {
    use confab::store::integrity::{self, Report};
    let config = match load_config(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let dir = config.server.data_dir.clone();
    let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
    let mut show = move |p: integrity::Progress| {
        if last.elapsed().as_millis() >= 100 || p.messages >= p.total_messages {
            last = std::time::Instant::now();
            progress_bar("checking", p.messages, p.total_messages, "");
        }
    };
    let req = serde_json::json!({"cmd": "check"});
    let wait = std::time::Duration::from_secs(args.timeout);
    let online = runtime.block_on(confab::admin::request(&dir, &req, wait, |p| {
        if let Ok(p) = serde_json::from_value::<integrity::Progress>(p.clone()) {
            show(p);
        }
    }));
    let by_server = online.is_some();
    let result: Result<Report, String> = match online {
        Some(Ok(answer)) => match answer["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => serde_json::from_value(answer["report"].clone()).map_err(|e| e.to_string()),
        },
        Some(Err(AdminError::Silent(t))) => Err(format!(
            "the running server reported no progress for {} s, so this command gave up; is it overloaded or its disk stuck? see its log (--timeout SECS waits longer)",
            t.as_secs()
        )),
        Some(Err(e)) => Err(not_accepting_or(e)),
        None => integrity::check_offline(&dir, &confab::storage::embedded::ledger_check, &mut show),
    };
    eprintln!();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confab: the check could not run: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        print_json(&report);
    } else {
        let records: u64 = report.tables.values().sum();
        println!(
            "checked {} (schema {}{}): {} rooms, {} messages, {records} records in {} tables, {:.2} s",
            dir.join("confab.redb").display(),
            report.schema_version,
            if by_server {
                ", through the running server"
            } else {
                ""
            },
            report.rooms,
            report.messages,
            report.tables.len(),
            report.seconds
        );
        println!("engine: {}", report.engine);
        if report.lost > 0 {
            println!(
                "lost: {} message(s) are placeholders for messages lost to earlier damage (from a --skip-damaged backup)",
                report.lost
            );
        }
        for f in &report.damage {
            println!("damage: {}", f.line());
        }
        if report.damage_total > report.damage.len() as u64 {
            println!(
                "damage: … and {} more",
                report.damage_total - report.damage.len() as u64
            );
        }
        if report.clean() {
            println!("result: clean");
        } else {
            println!(
                "result: {} problem(s) found; restore a backup taken before the damage, or `confab backup --skip-damaged` to save what can be read",
                report.damage_total
            );
        }
    }
    if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
