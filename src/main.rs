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
    }
}

fn run_serve(args: ServeArgs) -> ExitCode {
    let config = match args
        .overrides()
        .and_then(|ov| config::Config::load(&ov).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("confab: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.server.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confab: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::serve(config, handle)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab: {e}");
            ExitCode::FAILURE
        }
    }
}
