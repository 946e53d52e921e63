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

pub mod client;
mod report;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use client::{Target, Ws};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The server to drive.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Connected users (one WebSocket each), for a single step.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Total messages per second over all senders, for a single step.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Seconds of sending per step.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Users per room: 2 = direct chats between pairs, more = groups.
    #[arg(long, default_value_t = 2)]
    pub room_size: usize,
    /// `seed`: users 100, 500, 1000, 2500, 5000 × rates 100, 500, 1000, 2500, 5000.
    #[arg(long)]
    pub steps: Option<String>,
    /// Open N idle authenticated connections and report server memory per connection.
    #[arg(long)]
    pub idle: Option<usize>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with charts to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub text_bytes: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1..=N).
    #[arg(long, default_value_t = 16)]
    pub source_ips: u8,
    /// Username prefix for the seeded users.
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Seconds to wait after the last send for outstanding acks and deliveries.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

const SEED_USERS: [usize; 5] = [100, 500, 1000, 2500, 5000];
const SEED_RATES: [u64; 5] = [100, 500, 1000, 2500, 5000];
const PASSWORD: &str = "bench-password-1";
/// Latency tiers of the seed project, in milliseconds.
pub const TIERS_MS: [u64; 2] = [1000, 2000];

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

#[derive(Clone)]
struct BenchUser {
    token: String,
    id: String,
}

/// Users and rooms created so far; steps reuse them and add what is missing.
#[derive(Default)]
struct Seed {
    users: Vec<BenchUser>,
    /// Rooms over consecutive users: room j holds users [j*k, (j+1)*k).
    rooms: Vec<String>,
}

impl Seed {
    async fn ensure(&mut self, target: &Target, args: &BenchArgs, n: usize) -> Result<(), String> {
        if self.users.len() < n {
            let started = Instant::now();
            let from = self.users.len();
            let mut tasks = tokio::task::JoinSet::new();
            let gate = Arc::new(tokio::sync::Semaphore::new(16));
            for i in from..n {
                let (target, gate) = (target.clone(), gate.clone());
                let name = format!("{}{i}", args.prefix);
                tasks.spawn(async move {
                    let _permit = gate.acquire().await;
                    (i, sign_up_or_in(&target, &name).await)
                });
            }
            let mut got: Vec<(usize, BenchUser)> = Vec::new();
            while let Some(r) = tasks.join_next().await {
                let (i, u) = r.map_err(|e| e.to_string())?;
                got.push((i, u?));
            }
            got.sort_by_key(|(i, _)| *i);
            self.users.extend(got.into_iter().map(|(_, u)| u));
            if !args.quiet {
                eprintln!(
                    "seeded users {from}..{n} in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let k = args.room_size;
        for j in self.rooms.len()..n / k {
            let members = &self.users[j * k..(j + 1) * k];
            let body = if k == 2 {
                json!({"kind": "direct", "user_id": members[1].id})
            } else {
                let ids: Vec<&str> = members[1..].iter().map(|m| m.id.as_str()).collect();
                json!({"kind": "group", "name": format!("bench group {j}"), "member_ids": ids})
            };
            let (status, v) = target
                .http(
                    Method::POST,
                    "/api/v1/rooms",
                    Some(&members[0].token),
                    Some(&body),
                )
                .await?;
            let id = v["id"]
                .as_str()
                .filter(|_| status.is_success())
                .ok_or_else(|| format!("creating room {j} failed: {status} {v}"))?;
            self.rooms.push(id.to_string());
        }
        Ok(())
    }
}

async fn sign_up_or_in(target: &Target, name: &str) -> Result<BenchUser, String> {
    let body = json!({"username": name, "password": PASSWORD});
    // The server's admission limits (hashes per address, the hash queue)
    // answer 429/503 when the seeding runs ahead of its password hasher:
    // wait and try again, for up to a minute.
    let mut tries = 0;
    let (status, v) = loop {
        let (status, v) = target
            .http(Method::POST, "/api/v1/signup", None, Some(&body))
            .await?;
        let (status, v) = if status == StatusCode::CONFLICT {
            target
                .http(Method::POST, "/api/v1/login", None, Some(&body))
                .await?
        } else {
            (status, v)
        };
        let busy =
            status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
        tries += 1;
        if !busy || tries >= 600 {
            break (status, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    match (v["token"].as_str(), v["user"]["id"].as_str()) {
        (Some(token), Some(id)) if status.is_success() => Ok(BenchUser {
            token: token.to_string(),
            id: id.to_string(),
        }),
        _ => Err(format!("cannot sign up or log in {name}: {status} {v}")),
    }
}

/// Server figures read from its `/metrics` (the server reads its own /proc).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerSample {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub open_fds: f64,
}

async fn server_sample(target: &Target) -> Option<ServerSample> {
    let text = target.metrics_text().await.ok()?;
    let get = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(ServerSample {
        cpu_seconds: get("confab_process_cpu_seconds_total")?,
        rss_bytes: get("confab_process_resident_memory_bytes")?,
        open_fds: get("confab_process_open_fds").unwrap_or(0.0),
    })
}

/// Latency histograms in microseconds, 1 µs .. 10 min.
fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, sigfig).unwrap_or_else(|_| {
        Histogram::new(sigfig).unwrap_or_else(|_| Histogram::new(2).expect("2 significant figures"))
    })
}

/// What one shard of connections records; shards keep lock contention low.
struct Shard {
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
    /// Per second of the step: delivery latencies (2 significant figures).
    per_sec: Vec<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

const SHARDS: usize = 8;

struct Recorder {
    epoch: Instant,
    shards: Vec<Mutex<Shard>>,
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
}

impl Recorder {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn shard(&self, conn: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[conn % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, conn: usize, what: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.shard(conn).errors.entry(what.to_string()).or_default() += 1;
    }
}

/// What a connection saw, for the loss and history checks.
#[derive(Default)]
struct ConnLog {
    /// (seq, client_id) of this connection's acked sends.
    acked: Vec<(u64, String)>,
    /// seqs of `message` frames received.
    received: Vec<u64>,
    sent: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        count: h.len(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub users: usize,
    pub rate: u64,
    pub duration_secs: f64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    /// Deliveries expected: every acked message at every other member connection.
    pub expected_deliveries: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub error_rate: f64,
    /// Acked messages that did not reach a member connection.
    pub lost: u64,
    /// Acked messages missing from, or duplicated in, the room history.
    pub history_mismatches: u64,
    pub achieved_rate: f64,
    pub ack_ms: Percentiles,
    pub deliver_ms: Percentiles,
    /// (second, p50 ms, p99 ms, max ms, deliveries)
    pub per_second: Vec<(u64, f64, f64, f64, u64)>,
    /// (percentile, ms) of send→deliver.
    pub deliver_curve: Vec<(f64, f64)>,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_mb: Option<f64>,
    pub server_rss_peak_mb: Option<f64>,
    /// Pass at the 1,000 ms and 2,000 ms tiers: no error, nothing lost, and
    /// the slowest delivery within the tier.
    pub pass: [bool; 2],
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    target: &Target,
    args: &BenchArgs,
    seed: &Seed,
    step: usize,
    users: usize,
    rate: u64,
    label: &str,
) -> Result<StepResult, String> {
    let k = args.room_size;
    let n = (users / k) * k;
    // Connect everyone first: the schedule starts when all are in.
    let before = server_sample(target).await;
    let before_at = Instant::now();
    let mut conns: Vec<Option<Ws>> = Vec::with_capacity(n);
    {
        let mut tasks = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        for i in 0..n {
            let (target, gate, token) = (target.clone(), gate.clone(), seed.users[i].token.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire().await;
                let r = tokio::time::timeout(Duration::from_secs(30), target.ws(i, &token)).await;
                (i, r.unwrap_or_else(|_| Err("connect timed out".into())))
            });
        }
        conns.resize_with(n, || None);
        let mut first_err = None;
        while let Some(r) = tasks.join_next().await {
            let (i, ws) = r.map_err(|e| e.to_string())?;
            match ws {
                Ok(ws) => conns[i] = Some(ws),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            let failed = conns.iter().filter(|c| c.is_none()).count();
            return Err(format!("{failed} of {n} connections failed; first: {e}"));
        }
    }

    let rec = Arc::new(Recorder {
        epoch: Instant::now(),
        shards: (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    ack: histogram(3),
                    deliver: histogram(3),
                    per_sec: Vec::new(),
                    errors: BTreeMap::new(),
                })
            })
            .collect(),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let stop_sending = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let start_us = rec.now_us() + 200_000;
    let per_sender = rate as f64 / n as f64;
    let interval_us = 1_000_000.0 / per_sender.max(1e-9);
    let sends_each = (per_sender * args.duration as f64).floor() as u64;
    let extra = (rate * args.duration).saturating_sub(sends_each * n as u64);
    let text: String = "가나다 confab bench "
        .chars()
        .cycle()
        .take(args.text_bytes.max(1))
        .collect();

    let mut handles = Vec::with_capacity(n);
    for (i, ws) in conns.into_iter().enumerate() {
        let Some(ws) = ws else { continue };
        let room = seed.rooms[i / k].clone();
        // Spread the remainder so the total is exactly rate × duration.
        let count = sends_each + u64::from((i as u64) < extra);
        let offset = interval_us * (i as f64 / n as f64);
        let (rec, stop_s, stop_r, text) = (
            rec.clone(),
            stop_sending.clone(),
            stop_reading.clone(),
            text.clone(),
        );
        handles.push(tokio::spawn(drive_connection(
            ws,
            i,
            step,
            room,
            count,
            start_us,
            start_us as f64 + offset,
            interval_us,
            text,
            rec,
            stop_s,
            stop_r,
        )));
    }

    // Progress, and the server's peak memory, once a second.
    let progress = {
        let (rec, target, label) = (rec.clone(), target.clone(), label.to_string());
        let quiet = args.quiet;
        let stop = stop_reading.clone();
        tokio::spawn(async move {
            let mut peak = 0f64;
            let mut last = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(s) = server_sample(&target).await {
                    peak = peak.max(s.rss_bytes);
                }
                if !quiet {
                    let (sent, acked, del, err) = (
                        rec.sent.load(Ordering::Relaxed),
                        rec.acked.load(Ordering::Relaxed),
                        rec.delivered.load(Ordering::Relaxed),
                        rec.errors.load(Ordering::Relaxed),
                    );
                    eprint!(
                        "\r{label}: t={:>3}s sent={sent} acked={acked} ({}/s) delivered={del} errors={err}   ",
                        rec.now_us().saturating_sub(start_us) / 1_000_000,
                        acked - last.0,
                    );
                    last = (acked, del);
                }
            }
            if !quiet {
                eprintln!();
            }
            peak
        })
    };

    // Sending ends on schedule; then wait for stragglers up to `drain`.
    let send_end = Duration::from_micros(start_us) + Duration::from_secs(args.duration);
    tokio::time::sleep(send_end.saturating_sub(rec.epoch.elapsed())).await;
    stop_sending.store(true, Ordering::Relaxed);
    let total_sent = rate * args.duration;
    let expected_per_msg = (k - 1) as u64;
    let drain_until = Instant::now() + Duration::from_secs(args.drain);
    while Instant::now() < drain_until {
        let acked = rec.acked.load(Ordering::Relaxed);
        let done = acked + rec.errors.load(Ordering::Relaxed) >= total_sent
            && rec.delivered.load(Ordering::Relaxed) >= acked * expected_per_msg;
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_reading.store(true, Ordering::Relaxed);
    let mut logs = Vec::with_capacity(handles.len());
    for h in handles {
        logs.push(h.await.map_err(|e| e.to_string())?);
    }
    let peak = progress.await.unwrap_or(0.0);
    let elapsed = args.duration as f64;
    let after = server_sample(target).await;

    // Loss: every acked message must have reached every other member.
    let mut lost = 0u64;
    let mut expected = 0u64;
    for room in 0..n / k {
        let members = &logs[room * k..(room + 1) * k];
        let received: Vec<HashSet<u64>> = members
            .iter()
            .map(|l| l.received.iter().copied().collect())
            .collect();
        for (a, la) in members.iter().enumerate() {
            for (b, rb) in received.iter().enumerate() {
                if a != b {
                    expected += la.acked.len() as u64;
                    lost += la.acked.iter().filter(|(s, _)| !rb.contains(s)).count() as u64;
                }
            }
        }
    }
    let history_mismatches = check_history(target, seed, &logs, k).await?;

    let mut ack = histogram(3);
    let mut deliver = histogram(3);
    let mut per_sec: Vec<Histogram<u64>> = Vec::new();
    let mut errors_by_kind = BTreeMap::new();
    for s in &rec.shards {
        let s = s.lock().unwrap_or_else(|e| e.into_inner());
        let _ = ack.add(&s.ack);
        let _ = deliver.add(&s.deliver);
        for (i, h) in s.per_sec.iter().enumerate() {
            if per_sec.len() <= i {
                per_sec.resize_with(i + 1, || histogram(2));
            }
            let _ = per_sec[i].add(h);
        }
        for (k, v) in &s.errors {
            *errors_by_kind.entry(k.clone()).or_insert(0) += v;
        }
    }
    let sent: u64 = logs.iter().map(|l| l.sent).sum();
    let acked: u64 = logs.iter().map(|l| l.acked.len() as u64).sum();
    let unacked = sent.saturating_sub(acked + rec.errors.load(Ordering::Relaxed));
    if unacked > 0 {
        *errors_by_kind.entry("no_ack".into()).or_insert(0) += unacked;
    }
    let errors: u64 = errors_by_kind.values().sum();
    let deliver_p = percentiles(&deliver);
    let pass = TIERS_MS
        .map(|t| errors == 0 && lost == 0 && history_mismatches == 0 && deliver_p.max <= t as f64);
    let mut curve = Vec::new();
    for q in [
        0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0,
    ] {
        curve.push((q * 100.0, deliver.value_at_quantile(q) as f64 / 1000.0));
    }
    Ok(StepResult {
        users: n,
        rate,
        duration_secs: elapsed,
        sent,
        acked,
        delivered: rec.delivered.load(Ordering::Relaxed),
        expected_deliveries: expected,
        errors,
        error_rate: if sent == 0 {
            0.0
        } else {
            errors as f64 / sent as f64
        },
        errors_by_kind,
        lost,
        history_mismatches,
        achieved_rate: acked as f64 / elapsed,
        ack_ms: percentiles(&ack),
        deliver_ms: deliver_p,
        per_second: per_sec
            .iter()
            .enumerate()
            .map(|(i, h)| {
                (
                    i as u64,
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                    h.max() as f64 / 1000.0,
                    h.len(),
                )
            })
            .collect(),
        deliver_curve: curve,
        server_cpu_percent: match (before, after) {
            (Some(b), Some(a)) => {
                Some((a.cpu_seconds - b.cpu_seconds) / before_at.elapsed().as_secs_f64() * 100.0)
            }
            _ => None,
        },
        server_rss_mb: after.map(|a| a.rss_bytes / 1e6),
        server_rss_peak_mb: (peak > 0.0).then_some(peak / 1e6),
        pass,
    })
}

/// Reads back each room's history over the acked range: every acked
/// (seq, client_id) must be there, and no client_id twice.
async fn check_history(
    target: &Target,
    seed: &Seed,
    logs: &[ConnLog],
    k: usize,
) -> Result<u64, String> {
    let mut mismatches = 0u64;
    for room in 0..logs.len() / k {
        let members = &logs[room * k..(room + 1) * k];
        let acked: HashMap<u64, &str> = members
            .iter()
            .flat_map(|l| l.acked.iter().map(|(s, c)| (*s, c.as_str())))
            .collect();
        let (Some(&lo), Some(&hi)) = (acked.keys().min(), acked.keys().max()) else {
            continue;
        };
        let token = &seed.users[room * k].token;
        let room_id = &seed.rooms[room];
        let mut seen: HashMap<String, u32> = HashMap::new();
        let mut found = HashSet::new();
        let mut after = lo - 1;
        while after < hi {
            let path = format!("/api/v1/rooms/{room_id}/messages?after={after}&limit=200");
            let (status, v) = target.http(Method::GET, &path, Some(token), None).await?;
            let msgs = v["messages"].as_array().cloned().unwrap_or_default();
            if !status.is_success() || msgs.is_empty() {
                break;
            }
            for m in &msgs {
                let seq = m["seq"].as_u64().unwrap_or(0);
                let cid = m["client_id"].as_str().unwrap_or("");
                *seen.entry(cid.to_string()).or_default() += 1;
                if acked.get(&seq) == Some(&cid) {
                    found.insert(seq);
                }
                after = after.max(seq);
            }
        }
        mismatches += (acked.len() - found.len()) as u64;
        mismatches += seen.values().filter(|&&c| c > 1).count() as u64;
    }
    Ok(mismatches)
}

/// client_id = "b{step}.{conn}.{k}.{scheduled µs}"
fn scheduled_us(client_id: &str) -> Option<u64> {
    client_id.rsplit('.').next()?.parse().ok()
}

#[allow(clippy::too_many_arguments)]
async fn drive_connection(
    ws: Ws,
    conn: usize,
    step: usize,
    room: String,
    count: u64,
    step_start_us: u64,
    first_us: f64,
    interval_us: f64,
    text: String,
    rec: Arc<Recorder>,
    stop_sending: Arc<AtomicBool>,
    stop_reading: Arc<AtomicBool>,
) -> ConnLog {
    let stop_reading_reader = stop_reading.clone();
    let (mut rx, mut tx) = ws.split(tokio::io::split);
    let reader = {
        let rec = rec.clone();
        let stop_reading = stop_reading_reader;
        tokio::spawn(async move {
            let mut log = ConnLog::default();
            // read_frame is not cancel-safe, so it is never raced against a
            // timer: the step ends with a Close frame the server answers.
            loop {
                let frame = rx
                    .read_frame(&mut |_| async { Ok::<_, WebSocketError>(()) })
                    .await;
                let frame = match frame {
                    Err(_) => {
                        if !stop_reading.load(Ordering::Relaxed) {
                            rec.error(conn, "disconnected");
                        }
                        break;
                    }
                    Ok(f) => f,
                };
                match frame.opcode {
                    OpCode::Text => {}
                    OpCode::Close => {
                        if !stop_reading.load(Ordering::Relaxed) {
                            rec.error(conn, "closed_by_server");
                        }
                        break;
                    }
                    _ => continue,
                }
                let now = rec.now_us();
                let v: Value = serde_json::from_slice(&frame.payload).unwrap_or(Value::Null);
                match v["type"].as_str() {
                    Some("ack") => {
                        let cid = v["client_id"].as_str().unwrap_or("");
                        if let (Some(t), Some(seq)) = (scheduled_us(cid), v["seq"].as_u64()) {
                            rec.acked.fetch_add(1, Ordering::Relaxed);
                            let _ = rec.shard(conn).ack.record(now.saturating_sub(t).max(1));
                            log.acked.push((seq, cid.to_string()));
                        }
                    }
                    Some("message") => {
                        let cid = v["client_id"].as_str().unwrap_or("");
                        if let (Some(t), Some(seq)) = (scheduled_us(cid), v["seq"].as_u64()) {
                            rec.delivered.fetch_add(1, Ordering::Relaxed);
                            let lat = now.saturating_sub(t).max(1);
                            let sec = t.saturating_sub(step_start_us) / 1_000_000;
                            let mut s = rec.shard(conn);
                            let _ = s.deliver.record(lat);
                            let sec = sec as usize;
                            if s.per_sec.len() <= sec {
                                s.per_sec.resize_with(sec + 1, || histogram(2));
                            }
                            let _ = s.per_sec[sec].record(lat);
                            drop(s);
                            log.received.push(seq);
                        }
                    }
                    Some("error") => {
                        let code = v["code"].as_str().unwrap_or("error");
                        rec.error(conn, code);
                    }
                    _ => {}
                }
            }
            log
        })
    };
    let mut sent = 0u64;
    for i in 0..count {
        if stop_sending.load(Ordering::Relaxed) {
            break;
        }
        let due = (first_us + interval_us * i as f64) as u64;
        let now = rec.now_us();
        if due > now {
            tokio::time::sleep(Duration::from_micros(due - now)).await;
        }
        let frame = json!({
            "type": "send",
            "room": room,
            "client_id": format!("b{step}.{conn}.{i}.{due}"),
            "text": text,
        })
        .to_string();
        if tx
            .write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
            .await
            .is_err()
        {
            rec.error(conn, "send_failed");
            break;
        }
        sent += 1;
        rec.sent.fetch_add(1, Ordering::Relaxed);
    }
    // Keep reading until the step is over, then close; the server's answering
    // Close ends the reader.
    while !stop_reading.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tx.write_frame(Frame::close(1000, b"")).await;
    let mut reader = reader;
    let mut log = match tokio::time::timeout(Duration::from_secs(5), &mut reader).await {
        Ok(Ok(log)) => log,
        _ => {
            reader.abort();
            rec.error(conn, "no_close_answer");
            ConnLog::default()
        }
    };
    log.sent = sent;
    log
}

#[derive(Debug, Serialize)]
pub struct IdleResult {
    pub requested: usize,
    pub opened: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub rss_before_mb: f64,
    pub rss_after_mb: f64,
    pub rss_per_connection_kb: f64,
    pub server_open_fds: f64,
    /// The bench process's open-file limit (soft, hard) after raising it.
    pub bench_open_files: (u64, u64),
    pub note: String,
}

/// Idle connections per seeded user (below the server's default
/// `max_sessions_per_user`).
const IDLE_SESSIONS_PER_USER: usize = 16;

async fn idle(
    target: &Target,
    args: &BenchArgs,
    n: usize,
    limits: (u64, u64),
) -> Result<IdleResult, String> {
    if n as u64 + 32 > limits.1 {
        eprintln!(
            "note: {n} connections need {n} file descriptors here and on a local server, but this \
             process's hard open-file limit is {}: expect the run to stop near it",
            limits.1
        );
    }
    // The server allows `max_sessions_per_user` (default 32) sessions per
    // account: the connections are spread over enough users.
    let users = n.div_ceil(IDLE_SESSIONS_PER_USER).max(1);
    let mut tokens = Vec::with_capacity(users);
    {
        let mut signups = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(16));
        for k in 0..users {
            let (target, gate) = (target.clone(), gate.clone());
            let name = format!("{}idle{k}", args.prefix);
            signups.spawn(async move {
                let _permit = gate.acquire().await;
                sign_up_or_in(&target, &name).await
            });
        }
        while let Some(r) = signups.join_next().await {
            tokens.push(r.map_err(|e| e.to_string())??.token);
        }
    }
    let before = server_sample(target)
        .await
        .ok_or("the server's /metrics has no process figures")?;
    let started = Instant::now();
    let mut open: Vec<Ws> = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first_error = None;
    let mut tasks = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    for i in 0..n {
        let (target, gate, token) = (
            target.clone(),
            gate.clone(),
            tokens[i / IDLE_SESSIONS_PER_USER].clone(),
        );
        tasks.spawn(async move {
            let _permit = gate.acquire().await;
            tokio::time::timeout(Duration::from_secs(10), target.ws(i, &token))
                .await
                .unwrap_or_else(|_| Err("connect timed out".into()))
        });
        // Reap as we go so memory and fds are bounded by what is open.
        while let Some(r) = tasks.try_join_next() {
            match r.map_err(|e| e.to_string())? {
                Ok(ws) => open.push(ws),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if !args.quiet && i % 1000 == 999 {
            eprint!("\ridle: {} open, {failed} failed", open.len());
        }
    }
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| e.to_string())? {
            Ok(ws) => open.push(ws),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if !args.quiet {
        eprintln!(
            "\ridle: {} open, {failed} failed in {:.1} s",
            open.len(),
            started.elapsed().as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Reading /metrics needs one more socket: at the open-file limit, give
    // back a few connections first (and count only those still open).
    let mut after = server_sample(target).await;
    while after.is_none() && !open.is_empty() {
        open.truncate(open.len().saturating_sub(16));
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = server_sample(target).await;
    }
    let after = after.unwrap_or(before);
    let opened = open.len();
    let per = if opened == 0 {
        0.0
    } else {
        (after.rss_bytes - before.rss_bytes) / opened as f64 / 1024.0
    };
    let note = if failed > 0 && (opened as u64 + 64) >= limits.1 {
        format!(
            "stopped near the open-file hard limit ({}): each connection is a file descriptor on both sides",
            limits.1
        )
    } else if failed > 0 {
        "some connections failed; see first_error (the server's own open-file limit may be lower)"
            .to_string()
    } else {
        "all connections opened".to_string()
    };
    drop(open);
    Ok(IdleResult {
        requested: n,
        opened,
        failed,
        first_error,
        rss_before_mb: before.rss_bytes / 1e6,
        rss_after_mb: after.rss_bytes / 1e6,
        rss_per_connection_kb: per,
        server_open_fds: after.open_fds,
        bench_open_files: limits,
        note,
    })
}
