//! confab: a self-hosted chat appliance in one binary.
//!
//! `main` parses the command line, builds the configuration (see
//! [`config`]), sets up logging and metrics and runs the chosen subcommand.
//! Everything else lives in the library crate (`src/lib.rs`).

use confab::admin::AdminError;
use confab::{backup, bench, config, server, telemetry};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "confab",
    version = telemetry::VERSION,
    about = "A self-hosted chat appliance: one binary, durable real-time messaging."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the chat server (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Run a cluster proxy: serves the UI, the API and WebSockets and sends
    /// each operation to the node that owns it (`[cluster]` in the config).
    Proxy(ProxyArgs),
    /// Load-test a running server: the seed's stepped test (`--steps seed`),
    /// a single step (`--users N --rate R`), or idle connections (`--idle N`).
    Bench(bench::BenchArgs),
    /// Rebuild the message search index from the store (the server must
    /// not be running on this data directory).
    Reindex(StoreArgs),
    /// Wallet administration: `credit USER AMOUNT`, `verify`. Talks to the
    /// running server through its admin socket, or opens the store itself.
    Wallet(WalletArgs),
    /// Write a consistent backup of the whole store (not the search index)
    /// to FILE, through the running server's admin socket or, when none
    /// runs, straight from the store.
    Backup(BackupArgs),
    /// Restore a backup into a data directory (empty unless --force); the
    /// file is fully verified before anything is written.
    Restore(RestoreArgs),
    /// Export a user's data (--user) or a room (--room) as JSON Lines.
    Export(ExportArgs),
    /// Verify the whole store: every record's checksum, every page, every
    /// room's seq chain, the ledger (and, with the server stopped, redb's
    /// page checksums). Exit 0: clean; 1: damage found (named on stdout);
    /// 2: the check could not run.
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// Print the report as JSON instead of lines.
    #[arg(long)]
    json: bool,
    /// Give up when the running server has reported no progress for SECS
    /// seconds; no limit on the whole check.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = secs())]
    timeout: u64,
    #[command(flatten)]
    common: StoreArgs,
}

#[derive(Args)]
struct BackupArgs {
    /// The backup file to write (replaced only with --force).
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
    /// Overwrite FILE if it exists.
    #[arg(long)]
    force: bool,
    /// Give up when the running server has reported no progress for SECS
    /// seconds (it then cancels the backup); no limit on the whole backup.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = secs())]
    timeout: u64,
    /// Write what can be read of a damaged store: damaged records are left
    /// out (a damaged message as a placeholder that reads "unreadable"),
    /// and counted and named in the summary. Without it a damaged store is
    /// not backed up at all.
    #[arg(long)]
    skip_damaged: bool,
    #[command(flatten)]
    common: StoreArgs,
}

/// Seconds, at least 1.
fn secs() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..)
}

#[derive(Args)]
struct RestoreArgs {
    /// The backup file to restore.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// Replace the store in a non-empty data directory.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: StoreArgs,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["user", "room"])))]
struct ExportArgs {
    /// Export this user's profile, contacts, rooms, messages and wallet.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Export this room and all its messages.
    #[arg(long, value_name = "ID")]
    room: Option<String>,
    /// Write to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Give up when the running server has sent no data for SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = secs())]
    timeout: u64,
    #[command(flatten)]
    common: StoreArgs,
}

#[derive(Args)]
struct WalletArgs {
    #[command(subcommand)]
    action: WalletAction,
}

#[derive(Subcommand)]
enum WalletAction {
    /// Add AMOUNT (minor units) to USER's balance: the only way money enters.
    Credit {
        /// The username of the account to credit (any case).
        user: String,
        /// How much, in minor units of `wallet_currency` (for KRW, won:
        /// 50000 is ₩50,000); at most the balance limit, 10^15.
        amount: u64,
        /// Give up when the running server has not answered within SECS
        /// seconds (the credit is then unconfirmed).
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = secs())]
        timeout: u64,
        #[command(flatten)]
        common: StoreArgs,
    },
    /// Check the ledger invariants; exits 1 on any breach.
    Verify {
        /// Give up when the running server has not answered within SECS seconds.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = secs())]
        timeout: u64,
        #[command(flatten)]
        common: StoreArgs,
    },
}

/// The options every subcommand that reads the configuration takes.
#[derive(Args, Default)]
struct ConfigArgs {
    /// Config file (default: ./config.toml if present, else the built-in defaults).
    #[arg(long, env = "CONFAB_CONFIG", hide_env_values = true)]
    config: Option<PathBuf>,
    /// Any config option, as option=value (repeatable), e.g. --set send_burst=200.
    #[arg(long = "set", value_name = "OPTION=VALUE")]
    set: Vec<String>,
}

/// The options of the subcommands that work on a data directory.
#[derive(Args, Default)]
struct StoreArgs {
    /// Data directory (env CONFAB_DATA_DIR; default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
}

/// `confab serve`: a data directory and an address to listen on.
#[derive(Args, Default)]
struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080 (env CONFAB_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// In a cluster: this node's id from `cluster_nodes` (listens on its address).
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

/// `confab proxy`: an address to listen on; it keeps no data.
#[derive(Args, Default)]
struct ProxyArgs {
    /// Address to listen on, e.g. 0.0.0.0:8080 (env CONFAB_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

impl ConfigArgs {
    /// The configuration layers: this file, the environment, then `--set`
    /// and the subcommand's own flags (`flags`, applied last).
    fn overrides(&self, flags: Vec<(String, String)>) -> Result<config::Overrides, String> {
        let mut cli = Vec::new();
        for s in &self.set {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set expects option=value, got `{s}`"))?;
            cli.push((k.trim().to_string(), v.to_string()));
        }
        cli.extend(flags);
        Ok(config::Overrides {
            file: self.config.clone(),
            env: std::env::vars().collect(),
            cli,
        })
    }
}

/// A subcommand's arguments as configuration layers.
trait ConfigLayers {
    fn overrides(&self) -> Result<config::Overrides, String>;
}

impl ConfigLayers for StoreArgs {
    fn overrides(&self) -> Result<config::Overrides, String> {
        let flags = self
            .data_dir
            .iter()
            .map(|d| ("data_dir".to_string(), d.display().to_string()))
            .collect();
        self.config.overrides(flags)
    }
}

impl ConfigLayers for ServeArgs {
    fn overrides(&self) -> Result<config::Overrides, String> {
        let mut ov = self.store.overrides()?;
        if let Some(l) = &self.listen {
            ov.cli.push(("listen".into(), l.clone()));
        }
        if let Some(n) = &self.node {
            ov.cli.push(("node".into(), n.clone()));
        }
        Ok(ov)
    }
}

impl ConfigLayers for ProxyArgs {
    fn overrides(&self) -> Result<config::Overrides, String> {
        let flags = self
            .listen
            .iter()
            .map(|l| ("listen".to_string(), l.clone()))
            .collect();
        self.config.overrides(flags)
    }
}

fn main() -> ExitCode {
    // Everything confab creates (the store, the index, backups, exports,
    // the admin socket) is for its own user only: messages and password
    // hashes are not for other local accounts to read.
    // SAFETY: umask(2) only sets the process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    telemetry::tune_allocator();
    abort_if_the_writer_panics();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    match command {
        Command::Serve(args) => run_serve(&args, false),
        Command::Proxy(args) => run_serve(&args, true),
        Command::Bench(args) => bench::run(args),
        Command::Reindex(args) => run_reindex(args),
        Command::Wallet(args) => run_wallet(args),
        Command::Backup(args) => run_backup(args),
        Command::Restore(args) => run_restore(args),
        Command::Export(args) => run_export(args),
        Command::Check(args) => run_check(args),
    }
}

/// A panic unwinds only its own task or request (the release profile keeps
/// `panic = "unwind"`; one in a guarded store read is logged by its
/// guard, see `store::guard`), except on the store writer thread: without it the
/// server could not store anything, so the process aborts and its
/// supervisor restarts it (everything acked is already durable).
fn abort_if_the_writer_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // A read of a damaged store page, caught where it was made (it
        // becomes a `storage_damaged` answer and one log line there).
        if confab::store::in_guarded_read() {
            let at = info
                .location()
                .map(|l| format!("{}:{}: ", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            confab::store::note_panic(format!("{at}{msg}"));
            return;
        }
        default(info);
        if std::thread::current().name() == Some("confab-writer") {
            eprintln!(
                "confab: the store writer panicked; aborting so that the server is restarted"
            );
            std::process::abort();
        }
    }));
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("confab: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn load_config(args: &impl ConfigLayers) -> Result<config::Config, ExitCode> {
    args.overrides()
        .and_then(|ov| config::Config::load(&ov).map_err(|e| e.to_string()))
        .map_err(|e| {
            eprintln!("confab: {e}");
            ExitCode::from(2)
        })
}

/// `confab wallet credit|verify`.
fn run_wallet(args: WalletArgs) -> ExitCode {
    let (common, req, timeout) = match &args.action {
        WalletAction::Credit {
            user,
            amount,
            timeout,
            common,
        } => (
            common,
            serde_json::json!({"cmd": "credit", "user": user, "amount": amount}),
            *timeout,
        ),
        WalletAction::Verify { timeout, common } => {
            (common, serde_json::json!({"cmd": "verify"}), *timeout)
        }
    };
    let config = match load_config(common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let dir = config.server.data_dir.clone();
    let answer = runtime.block_on(async {
        let wait = std::time::Duration::from_secs(timeout);
        if let Some(answer) = confab::admin::request(&dir, &req, wait, |_| {}).await {
            return answer.map_err(|e| match e {
                AdminError::Silent(_) => {
                    let unconfirmed = match req["user"].as_str() {
                        Some(user) => format!(
                            "; the credit is unconfirmed: check {user}'s balance before crediting again"
                        ),
                        None => String::new(),
                    };
                    format!(
                        "the server did not answer within {timeout} s; is it overloaded? see its log (--timeout SECS waits longer){unconfirmed}"
                    )
                }
                e => not_accepting_or(e),
            });
        }
        // No server: open the store and run the command here.
        let store = confab::store::Store::open_with(
            &dir,
            config.store.cache_mb << 20,
            Some(&backup::before_migration(&dir)),
        )?;
        let wiring = confab::writes::WalletWiring {
            settings: confab::wallet::WalletSettings {
                currency: config.wallet.wallet_currency.clone(),
                signup_bonus: config.wallet.signup_bonus,
                max_scheduled: config.wallet.max_scheduled_transfers,
            },
            ..Default::default()
        };
        let (writer, join) = confab::writes::GroupCommitWriter::spawn_with(
            store.clone(),
            std::sync::Arc::new(confab::hub::Hub::default()),
            Default::default(),
            config.store.clone(),
            config.limits.max_group_members,
            wiring,
        )
        .map_err(|e| e.to_string())?;
        let answer = confab::admin::handle(&store, &writer, &req).await;
        let _ = writer.submit(confab::writes::Op::Stop).await;
        drop(writer);
        let _ = join.join();
        Ok::<_, String>(answer)
    });
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("confab: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    if let Some(e) = answer["error"].as_str() {
        eprintln!("confab: {e}");
        return ExitCode::FAILURE;
    }
    match answer["breaches"].as_array() {
        Some(b) if !b.is_empty() => {
            eprintln!("confab: the ledger has {} breach(es)", b.len());
            ExitCode::FAILURE
        }
        Some(_) => {
            eprintln!("ledger verified: every invariant holds");
            ExitCode::SUCCESS
        }
        None => ExitCode::SUCCESS,
    }
}

/// `confab reindex`: drop the search index and index every stored message,
/// with a progress line on stderr.
fn run_reindex(args: StoreArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = &config.server.data_dir;
    let result = (|| -> Result<u64, String> {
        let store = confab::store::Store::open_with(
            dir,
            config.store.cache_mb << 20,
            Some(&backup::before_migration(dir)),
        )
        .map_err(|e| format!("{e} (is a server running on this data directory?)"))?;
        confab::search::SearchIndex::remove(dir)?;
        let total = store.feed.committed();
        let index = std::sync::Arc::new(confab::search::SearchIndex::open(dir, total)?);
        let indexer = confab::search::Indexer::new(index, store, std::time::Duration::from_secs(5));
        let started = std::time::Instant::now();
        let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
        let n = indexer.catch_up(|done, total| {
            if last.elapsed().as_millis() >= 200 || done == total {
                last = std::time::Instant::now();
                progress_bar("indexing", done, total, "");
            }
        })?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!();
        eprintln!(
            "indexed {n} messages in {secs:.1} s ({:.0} messages/s)",
            n as f64 / secs.max(1e-9)
        );
        Ok(n)
    })();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: &impl ConfigLayers, proxy: bool) -> ExitCode {
    let config = match load_config(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.server.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.server.log_format == "json" {
        logs.json().with_current_span(true).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let handle = match telemetry::install() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("confab: cannot set up metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let builder = match config.cluster.proxy_threads {
        1 if proxy => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if proxy && n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = match runtime(builder) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let run = async {
        if proxy {
            confab::proxy::serve(config, handle).await
        } else {
            server::serve(config, handle).await
        }
    };
    let result = runtime.block_on(run);
    // Threads of the blocking pool still waiting (on a storage that does
    // not answer) do not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One `\r`-refreshed progress line on stderr.
fn progress_bar(label: &str, done: u64, total: u64, extra: &str) {
    let pct = if total == 0 {
        100.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0)
    };
    let width = 30usize;
    let filled = ((pct / 100.0) * width as f64) as usize;
    eprint!(
        "\r{label} [{}{}] {done}/{total} messages ({pct:.0}%){extra}   ",
        "#".repeat(filled),
        " ".repeat(width - filled.min(width))
    );
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// The line for an admin socket failure other than a silent server (which
/// each command words for itself).
fn not_accepting_or(e: AdminError) -> String {
    match e {
        AdminError::NotAccepting(t) => format!(
            "the server accepted no connection on its admin socket within {} s (nothing was sent to it); is it out of file descriptors or stopped? see its log",
            t.as_secs()
        ),
        e => e.to_string(),
    }
}

/// `confab backup --to FILE`.
fn run_backup(args: BackupArgs) -> ExitCode {
    let config = match load_config(&args.common) {
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
                if by_server {
                    " by the running server"
                } else {
                    ""
                }
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
fn run_restore(args: RestoreArgs) -> ExitCode {
    let config = match load_config(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
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
fn export_transfer_ids(
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
fn run_export(args: ExportArgs) -> ExitCode {
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
fn run_check(args: CheckArgs) -> ExitCode {
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
        None => integrity::check_offline(&dir, &confab::wallet::ledger_check, &mut show),
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
