//! `confab bench`: the seed project's stepped load test, built in.
//!
//! It drives a real confab (local or remote) over real WebSockets: it seeds
//! users and rooms through the public API, opens one connection per user, and
//! sends **open-loop** at a fixed total rate — each send is due at its
//! scheduled time whatever the replies do, and latency is measured from that
//! scheduled time, so a stalled server cannot hide its stall (no coordinated
//! omission). Every ack and every delivery at every recipient goes into HDR
//! histograms. After each step it checks that every acked message reached
//! every other member's connection and that the history holds it exactly
//! once. `--steps seed` runs the seed matrix; `--idle N` measures memory per
//! idle connection. Results: a terminal table, `--json`, `--html`.
//!
//! The parts, bottom first: `client` (HTTP and WebSockets to the server),
//! `args`, `results` (what is measured), `seed` (users and rooms), `step`
//! and `idle` (the two kinds of run), `report` (their output); this file
//! runs them.

mod args;
pub mod client;
mod idle;
mod report;
mod results;
mod seed;
mod step;

use std::path::PathBuf;
use std::process::ExitCode;

pub use args::BenchArgs;
use client::Target;
use idle::idle;
use seed::Seed;
use step::run_step;

const SEED_USERS: [usize; 5] = [100, 500, 1000, 2500, 5000];
const SEED_RATES: [u64; 5] = [100, 500, 1000, 2500, 5000];

pub fn run(args: BenchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confab bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_async(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("confab bench: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_async(args: BenchArgs) -> Result<bool, String> {
    let (soft, hard) = crate::telemetry::raise_nofile_limit();
    let target = Target::resolve(&args.url, args.source_ips).await?;
    if let Some(n) = args.idle {
        let r = idle(&target, &args, n, (soft, hard)).await?;
        report::print_idle(&r);
        if let Some(path) = &args.json {
            write_file(path, &serde_json::to_string_pretty(&r).unwrap_or_default())?;
        }
        return Ok(r.failed == 0);
    }
    let steps: Vec<(usize, u64)> = match args.steps.as_deref() {
        None => vec![(args.users, args.rate)],
        Some("seed") => SEED_USERS
            .iter()
            .flat_map(|&u| SEED_RATES.iter().map(move |&r| (u, r)))
            .collect(),
        Some(other) => return Err(format!("unknown --steps `{other}` (known: seed)")),
    };
    if args.room_size < 2 {
        return Err("--room-size must be at least 2".into());
    }
    let mut seed = Seed::default();
    let mut results = Vec::new();
    let total = steps.len();
    for (i, &(users, rate)) in steps.iter().enumerate() {
        if users < args.room_size {
            return Err(format!(
                "--users must be at least --room-size ({})",
                args.room_size
            ));
        }
        seed.ensure(&target, &args, users).await?;
        let label = format!("step {}/{total}: {users} users, {rate} msg/s", i + 1);
        let r = run_step(&target, &args, &seed, i, users, rate, &label).await?;
        report::print_step_line(&r);
        results.push(r);
    }
    report::print_table(&results);
    let passed = results.iter().all(|r| r.pass[0]);
    let rep = report::Report {
        url: args.url.clone(),
        started: crate::store::now_ms(),
        duration_secs: args.duration,
        room_size: args.room_size,
        open_files: (soft, hard),
        steps: results,
    };
    if let Some(path) = &args.json {
        write_file(
            path,
            &serde_json::to_string_pretty(&rep).unwrap_or_default(),
        )?;
    }
    if let Some(path) = &args.html {
        write_file(path, &report::html(&rep))?;
    }
    Ok(passed)
}

fn write_file(path: &PathBuf, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
