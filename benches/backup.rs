//! Backup and restore throughput (issue 10), end to end with the release
//! binary.
//!
//! 1. **Seed** a data directory through confab's own `GroupCommitWriter` (the
//!    real write path: seq assignment, `client_id` dedup, `message_log`, the
//!    wallet ledger): `--users` users (3,000), `--groups` group rooms of 3–12
//!    members (1,500), `--direct` direct rooms (3,000; repeats merge), a
//!    credit for every user and one transfer (with its payment message) per
//!    500 messages, and `--messages` messages in all (1,000,000; `--quick`
//!    50,000) from the generator of `search/corpus.rs` (mixed Korean/English,
//!    realistic lengths), spread Zipf-like over the rooms (a few busy rooms,
//!    many quiet ones). With `--dir D` the directory is kept, and reused
//!    without seeding when it already holds a seed of that many messages.
//! 2. **Time** each operation `--runs` times (3), each a run of the real
//!    binary (`confab backup` / `confab restore` as an operator types them):
//!    - `offline`: `confab backup` with no server on the directory (it opens
//!      the store read-only);
//!    - `restore`: `confab restore` of that file into an empty directory
//!      (verify pass, load pass, `wallet verify`, move into place); the end
//!      of the verify pass is read off the progress output, and once
//!      `confab wallet verify` on the restored store is timed on its own;
//!    - `online`: `confab backup` while `confab serve` runs on a copy of the
//!      directory, idle (through the admin socket);
//!    - `load`: the same while the bench sends `--rate` (1,000) messages a
//!      second open-loop over keep-alive HTTP (`POST /rooms/{id}/messages`,
//!      the 201 comes after the durable commit) as `--senders` (50) users,
//!      from `--lead` (5) s before the backup until `--lead` s after it;
//!      send→ack is measured from each send's scheduled time and split by
//!      whether that time fell inside the backup;
//!    - `control`: under the same load, no backup but a file of the
//!      backup's size written as the backup writes it (1 MiB writes, one
//!      fsync at the end), and the same with write-back started every 8 MiB
//!      (`sync_file_range`): what the backup's I/O alone does to the load.
//!
//!    Also: the backup file's size against the store's, and reading the file
//!    plus SHA-256 over it in this process (the floor of the verify pass).
//!    Every figure comes with the CPU time of the processes doing the work
//!    and the CPU of everything else on the machine meanwhile (it should be
//!    ~0; other builds on this shared machine skew the figures).
//! 3. Prints the tables (median and min–max of the runs); `--json FILE`.
//!
//! The server runs with `search_enabled=false`: the seeded directory has no
//! search index, and its one-time catch-up would otherwise overlap the
//! timings (the index is not part of a backup). Everything runs on
//! 127.0.0.1, every process and the load stop by themselves, and the file
//! pages are warm (nothing drops the page cache).
//!
//! Run `cargo bench --bench backup -- --dir /tmp/confab-backup-1m` (seeding
//! takes about a minute, the runs a few more); `-- --quick` is a
//! 50,000-message smoke run; `-- --help` lists the flags. `CONFAB_BIN` runs
//! another binary than the one cargo built (e.g. a copy, so that a rebuild
//! of target/ during a long run does not change it).

#[allow(dead_code)] // only the message generator is used here
#[path = "search/corpus.rs"]
mod corpus;
#[allow(dead_code)] // only the keep-alive HTTP client is used here
#[path = "search/http.rs"]
mod http;

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use hyper::{Method, StatusCode};
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use confab::hub::Hub;
use confab::ids::{RoomId, UserId};
use confab::store::Store;
use confab::wallet::TransferRequest;
use confab::writes::{GroupCommitWriter, Op, Origin, Reply, WalletOp, WriterHandle};
use corpus::Corpus;

const PHASES: [&str; 5] = ["offline", "restore", "online", "load", "control"];

const USAGE: &str = "cargo bench --bench backup -- [--quick] [flags]
  --messages N     messages in the seeded store (1000000; --quick 50000)
  --users N        (3000; quick 600)   --groups N (1500; quick 300)
  --direct N       direct rooms (3000; quick 600)
  --runs N         timed runs of each operation (3)
  --phases LIST    any of offline,restore,online,load,control (all; control
                   needs load: the backup's file writes alone under the load)
  --rate N         load: messages per second during `load` (1000)
  --senders N      load: sending users (50)
  --lead S         load: seconds of load before and after each backup (5)
  --dir D          keep the data directory in D (reused when already seeded)
  --keep           keep the backups and restored stores (D/bench-scratch)
  --json FILE      write the results as JSON
  --seed N         RNG seed (42)";

#[derive(Clone, Debug)]
struct Opts {
    messages: u64,
    users: usize,
    groups: usize,
    direct: usize,
    runs: usize,
    phases: Vec<String>,
    rate: u64,
    senders: usize,
    lead: u64,
    dir: Option<PathBuf>,
    keep: bool,
    json: Option<PathBuf>,
    seed: u64,
}

fn parse_args() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        messages: if quick { 50_000 } else { 1_000_000 },
        users: if quick { 600 } else { 3000 },
        groups: if quick { 300 } else { 1500 },
        direct: if quick { 600 } else { 3000 },
        runs: 3,
        phases: PHASES.iter().map(|p| p.to_string()).collect(),
        rate: 1000,
        senders: 50,
        lead: 5,
        dir: None,
        keep: false,
        json: None,
        seed: 42,
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" | "--quick" => {}
            "--messages" => o.messages = number(value()?)?,
            "--users" => o.users = number(value()?)? as usize,
            "--groups" => o.groups = number(value()?)? as usize,
            "--direct" => o.direct = number(value()?)? as usize,
            "--runs" => o.runs = number(value()?)? as usize,
            "--rate" => o.rate = number(value()?)?,
            "--senders" => o.senders = number(value()?)? as usize,
            "--lead" => o.lead = number(value()?)?,
            "--phases" => o.phases = value()?.split(',').map(|s| s.trim().into()).collect(),
            "--dir" => o.dir = Some(value()?.into()),
            "--keep" => o.keep = true,
            "--json" => o.json = Some(value()?.into()),
            "--seed" => o.seed = number(value()?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if let Some(p) = o.phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
        return Err(format!("--phases: unknown phase {p}"));
    }
    if o.users < 12 || o.groups == 0 || o.runs == 0 || o.rate == 0 || o.senders == 0 {
        return Err("--users ≥ 12; --groups, --runs, --rate and --senders > 0".into());
    }
    if o.senders > o.groups {
        return Err("--senders must not exceed --groups (one group each)".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------- seeding

/// The seeded users' password.
const PASSWORD: &str = "backup-bench-1";
/// Messages per wallet transfer (each transfer posts a payment message).
const MESSAGES_PER_TRANSFER: u64 = 500;

/// What the seeding produced, saved next to the store (as
/// `backup-bench-seed.json`) for reuse.
const MANIFEST: &str = "backup-bench-seed.json";
#[derive(Serialize, Deserialize, Clone)]
struct Manifest {
    messages: u64,
    users: usize,
    rooms: usize,
    transfers: u64,
    seed_secs: f64,
    messages_per_sec: f64,
    text_bytes: u64,
    /// Users who send the load, each with one of its groups (id).
    senders: Vec<(String, String)>,
}

/// Submits `n` operations built by `make(i, reply)` to the writer, keeping
/// up to 20,000 unanswered, and gives each answer to `done` in order.
async fn pipeline<T>(
    w: &WriterHandle,
    n: usize,
    mut make: impl FnMut(usize, Reply<T>) -> Op,
    mut done: impl FnMut(usize, T),
) -> Result<(), String> {
    const WINDOW: usize = 20_000;
    let mut waiting = VecDeque::with_capacity(WINDOW.min(n));
    for i in 0..n {
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.submit(make(i, tx))
            .await
            .map_err(|e| format!("the writer refused an operation: {e:?}"))?;
        waiting.push_back(rx);
        let last = i + 1 == n;
        while waiting.len() >= WINDOW || (last && !waiting.is_empty()) {
            let answered = i + 1 - waiting.len();
            let rx = waiting.pop_front().expect("something is waiting");
            match rx.await {
                Ok(Ok(v)) => done(answered, v),
                Ok(Err(e)) => return Err(format!("seeding: {e:?}")),
                Err(_) => return Err("seeding: the writer dropped a reply".into()),
            }
        }
    }
    Ok(())
}

async fn seed(dir: &Path, o: &Opts) -> Result<Manifest, String> {
    let started = Instant::now();
    let config = confab::config::Config::load(&confab::config::Overrides::default())
        .map_err(|e| e.to_string())?;
    let store = Store::open(dir)?;
    let (w, join) = GroupCommitWriter::spawn(
        store,
        Arc::new(Hub::default()),
        config.store.clone(),
        config.limits.max_group_members,
    )
    .map_err(|e| format!("writer thread: {e}"))?;
    let mut rng = StdRng::seed_from_u64(o.seed);
    let corpus = Corpus::new(&mut rng);
    let salt = SaltString::encode_b64(&rng.random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    let hash = argon2::Argon2::default()
        .hash_password(PASSWORD.as_bytes(), &salt)
        .map_err(|e| e.to_string())?
        .to_string();

    let mut users = vec![UserId(0); o.users];
    pipeline(
        &w,
        o.users,
        |i, reply| Op::CreateUser {
            username: format!("bk{i}"),
            display_name: format!("Backup bench {i}"),
            password_hash: hash.clone(),
            reply,
        },
        |i, u| users[i] = u.id,
    )
    .await?;

    // Groups of 3–12 random users, then direct rooms between random pairs.
    let mut rooms: Vec<(RoomId, Vec<UserId>)> = Vec::new();
    let mut senders = Vec::new();
    let mut members_of = Vec::with_capacity(o.groups);
    for _ in 0..o.groups {
        let size = rng.random_range(3..=12);
        let picked = rand::seq::index::sample(&mut rng, o.users, size);
        members_of.push(picked.iter().map(|i| users[i]).collect::<Vec<_>>());
    }
    pipeline(
        &w,
        o.groups,
        |g, reply| Op::CreateGroup {
            owner: members_of[g][0],
            name: format!("team {g}"),
            members: members_of[g][1..].to_vec(),
            reply,
        },
        |g, room| {
            if senders.len() < 200 {
                let owner = users.iter().position(|u| *u == members_of[g][0]);
                senders.push((format!("bk{}", owner.unwrap_or(0)), room.id.to_string()));
            }
            rooms.push((room.id, members_of[g].clone()));
        },
    )
    .await?;
    let pairs: Vec<(UserId, UserId)> = (0..o.direct)
        .map(|_| {
            let two = rand::seq::index::sample(&mut rng, o.users, 2);
            (users[two.index(0)], users[two.index(1)])
        })
        .collect();
    let mut seen = HashSet::new();
    pipeline(
        &w,
        o.direct,
        |i, reply| Op::CreateDirect {
            a: pairs[i].0,
            b: pairs[i].1,
            reply,
        },
        |i, (room, _)| {
            if seen.insert(room.id) {
                rooms.push((room.id, vec![pairs[i].0, pairs[i].1]));
            }
        },
    )
    .await?;

    // The ledger: a credit for everyone, then transfers between random
    // users (each also a payment message in the pair's direct room).
    pipeline(
        &w,
        o.users,
        |i, reply| {
            Op::Wallet(WalletOp::Credit {
                user: users[i],
                amount: 1_000_000,
                key: None,
                reply,
            })
        },
        |_, _| {},
    )
    .await?;
    let transfers = o.messages / MESSAGES_PER_TRANSFER;
    pipeline(
        &w,
        transfers as usize,
        |i, reply| {
            let two = rand::seq::index::sample(&mut rng, o.users, 2);
            Op::Wallet(WalletOp::Transfer {
                from: users[two.index(0)],
                req: TransferRequest {
                    to: users[two.index(1)],
                    amount: rng.random_range(1..=5000),
                    key: format!("bk-transfer-{i}"),
                    note: Some(corpus.message(&mut rng)),
                    execute_at: None,
                    repeat: None,
                },
                reply,
            })
        },
        |_, _| {},
    )
    .await?;
    eprintln!(
        "seed: {} users, {} rooms, {transfers} transfers in {:.1} s",
        o.users,
        rooms.len(),
        started.elapsed().as_secs_f64()
    );

    // Messages: rooms in a random order weighted 1/rank^0.8.
    rooms.shuffle(&mut rng);
    let weights = (1..=rooms.len()).map(|rank| (rank as f64).powf(-0.8));
    let pick = WeightedIndex::new(weights).map_err(|e| e.to_string())?;
    let chat = (o.messages - transfers) as usize;
    let msg_started = Instant::now();
    let mut text_bytes = 0u64;
    pipeline(
        &w,
        chat,
        |i, reply| {
            let (room, members) = &rooms[rng.sample(&pick)];
            let text = corpus.message(&mut rng);
            text_bytes += text.len() as u64;
            Op::Send {
                room: *room,
                from: *members.choose(&mut rng).expect("rooms have members"),
                client_id: format!("bk-{i}"),
                text,
                origin: Origin::Http(reply),
                received: Instant::now(),
            }
        },
        |i, _| {
            if (i + 1) % 100_000 == 0 {
                let secs = msg_started.elapsed().as_secs_f64();
                eprint!(
                    "\rseed: {} messages, {:.0}/s   ",
                    i + 1,
                    (i + 1) as f64 / secs
                );
            }
        },
    )
    .await?;
    let msg_secs = msg_started.elapsed().as_secs_f64();
    eprintln!();
    // Commit what is queued, stop the writer and wait for it.
    w.submit(Op::Stop).await.map_err(|e| format!("{e:?}"))?;
    drop(w);
    let stopped = tokio::task::spawn_blocking(move || join.join().is_ok()).await;
    if !matches!(stopped, Ok(true)) {
        return Err("the writer thread panicked".into());
    }
    let manifest = Manifest {
        messages: o.messages,
        users: o.users,
        rooms: rooms.len(),
        transfers,
        seed_secs: started.elapsed().as_secs_f64(),
        messages_per_sec: chat as f64 / msg_secs,
        text_bytes,
        senders,
    };
    let text = serde_json::to_string(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(MANIFEST), text).map_err(|e| format!("write manifest: {e}"))?;
    Ok(manifest)
}

/// The manifest of an earlier seed in `dir`, or a new seed.
async fn seeded(dir: &Path, o: &Opts) -> Result<Manifest, String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) {
        let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("{MANIFEST}: {e}"))?;
        if m.messages != o.messages {
            return Err(format!(
                "{} holds a seed of {} messages, not {}: choose another --dir",
                dir.display(),
                m.messages,
                o.messages
            ));
        }
        eprintln!(
            "reusing the seed in {} ({} messages)",
            dir.display(),
            m.messages
        );
        return Ok(m);
    }
    if dir.join("confab.redb").exists() {
        return Err(format!(
            "{} has a store but no {MANIFEST} (an interrupted seeding?): delete it or choose another --dir",
            dir.display()
        ));
    }
    seed(dir, o).await
}

// ---------------------------------------------------------------- measuring

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage(2) fills the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// User + system CPU seconds of a running process.
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the ")" ending the name: state, then 10 more fields before
    // utime and stime (in clock ticks of 1/100 s).
    let after = stat.rsplit(')').next().unwrap_or_default();
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// CPU seconds the whole machine has spent busy (not idle, not iowait).
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let mut busy = 0.0;
    for (i, v) in line.split_whitespace().skip(1).take(8).enumerate() {
        if i != 3 && i != 4 {
            busy += v.parse::<f64>().unwrap_or(0.0);
        }
    }
    busy / 100.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU counters sampled before an operation: ours (this process, its
/// waited-for children, the server) and the machine's.
struct CpuMark {
    at: Instant,
    ours: f64,
    machine: f64,
}

impl CpuMark {
    fn now(server: Option<u32>) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            ours: rusage_secs(libc::RUSAGE_SELF)
                + rusage_secs(libc::RUSAGE_CHILDREN)
                + server.map(process_cpu_secs).unwrap_or(0.0),
            machine: machine_busy_secs(),
        }
    }

    /// (CPU seconds of our processes, cores used by everything else).
    fn since(&self, server: Option<u32>) -> (f64, f64) {
        let now = CpuMark::now(server);
        let wall = now.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let ours = now.ours - self.ours;
        (ours, ((now.machine - self.machine - ours) / wall).max(0.0))
    }
}

/// No backup or restore may take longer than this.
const OP_TIMEOUT: Duration = Duration::from_secs(900);

/// One timed run of the binary.
#[derive(Serialize, Clone, Default)]
struct Timed {
    /// From spawn to exit.
    secs: f64,
    /// CPU of the processes doing the work (the command; with a server, the
    /// server's too — under load that includes serving the load).
    cpu_secs: f64,
    /// CPU used meanwhile by everything else on the machine, in cores.
    other_cores: f64,
    /// From spawn to the first line break on stderr (restore: the end of
    /// the verify pass).
    first_line_secs: Option<f64>,
    /// The command's JSON summary.
    summary: Value,
    #[serde(skip)]
    stderr: String,
}

/// `confab` (or `$CONFAB_BIN`) in `cwd`, which has no config.toml, and
/// without the `CONFAB_*` environment (cargo sets CONFAB_GIT_HASH): the
/// built-in defaults plus what the caller sets.
fn confab(cwd: &Path) -> Command {
    let bin = std::env::var_os("CONFAB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_confab")));
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CONFAB_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs `confab ARGS` in `cwd` for at most [`OP_TIMEOUT`]; fails unless it
/// exits with success.
fn run_confab(cwd: &Path, args: &[&str], server: Option<u32>) -> Result<Timed, String> {
    let mark = CpuMark::now(server);
    let mut child = confab(cwd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run confab: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let started = mark.at;
    let err = std::thread::spawn(move || {
        let (mut all, mut first_line) = (Vec::new(), None);
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            if first_line.is_none() && buf[..n].contains(&b'\n') {
                first_line = Some(started.elapsed().as_secs_f64());
            }
            all.extend_from_slice(&buf[..n]);
        }
        (String::from_utf8_lossy(&all).into_owned(), first_line)
    });
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if started.elapsed() > OP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("confab {} took over {OP_TIMEOUT:?}", args[0]));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let secs = started.elapsed().as_secs_f64();
    let (cpu_secs, other_cores) = mark.since(server);
    let out = out.join().unwrap_or_default();
    let (stderr, first_line_secs) = err.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "confab {} failed ({status}): {stderr}",
            args.join(" ")
        ));
    }
    let summary = serde_json::from_str(&out).unwrap_or(Value::Null);
    Ok(Timed {
        secs,
        cpu_secs,
        other_cores,
        first_line_secs,
        summary,
        stderr,
    })
}

fn path_arg(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("not a UTF-8 path: {}", p.display()))
}

/// `confab backup --to FILE --data-dir DIR`; `online`: it must have gone
/// through a running server.
fn backup(cwd: &Path, dir: &Path, to: &Path, server: Option<u32>) -> Result<Timed, String> {
    let _ = std::fs::remove_file(to);
    let args = [
        "backup",
        "--to",
        path_arg(to)?,
        "--data-dir",
        path_arg(dir)?,
    ];
    let t = run_confab(cwd, &args, server)?;
    if server.is_some() != t.stderr.contains("by the running server") {
        return Err(format!(
            "the backup did not take the expected path (server: {}): {}",
            server.is_some(),
            t.stderr.trim()
        ));
    }
    Ok(t)
}

/// A running `confab serve`, stopped (SIGTERM, then SIGKILL after 60 s)
/// when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(dir: &Path) -> Result<Server, String> {
        let mut child = confab(dir)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                path_arg(dir)?,
            ])
            .args(["--set", "log=warn", "--set", "search_enabled=false"])
            .args([
                "--set",
                "send_rate_per_sec=100000",
                "--set",
                "send_burst=100000",
                "--set",
                "user_send_rate_per_sec=100000",
                "--set",
                "user_send_burst=100000",
                "--set",
                "frame_rate_per_sec=100000",
                "--set",
                "frame_burst=100000",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start confab serve: {e}"))?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).map_err(|e| e.to_string())?;
        // Keep reading, so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|a| a.trim().parse().ok());
        let server = Server {
            child,
            addr: addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
        };
        if addr.is_none() {
            return Err(format!(
                "unexpected first line from confab serve: {first:?}"
            ));
        }
        let t = Instant::now();
        while !confab::admin::socket_path(dir).exists() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("the server opened no admin socket".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("server pid {} on {}", server.child.id(), server.addr);
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- load

/// Send→ack latencies (ms) of the load around one backup.
#[derive(Serialize, Clone, Default)]
struct LoadResult {
    sent: u64,
    errors: u64,
    /// Scheduled before the backup started or after it ended.
    without: Latency,
    /// Scheduled while the backup ran.
    during: Latency,
    /// The backup as the load saw it (from the command's start to its exit).
    backup_ms: f64,
    /// When the slowest send was due, from the backup's start (ms).
    slowest_due_ms: f64,
    /// Sends due in the backup that took over 20 ms.
    during_over_20ms: usize,
    /// Per 100 ms of due time, from the backup's start: (ms, slowest ack ms).
    max_by_100ms: Vec<(f64, f64)>,
}

#[derive(Serialize, Clone, Default)]
struct Latency {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            ms.get(((ms.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0.0)
        };
        Latency {
            count: ms.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// Logs the senders in: (token, room).
async fn log_in(
    addr: SocketAddr,
    senders: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let mut conn = http::Conn::open(addr).await?;
    let mut out = Vec::new();
    for (name, room) in senders {
        let body = json!({"username": name, "password": PASSWORD});
        let v = conn
            .json(Method::POST, "/api/v1/login", None, Some(&body))
            .await?;
        let token = v["token"].as_str().ok_or("login: no token")?;
        out.push((token.to_string(), room.clone()));
    }
    Ok(out)
}

/// Most sends of the load in flight at once.
const LOAD_IN_FLIGHT: usize = 256;

/// Sends `rate` messages a second open-loop (each due at its scheduled
/// time) until `stop`; records (due, send→ack ms or None on error).
async fn send_load(
    pool: http::Pool,
    senders: Arc<Vec<(String, String)>>,
    corpus: Arc<Corpus>,
    rate: u64,
    run: String,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<(Duration, Option<f64>)> {
    let results = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(LOAD_IN_FLIGHT));
    let mut rng = StdRng::seed_from_u64(rate);
    let mut tasks = tokio::task::JoinSet::new();
    let interval = Duration::from_secs(1) / rate as u32;
    let mut k = 0u32;
    // Bounded even if nobody sets `stop`: at most OP_TIMEOUT of sending.
    while !stop.load(Ordering::Relaxed) && interval * k < OP_TIMEOUT {
        let due = interval * k;
        tokio::time::sleep_until((epoch + due).into()).await;
        let (token, room) = &senders[k as usize % senders.len()];
        let path = format!("/api/v1/rooms/{room}/messages");
        let body = json!({"text": corpus.message(&mut rng), "client_id": format!("{run}-{k}")});
        let (token, pool, results, in_flight) = (
            token.clone(),
            pool.clone(),
            results.clone(),
            in_flight.clone(),
        );
        tasks.spawn(async move {
            let _permit = in_flight.acquire_owned().await;
            let mut ack = None;
            if let Ok(mut conn) = pool.take().await {
                let answer = conn
                    .request(Method::POST, &path, Some(&token), Some(body.to_string()))
                    .await;
                if matches!(answer, Ok((StatusCode::CREATED, _))) {
                    ack = Some((epoch.elapsed() - due).as_secs_f64() * 1000.0);
                    pool.put(conn);
                }
            }
            results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((due, ack));
        });
        k += 1;
    }
    // Every request has its own 30 s timeout (http::Conn).
    while tasks.join_next().await.is_some() {}
    let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *r)
}

/// One operation under load: `lead` s of load, `op` (on a blocking
/// thread), `lead` s more. `output` (the file `op` writes) is deleted first,
/// 2 s before the load starts: deleting a large file costs the disk
/// something too, and that is not what is measured.
async fn under_load(
    server: &Server,
    senders: Arc<Vec<(String, String)>>,
    corpus: Arc<Corpus>,
    o: &Opts,
    (output, op): (
        &Path,
        impl FnOnce() -> Result<Timed, String> + Send + 'static,
    ),
    run: usize,
) -> Result<(Timed, LoadResult), String> {
    let _ = std::fs::remove_file(output);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let load = tokio::spawn(send_load(
        http::Pool::new(server.addr),
        senders,
        corpus,
        o.rate,
        format!("bl{nonce}.{run}"),
        epoch,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(o.lead)).await;
    let began = epoch.elapsed();
    let timed = tokio::task::spawn_blocking(op).await;
    let ended = epoch.elapsed();
    tokio::time::sleep(Duration::from_secs(o.lead)).await;
    stop.store(true, Ordering::Relaxed);
    let sends = load.await.map_err(|e| e.to_string())?;
    let timed = timed.map_err(|e| e.to_string())??;
    let (mut during, mut without, mut errors) = (Vec::new(), Vec::new(), 0);
    let (mut slowest, mut slowest_due) = (0.0, 0.0);
    let mut by_100ms = std::collections::BTreeMap::<i64, f64>::new();
    for (due, ack) in &sends {
        let Some(ms) = *ack else {
            errors += 1;
            continue;
        };
        let rel = due.as_secs_f64() * 1000.0 - began.as_secs_f64() * 1000.0;
        let bucket = by_100ms.entry((rel / 100.0).floor() as i64).or_default();
        *bucket = bucket.max(ms);
        if ms > slowest {
            (slowest, slowest_due) = (ms, rel);
        }
        if (began..ended).contains(due) {
            during.push(ms);
        } else {
            without.push(ms);
        }
    }
    Ok((
        timed,
        LoadResult {
            sent: sends.len() as u64,
            errors,
            during_over_20ms: during.iter().filter(|&&ms| ms > 20.0).count(),
            without: Latency::of(without),
            during: Latency::of(during),
            backup_ms: (ended - began).as_secs_f64() * 1000.0,
            slowest_due_ms: slowest_due,
            max_by_100ms: by_100ms
                .into_iter()
                .map(|(b, ms)| (b as f64 * 100.0, ms))
                .collect(),
        },
    ))
}

/// Write-back interval of the second control.
const CONTROL_FLUSH: u64 = 8 << 20;

/// Writes `bytes` to `path` in 1 MiB writes and fsyncs it, as a backup
/// writes its file; with `flush`, also starts the write-back of every
/// `flush` bytes written and waits for the one before
/// (`sync_file_range(2)`), so the final fsync has little left to do.
fn write_control(path: &Path, bytes: u64, flush: Option<u64>) -> Result<Timed, String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let _ = std::fs::remove_file(path);
    let started = Instant::now();
    let mut f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut done = 0u64;
    while done < bytes {
        let n = chunk.len().min((bytes - done) as usize);
        f.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        done += n as u64;
        if let Some(every) = flush
            && done.is_multiple_of(every)
        {
            let fd = f.as_raw_fd();
            let (this, prev) = ((done - every) as i64, done.saturating_sub(2 * every) as i64);
            // SAFETY: sync_file_range(2) on our own open file.
            unsafe {
                libc::sync_file_range(fd, this, every as i64, libc::SYNC_FILE_RANGE_WRITE);
                if done >= 2 * every {
                    libc::sync_file_range(
                        fd,
                        prev,
                        every as i64,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
            }
        }
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(Timed {
        secs: started.elapsed().as_secs_f64(),
        ..Default::default()
    })
}

// ---------------------------------------------------------------- report

#[derive(Serialize, Clone, Default)]
struct Row {
    name: String,
    runs: Vec<Timed>,
    /// Messages and bytes the operation handled (from its summary).
    messages: u64,
    bytes: u64,
    /// Restore: the verify pass (spawn → end of the pass) per run.
    verify_secs: Vec<f64>,
    load: Vec<LoadResult>,
}

fn spread(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let median = match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    (
        median,
        v.first().copied().unwrap_or(0.0),
        v.last().copied().unwrap_or(0.0),
    )
}

fn fmt_spread(xs: &[f64], digits: usize) -> String {
    let (m, lo, hi) = spread(xs);
    if xs.len() < 2 {
        return format!("{m:.digits$}");
    }
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

#[derive(Serialize, Default)]
struct Results {
    messages: u64,
    rooms: usize,
    users: usize,
    seed_secs: f64,
    seed_messages_per_sec: f64,
    load_average_before: String,
    load_average_after: String,
    rows: Vec<Row>,
    store_bytes: u64,
    store_allocated_bytes: u64,
    backup_bytes: u64,
    restored_store_bytes: u64,
    /// This process reading the backup file, and reading it with SHA-256.
    read_secs: f64,
    read_sha256_secs: f64,
    /// `confab wallet verify` on the restored store, alone.
    wallet_verify: Option<Timed>,
}

fn print_report(r: &Results) {
    let per_msg = |b: u64| b as f64 / r.messages.max(1) as f64;
    println!();
    println!(
        "store: {} messages, {} rooms, {} users; load average before {} / after {}",
        r.messages, r.rooms, r.users, r.load_average_before, r.load_average_after
    );
    println!();
    println!(
        "| operation | runs | wall s | messages/s | MB/s (backup file) | CPU s | other cores |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let secs: Vec<f64> = row.runs.iter().map(|t| t.secs).collect();
        let rate = |per: f64| -> Vec<f64> { secs.iter().map(|s| per / s).collect() };
        let col = |f: fn(&Timed) -> f64| row.runs.iter().map(f).collect::<Vec<_>>();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.runs.len(),
            fmt_spread(&secs, 2),
            if row.messages == 0 {
                "–".to_string()
            } else {
                fmt_spread(&rate(row.messages as f64), 0)
            },
            fmt_spread(&rate(row.bytes as f64 / 1e6), 1),
            fmt_spread(&col(|t| t.cpu_secs), 2),
            fmt_spread(&col(|t| t.other_cores), 2),
        );
        if !row.verify_secs.is_empty() {
            let load: Vec<f64> = secs
                .iter()
                .zip(&row.verify_secs)
                .map(|(s, v)| s - v)
                .collect();
            let rate =
                |xs: &[f64]| -> Vec<f64> { xs.iter().map(|s| row.messages as f64 / s).collect() };
            let mb = |xs: &[f64]| -> Vec<f64> {
                xs.iter().map(|s| row.bytes as f64 / 1e6 / s).collect()
            };
            println!(
                "| — verify pass (read, SHA-256, decode every record) | | {} | {} | {} | | |",
                fmt_spread(&row.verify_secs, 2),
                fmt_spread(&rate(&row.verify_secs), 0),
                fmt_spread(&mb(&row.verify_secs), 1),
            );
            println!(
                "| — load pass + durable commit + wallet verify + move | | {} | {} | {} | | |",
                fmt_spread(&load, 2),
                fmt_spread(&rate(&load), 0),
                fmt_spread(&mb(&load), 1),
            );
        }
    }
    let mb = r.backup_bytes as f64 / 1e6;
    println!(
        "| reference: read the file in this process / + SHA-256 | 1 | {:.2} / {:.2} | | {:.0} / {:.0} | | |",
        r.read_secs,
        r.read_sha256_secs,
        mb / r.read_secs.max(1e-9),
        mb / r.read_sha256_secs.max(1e-9)
    );
    if let Some(w) = &r.wallet_verify {
        println!(
            "| reference: `confab wallet verify` on the restored store | 1 | {:.2} | | | {:.2} | {:.2} |",
            w.secs, w.cpu_secs, w.other_cores
        );
    }
    for row in r.rows.iter().filter(|row| !row.load.is_empty()) {
        println!();
        println!(
            "load during `{}` (send→ack ms, scheduled time outside / inside the backup):",
            row.name
        );
        println!(
            "| run | sent | errors | outside: n, p50 / p99 / max | inside: n, p50 / p99 / max | inside > 20 ms | backup ms | slowest due at ms |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (i, l) in row.load.iter().enumerate() {
            println!(
                "| {} | {} | {} | {}, {:.2} / {:.2} / {:.1} | {}, {:.2} / {:.2} / {:.1} | {} | {:.0} | {:.0} |",
                i + 1,
                l.sent,
                l.errors,
                l.without.count,
                l.without.p50,
                l.without.p99,
                l.without.max,
                l.during.count,
                l.during.p50,
                l.during.p99,
                l.during.max,
                l.during_over_20ms,
                l.backup_ms,
                l.slowest_due_ms
            );
        }
    }
    println!();
    println!(
        "sizes: store {:.1} MB ({:.1} MB allocated) = {:.0} B/message; backup {:.1} MB = {:.0} B/message ({:.2} of the store); restored store {:.1} MB = {:.0} B/message",
        r.store_bytes as f64 / 1e6,
        r.store_allocated_bytes as f64 / 1e6,
        per_msg(r.store_bytes),
        mb,
        per_msg(r.backup_bytes),
        r.backup_bytes as f64 / r.store_bytes.max(1) as f64,
        r.restored_store_bytes as f64 / 1e6,
        per_msg(r.restored_store_bytes),
    );
}

// ---------------------------------------------------------------- main

/// Reads `file` through a 1 MiB buffer: seconds without and with SHA-256.
fn read_reference(file: &Path) -> Result<(f64, f64), String> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pass = |hash: bool| -> Result<f64, String> {
        let t = Instant::now();
        let mut f = std::fs::File::open(file).map_err(|e| e.to_string())?;
        let mut h = Sha256::new();
        loop {
            let n = f.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            if hash {
                h.update(&buf[..n]);
            }
        }
        std::hint::black_box(h.finalize());
        Ok(t.elapsed().as_secs_f64())
    };
    Ok((pass(false)?, pass(true)?))
}

fn summary_u64(t: &Timed, path: &[&str]) -> u64 {
    path.iter()
        .fold(&t.summary, |v, k| &v[*k])
        .as_u64()
        .unwrap_or(0)
}

async fn run(o: Opts) -> Result<(), String> {
    let _temp;
    let dir = match &o.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            std::path::absolute(d).map_err(|e| e.to_string())?
        }
        None => {
            let t = tempfile::tempdir().map_err(|e| e.to_string())?;
            let p = t.path().to_owned();
            _temp = t;
            p
        }
    };
    let manifest = seeded(&dir, &o).await?;
    let scratch = dir.join("bench-scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let file = scratch.join("offline.cfbk");
    let restored = scratch.join("restored");
    let live = scratch.join("live");
    let has = |p: &str| o.phases.iter().any(|x| x == p);

    let mut r = Results {
        messages: manifest.messages,
        rooms: manifest.rooms,
        users: manifest.users,
        seed_secs: manifest.seed_secs,
        seed_messages_per_sec: manifest.messages_per_sec,
        load_average_before: load_average(),
        ..Default::default()
    };
    let store_file = dir.join("confab.redb");
    let meta = std::fs::metadata(&store_file).map_err(|e| e.to_string())?;
    r.store_bytes = meta.len();
    r.store_allocated_bytes = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    eprintln!("load average: {}", r.load_average_before);

    // a) offline backups of the seeded store.
    let mut offline = Row {
        name: "offline backup (no server)".into(),
        ..Default::default()
    };
    let runs = if has("offline") { o.runs } else { 1 };
    for i in 0..runs {
        let t = backup(&scratch, &dir, &file, None)?;
        eprintln!("offline backup {}: {:.2} s", i + 1, t.secs);
        offline.messages = summary_u64(&t, &["messages"]);
        offline.bytes = summary_u64(&t, &["bytes"]);
        offline.runs.push(t);
    }
    r.backup_bytes = offline.bytes;
    (r.read_secs, r.read_sha256_secs) = read_reference(&file)?;
    if has("offline") {
        r.rows.push(offline.clone());
    }

    // d) restores of that file into an empty directory.
    if has("restore") {
        let mut row = Row {
            name: "restore into an empty dir (total)".into(),
            messages: offline.messages,
            bytes: offline.bytes,
            ..Default::default()
        };
        for i in 0..o.runs {
            let _ = std::fs::remove_dir_all(&restored);
            let args = [
                "restore",
                "--from",
                path_arg(&file)?,
                "--data-dir",
                path_arg(&restored)?,
            ];
            let t = run_confab(&scratch, &args, None)?;
            eprintln!(
                "restore {}: {:.2} s (verify pass {:.2} s)",
                i + 1,
                t.secs,
                t.first_line_secs.unwrap_or(f64::NAN)
            );
            row.verify_secs.push(t.first_line_secs.unwrap_or(0.0));
            row.runs.push(t);
        }
        r.restored_store_bytes = std::fs::metadata(restored.join("confab.redb"))
            .map(|m| m.len())
            .unwrap_or(0);
        let args = ["wallet", "verify", "--data-dir", path_arg(&restored)?];
        r.wallet_verify = Some(run_confab(&scratch, &args, None)?);
        r.rows.push(row);
    }

    // b) and c): a server on a copy of the store (so the load does not
    // change the seed).
    if has("online") || has("load") || has("control") {
        std::fs::create_dir_all(&live).map_err(|e| e.to_string())?;
        std::fs::copy(&store_file, live.join("confab.redb")).map_err(|e| e.to_string())?;
        let server = Server::start(&live)?;
        let to = scratch.join("online.cfbk");
        if has("online") {
            let mut row = Row {
                name: "online backup, server idle".into(),
                ..Default::default()
            };
            for i in 0..o.runs {
                let t = backup(&scratch, &live, &to, Some(server.pid()))?;
                eprintln!("online backup {}: {:.2} s", i + 1, t.secs);
                row.messages = summary_u64(&t, &["messages"]);
                row.bytes = summary_u64(&t, &["bytes"]);
                row.runs.push(t);
            }
            r.rows.push(row);
        }
        if has("load") || has("control") {
            let senders = log_in(
                server.addr,
                &manifest.senders[..o.senders.min(manifest.senders.len())],
            )
            .await?;
            let corpus = Arc::new(Corpus::new(&mut StdRng::seed_from_u64(o.seed)));
            let mut row = Row {
                name: format!("online backup, server under {} msgs/s", o.rate),
                ..Default::default()
            };
            let senders = Arc::new(senders);
            let pid = server.pid();
            let runs = if has("load") { o.runs } else { 0 };
            for i in 0..runs {
                let (cwd, dir, file) = (scratch.clone(), live.clone(), to.clone());
                let op = move || backup(&cwd, &dir, &file, Some(pid));
                let (t, l) =
                    under_load(&server, senders.clone(), corpus.clone(), &o, (&to, op), i).await?;
                eprintln!(
                    "backup under load {}: {:.2} s; ack p99 {:.2} ms outside, {:.2} ms during; {} errors",
                    i + 1,
                    t.secs,
                    l.without.p99,
                    l.during.p99,
                    l.errors
                );
                row.messages = summary_u64(&t, &["messages"]);
                row.bytes = summary_u64(&t, &["bytes"]);
                row.runs.push(t);
                row.load.push(l);
            }
            if has("load") {
                r.rows.push(row);
            }
            // Controls: only the backup's writing, no reading or hashing.
            if has("control") {
                let size = offline.bytes.max(1);
                for flush in [None, Some(CONTROL_FLUSH)] {
                    let mut row = Row {
                        name: match flush {
                            None => "control: write the file's size, one fsync".into(),
                            Some(n) => {
                                format!("control: the same, written back every {} MiB", n >> 20)
                            }
                        },
                        bytes: size,
                        ..Default::default()
                    };
                    for i in 0..o.runs {
                        let path = scratch.join("control.bin");
                        let file = path.clone();
                        let op = move || write_control(&file, size, flush);
                        let (t, l) = under_load(
                            &server,
                            senders.clone(),
                            corpus.clone(),
                            &o,
                            (&path, op),
                            i,
                        )
                        .await?;
                        eprintln!(
                            "{} {}: {:.2} s; ack p99 {:.2} ms outside, {:.2} ms during",
                            row.name,
                            i + 1,
                            t.secs,
                            l.without.p99,
                            l.during.p99
                        );
                        row.runs.push(t);
                        row.load.push(l);
                    }
                    r.rows.push(row);
                }
            }
        }
        drop(server);
    }
    r.load_average_after = load_average();
    print_report(&r);
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if !o.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|o| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?
            .block_on(run(o))
    });
    if let Err(e) = result {
        eprintln!("backup bench: {e}");
        std::process::exit(1);
    }
}
