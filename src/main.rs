//! confab: a self-hosted chat appliance in one binary.
//!
//! `main` parses the command line, builds the configuration (see
//! [`config`]), sets up logging and metrics and runs the chosen subcommand.
//! Everything else lives in the library crate (`src/lib.rs`).

mod cli;

use confab::{bench, config, telemetry};

use cli::data::{run_backup, run_check, run_export, run_restore};
use cli::migrate::run_migrate;
use cli::server::{run_reindex, run_serve};
use cli::wallet::run_wallet;

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
    /// Move a stopped single node's data (or a backup file) into a
    /// cluster's PostgreSQL database, verified; safe to run again.
    ///
    /// Copies --data-dir (or --from-backup FILE) into --database-url, then
    /// verifies the database against the source: rows per table, every
    /// room's last seq and message count, every balance, the ledger. Into
    /// an empty database only, or one holding its own earlier run of the
    /// same source, which it resumes (a re-run changes nothing). Exit 0:
    /// verified; 1: differences found (named); 2: did not run or stopped.
    Migrate(MigrateArgs),
}

#[derive(Args)]
struct MigrateArgs {
    /// The cluster's database: a PostgreSQL URL or libpq connection string
    /// (default: `database_url` from the config).
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Migrate this backup file (`confab backup`) instead of a data
    /// directory; it is verified and restored into a scratch directory
    /// under the temp dir first.
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    from_backup: Option<PathBuf>,
    /// Print the report as JSON instead of lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: StoreArgs,
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
    /// Back up this PostgreSQL database (a cluster's; default:
    /// `database_url` from the config) instead of the data directory.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
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
    /// Restore into this PostgreSQL database (a cluster's, empty; default:
    /// `database_url` from the config) instead of the data directory.
    #[arg(long, value_name = "URL", conflicts_with = "force")]
    database_url: Option<String>,
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

/// A command's store, with its `--database-url` flag.
fn with_database(common: &StoreArgs, url: &Option<String>) -> Result<config::Overrides, String> {
    let mut ov = common.overrides()?;
    if let Some(url) = url {
        ov.cli.push(("database_url".into(), url.clone()));
    }
    Ok(ov)
}

impl ConfigLayers for MigrateArgs {
    fn overrides(&self) -> Result<config::Overrides, String> {
        with_database(&self.common, &self.database_url)
    }
}

impl ConfigLayers for BackupArgs {
    fn overrides(&self) -> Result<config::Overrides, String> {
        with_database(&self.common, &self.database_url)
    }
}

impl ConfigLayers for RestoreArgs {
    fn overrides(&self) -> Result<config::Overrides, String> {
        with_database(&self.common, &self.database_url)
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
        Command::Migrate(args) => run_migrate(args),
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
