//! confab: a self-hosted chat appliance in one binary.
//!
//! `main` parses the command line, builds the configuration (see
//! [`config`]), sets up logging and metrics and runs the chosen subcommand.
//! Everything else lives in the library crate (`src/lib.rs`).

use confab::{bench, config, server, telemetry};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "confab",
    version,
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
    /// Load-test a running server: the seed's stepped test (`--steps seed`),
    /// a single step (`--users N --rate R`), or idle connections (`--idle N`).
    Bench(bench::BenchArgs),
    /// Rebuild the message search index from the store (the server must
    /// not be running on this data directory).
    Reindex(ServeArgs),
    /// Wallet administration: `credit USER AMOUNT`, `verify`. Talks to the
    /// running server through its admin socket, or opens the store itself.
    Wallet(WalletArgs),
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
        user: String,
        amount: u64,
        #[command(flatten)]
        common: ServeArgs,
    },
    /// Check the ledger invariants; exits 1 on any breach.
    Verify {
        #[command(flatten)]
        common: ServeArgs,
    },
}

#[derive(Args, Default)]
struct ServeArgs {
    /// Config file (default: ./config.toml if present, else the built-in defaults).
    #[arg(long, env = "CONFAB_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (env CONFAB_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (env CONFAB_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Any config option, as option=value (repeatable), e.g. --set send_burst=200.
    #[arg(long = "set", value_name = "OPTION=VALUE")]
    set: Vec<String>,
}

impl ServeArgs {
    fn overrides(&self) -> Result<config::Overrides, String> {
        let mut cli = Vec::new();
        for s in &self.set {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set expects option=value, got `{s}`"))?;
            cli.push((k.trim().to_string(), v.to_string()));
        }
        if let Some(l) = &self.listen {
            cli.push(("listen".into(), l.clone()));
        }
        if let Some(d) = &self.data_dir {
            cli.push(("data_dir".into(), d.display().to_string()));
        }
        Ok(config::Overrides {
            file: self.config.clone(),
            env: std::env::vars().collect(),
            cli,
        })
    }
}

fn main() -> ExitCode {
    telemetry::tune_allocator();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    match command {
        Command::Serve(args) => run_serve(args),
        Command::Bench(args) => bench::run(args),
        Command::Reindex(args) => run_reindex(args),
        Command::Wallet(args) => run_wallet(args),
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("confab: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

fn load_config(args: &ServeArgs) -> Result<config::Config, ExitCode> {
    args.overrides()
        .and_then(|ov| config::Config::load(&ov).map_err(|e| e.to_string()))
        .map_err(|e| {
            eprintln!("confab: {e}");
            ExitCode::from(2)
        })
}

/// `confab wallet credit|verify`.
fn run_wallet(args: WalletArgs) -> ExitCode {
    let (common, req) = match &args.action {
        WalletAction::Credit {
            user,
            amount,
            common,
        } => (
            common,
            serde_json::json!({"cmd": "credit", "user": user, "amount": amount}),
        ),
        WalletAction::Verify { common } => (common, serde_json::json!({"cmd": "verify"})),
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
        if let Some(answer) = confab::admin::request(&dir, &req).await {
            return answer;
        }
        // No server: open the store and run the command here.
        let store = confab::store::Store::open_with_cache(&dir, config.store.cache_mb << 20)?;
        let wiring = confab::store::writer::WalletWiring {
            settings: confab::wallet::WalletSettings {
                currency: config.wallet.wallet_currency.clone(),
                signup_bonus: config.wallet.signup_bonus,
            },
            ..Default::default()
        };
        let (writer, join) = confab::store::writer::GroupCommitWriter::spawn_with(
            store.clone(),
            std::sync::Arc::new(confab::hub::Hub::default()),
            config.store.clone(),
            config.limits.max_group_members,
            wiring,
        )
        .map_err(|e| e.to_string())?;
        let answer = confab::admin::handle(&store, &writer, &req).await;
        let _ = writer.submit(confab::store::writer::Op::Stop).await;
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
fn run_reindex(args: ServeArgs) -> ExitCode {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = &config.server.data_dir;
    let result = (|| -> Result<u64, String> {
        let store = confab::store::Store::open_with_cache(dir, config.store.cache_mb << 20)
            .map_err(|e| format!("{e} (is a server running on this data directory?)"))?;
        confab::search::SearchIndex::remove(dir)?;
        let total = store.feed.committed();
        let index = std::sync::Arc::new(confab::search::SearchIndex::open(dir, total)?);
        let indexer =
            confab::search::Indexer::new(index, store, std::time::Duration::from_secs(5))?;
        let started = std::time::Instant::now();
        let mut last = std::time::Instant::now() - std::time::Duration::from_secs(1);
        let n = indexer.catch_up(|done, total| {
            if last.elapsed().as_millis() >= 200 || done == total {
                last = std::time::Instant::now();
                let pct = if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                };
                let width = 30usize;
                let filled = ((pct / 100.0) * width as f64) as usize;
                eprint!(
                    "\rindexing [{}{}] {done}/{total} messages ({pct:.0}%)",
                    "#".repeat(filled),
                    " ".repeat(width - filled.min(width))
                );
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

fn run_serve(args: ServeArgs) -> ExitCode {
    let config = match load_config(&args) {
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
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(server::serve(config, handle)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: {e}");
            ExitCode::FAILURE
        }
    }
}
