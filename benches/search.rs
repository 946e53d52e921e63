//! Message search under load, end to end over HTTP against the real binary.
//!
//! 1. **Seed** a temporary data directory through confab's own
//!    `GroupCommitWriter` (the real write path: seq assignment, `client_id`
//!    dedup, `message_log`): `--users` users (default 500) each in exactly
//!    `--rooms-per-user` group rooms (20; groups of `--group-size` 5, so 2,000
//!    groups), `--others` more users (2,000) in `--direct-rooms` direct rooms
//!    (4,000), and `--messages` messages (1,000,000) from the generator in
//!    `search/corpus.rs` (mixed Korean/English, realistic lengths, Zipf
//!    vocabulary), 60% in groups and 40% in direct rooms, rooms weighted
//!    log-normally (a few busy rooms, many quiet ones).
//! 2. **Start** `confab serve` on it. The index does not exist yet, so the
//!    indexer catches up from zero: the time until
//!    `confab_search_index_lag_messages` is 0 gives the indexing throughput.
//!    Then the index size on disk, total and per message.
//! 3. **Load**, for `--duration` s (60): `--senders` (100) of the group users
//!    send `--rate` (5,000) generated messages per second in total over
//!    WebSockets, open-loop, into their rooms (send→ack measured from the
//!    scheduled time); meanwhile
//!    - searches: `--qps` (30) queries per second, open-loop over keep-alive
//!      HTTP, as four other group users (20 rooms each): one Korean word, one
//!      English word, two words, a quoted phrase, one Korean syllable; a
//!      quarter with a room filter, a quarter sorted by time; latency from
//!      the scheduled time to the whole answer read;
//!    - freshness probes: every `--probe-ms` (200) one of those users POSTs a
//!      message with a unique word to one of its rooms; the 201 is the ack;
//!      a poller searches every `--poll-ms` (20) for the probes' common word
//!      (newest first) and records ack→found;
//!    - the indexer's lag (`/metrics`) every second.
//! 4. `--runs` (default `1000,500,off`) restarts the server for each run:
//!    `index_commit_ms` 1000 (the default) and 500 for comparison, and `off`
//!    (`search_enabled=false`, the same ingest without searches: the
//!    baseline for what search costs the message path).
//!
//! Prints a results table and a pass/fail line per target. To say where the
//! time goes the table also has the server's own search and commit times
//! (`/metrics`), CPU and bytes written per group of server threads
//! (`/proc/PID/task`), and the CPU of everything else on the machine during
//! each run (a warning when it is not ~0: the figures are then skewed). Run with
//! `cargo bench --bench search` (about 5 minutes on 2 cores) or
//! `cargo bench --bench search -- --quick` (50,000 messages, < 1 minute);
//! `-- --help` lists the flags. `--dir D` keeps the data directory and reuses
//! it when it was seeded before (`--reindex` deletes its index first);
//! `CONFAB_BIN` runs another server binary than the one cargo built.

#[path = "search/corpus.rs"]
mod corpus;
#[path = "search/http.rs"]
mod http;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use confab::config::StoreConfig;
use confab::hub::Hub;
use confab::ids::{RoomId, UserId};
use confab::store::Store;
use confab::writes::{GroupCommitWriter, Op, Origin, WriterHandle};
use corpus::{Corpus, QueryKind};
use http::{Conn, Pool};

const PASSWORD: &str = "bench-password-1";
const MANIFEST: &str = "bench-seed.json";
/// Users whose searches are measured (the first is also the probe user).
const SEARCHERS: usize = 4;
/// Sends to the writer in flight while seeding.
const SEED_WINDOW: usize = 20_000;
/// Most searches / probes in flight at once (keeps the load bounded).
const MAX_SEARCHES_IN_FLIGHT: usize = 64;
const MAX_PROBES_IN_FLIGHT: usize = 16;
/// A probe not found this long after its ack counts as lost.
const PROBE_GIVE_UP: Duration = Duration::from_secs(30);
/// After this long, a probe is also looked for by its own word (it may have
/// dropped out of the newest 50).
const PROBE_OWN_QUERY_AFTER: Duration = Duration::from_secs(5);

// Targets (the issue).
const TARGET_SEARCH_P99_MS: f64 = 20.0;
const TARGET_FRESH_P99_MS: f64 = 1500.0;

#[derive(Clone, Debug)]
struct Opts {
    messages: u64,
    users: usize,
    rooms_per_user: usize,
    group_size: usize,
    others: usize,
    direct_rooms: usize,
    rate: u64,
    duration: u64,
    senders: usize,
    qps: f64,
    probe_ms: u64,
    poll_ms: u64,
    /// Server starts, each with one load run.
    runs: Vec<RunSpec>,
    dir: Option<PathBuf>,
    reindex: bool,
    json: Option<PathBuf>,
    seed: u64,
}

impl Opts {
    fn full() -> Opts {
        Opts {
            messages: 1_000_000,
            users: 500,
            rooms_per_user: 20,
            group_size: 5,
            others: 2000,
            direct_rooms: 4000,
            rate: 5000,
            duration: 60,
            senders: 100,
            qps: 30.0,
            probe_ms: 200,
            poll_ms: 20,
            runs: vec![RunSpec::search(1000), RunSpec::search(500), RunSpec::OFF],
            dir: None,
            reindex: false,
            json: None,
            seed: 42,
        }
    }

    fn quick() -> Opts {
        Opts {
            messages: 50_000,
            users: 100,
            others: 400,
            direct_rooms: 800,
            duration: 15,
            senders: 50,
            runs: vec![RunSpec::search(1000)],
            ..Opts::full()
        }
    }
}

const USAGE: &str = "cargo bench --bench search -- [--quick] [flags]
  --messages N          messages seeded (1000000; --quick 50000)
  --users N             group users, each in --rooms-per-user groups (500; quick 100)
  --rooms-per-user N    (20)            --group-size N (5)
  --others N            users in direct rooms only (2000; quick 400)
  --direct-rooms N      (4000; quick 800)
  --rate N              ingest msgs/s over WebSockets (5000)
  --duration S          seconds of load (60; quick 15)
  --senders N           sending connections (100; quick 50)
  --qps N               measured searches per second (30)
  --probe-ms N          freshness probe interval (200)   --poll-ms N (20)
  --runs LIST           one server start and load run per item: an index_commit_ms,
                        or `off` (search_enabled=false, ingest only: the baseline);
                        MS/index-only: no searches or probes; MS/nice: the server's
                        indexing threads at nice 10; MS/writer-prio: its store writer
                        at nice -5; MS/search-nice: the threads searches run on at
                        nice 5 (1000,500,off; quick: 1000)
  --dir D               keep the data directory in D (reused if already seeded)
  --reindex             with --dir: delete D/search first, to measure the catch-up again
  --json FILE           write the results as JSON
  --seed N              RNG seed (42)";

fn parse_args() -> Result<Opts, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = if args.iter().any(|a| a == "--quick") {
        Opts::quick()
    } else {
        Opts::full()
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
        }
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" | "--quick" => {}
            "--messages" => o.messages = num(flag, value()?)?,
            "--users" => o.users = num(flag, value()?)?,
            "--rooms-per-user" => o.rooms_per_user = num(flag, value()?)?,
            "--group-size" => o.group_size = num(flag, value()?)?,
            "--others" => o.others = num(flag, value()?)?,
            "--direct-rooms" => o.direct_rooms = num(flag, value()?)?,
            "--rate" => o.rate = num(flag, value()?)?,
            "--duration" => o.duration = num(flag, value()?)?,
            "--senders" => o.senders = num(flag, value()?)?,
            "--qps" => o.qps = num(flag, value()?)?,
            "--probe-ms" => o.probe_ms = num(flag, value()?)?,
            "--poll-ms" => o.poll_ms = num(flag, value()?)?,
            "--runs" => {
                o.runs = value()?
                    .split(',')
                    .map(RunSpec::parse)
                    .collect::<Result<_, _>>()?;
            }
            "--dir" => o.dir = Some(PathBuf::from(value()?)),
            "--reindex" => o.reindex = true,
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--seed" => o.seed = num(flag, value()?)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if o.users % o.group_size != 0 || o.group_size < 2 {
        return Err("--users must be a multiple of --group-size (≥ 2)".into());
    }
    if o.senders + SEARCHERS > o.users {
        return Err(format!(
            "--senders + {SEARCHERS} searchers must not exceed --users"
        ));
    }
    if o.runs.is_empty() {
        return Err("--runs is empty".into());
    }
    if o.others < 2 || o.senders == 0 || o.rate == 0 || o.qps <= 0.0 {
        return Err("--others ≥ 2, --senders, --rate and --qps > 0".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------- seeding

/// What the seeding produced, saved next to the store for reuse.
#[derive(Serialize, Deserialize)]
struct Manifest {
    messages: u64,
    rooms: usize,
    users: usize,
    seed_secs: f64,
    seed_rate: f64,
    text_bytes: u64,
    text_chars: u64,
    vocabulary: usize,
    /// The group users: name and rooms (ids).
    group_users: Vec<(String, Vec<String>)>,
}

fn store_config() -> StoreConfig {
    let mut defaults: toml::Table = confab::config::DEFAULTS
        .parse()
        .expect("the embedded config.toml parses");
    match defaults.remove("store") {
        Some(v) => v.try_into().expect("[store] of the embedded config.toml"),
        None => panic!("the embedded config.toml has a [store] table"),
    }
}

async fn create_users(
    w: &WriterHandle,
    prefix: &str,
    n: usize,
    hash: &str,
) -> Result<Vec<UserId>, String> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (w, hash, name) = (w.clone(), hash.to_string(), format!("{prefix}{i}"));
        tasks.spawn(async move {
            let u = w
                .call(|reply| Op::CreateUser {
                    username: name.clone(),
                    display_name: name,
                    password_hash: hash,
                    reply,
                })
                .await;
            (i, u)
        });
    }
    let mut ids = vec![UserId(0); n];
    while let Some(r) = tasks.join_next().await {
        let (i, u) = r.map_err(|e| e.to_string())?;
        ids[i] = u.map_err(|e| format!("create user: {e:?}"))?.id;
    }
    Ok(ids)
}

/// A room's share of the seeded messages, drawn log-normally.
fn lognormal(rng: &mut StdRng, sigma: f64) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (sigma * z).exp()
}

async fn seed(dir: &Path, o: &Opts, corpus: &Corpus, rng: &mut StdRng) -> Result<Manifest, String> {
    let started = Instant::now();
    let store = Store::open(dir)?;
    let (w, join) = GroupCommitWriter::spawn(store, Arc::new(Hub::default()), store_config(), 1024)
        .map_err(|e| format!("writer thread: {e}"))?;
    let salt = SaltString::encode_b64(&rng.random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    let hash = argon2::Argon2::default()
        .hash_password(PASSWORD.as_bytes(), &salt)
        .map_err(|e| e.to_string())?
        .to_string();

    let group_users = create_users(&w, "sb", o.users, &hash).await?;
    let others = create_users(&w, "ob", o.others, &hash).await?;

    // Groups: in each round, a shuffle of the group users cut into groups,
    // so everyone ends up in exactly rooms_per_user groups.
    let mut rooms: Vec<(RoomId, Vec<UserId>)> = Vec::new();
    let mut rooms_of: Vec<Vec<RoomId>> = vec![Vec::new(); o.users];
    for round in 0..o.rooms_per_user {
        let mut order: Vec<usize> = (0..o.users).collect();
        order.shuffle(rng);
        let mut tasks = tokio::task::JoinSet::new();
        for (g, chunk) in order.chunks(o.group_size).enumerate() {
            let members: Vec<UserId> = chunk.iter().map(|&i| group_users[i]).collect();
            let (w, chunk) = (w.clone(), chunk.to_vec());
            tasks.spawn(async move {
                let room = w
                    .call(|reply| Op::CreateGroup {
                        owner: members[0],
                        name: format!("group {round}.{g}"),
                        members: members[1..].to_vec(),
                        reply,
                    })
                    .await;
                (chunk, members, room)
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (chunk, members, room) = r.map_err(|e| e.to_string())?;
            let room = room.map_err(|e| format!("create group: {e:?}"))?.id;
            for i in chunk {
                rooms_of[i].push(room);
            }
            rooms.push((room, members));
        }
    }
    let groups = rooms.len();
    let mut seen = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..o.direct_rooms {
        let a = rng.random_range(0..o.others);
        let b = (a + rng.random_range(1..o.others)) % o.others;
        let (a, b, w) = (others[a], others[b], w.clone());
        tasks.spawn(async move { (a, b, w.call(|reply| Op::CreateDirect { a, b, reply }).await) });
    }
    while let Some(r) = tasks.join_next().await {
        let (a, b, room) = r.map_err(|e| e.to_string())?;
        let room = room.map_err(|e| format!("create direct room: {e:?}"))?.0.id;
        if seen.insert(room) {
            rooms.push((room, vec![a, b]));
        }
    }
    eprintln!(
        "seed: {} users, {groups} groups, {} direct rooms in {:.1} s",
        o.users + o.others,
        rooms.len() - groups,
        started.elapsed().as_secs_f64()
    );

    // Message weights: 60% to groups, 40% to direct rooms, log-normal within.
    let mut weights: Vec<f64> = rooms.iter().map(|_| lognormal(rng, 1.0)).collect();
    let (gsum, dsum): (f64, f64) = (
        weights[..groups].iter().sum(),
        weights[groups..].iter().sum(),
    );
    for (i, wt) in weights.iter_mut().enumerate() {
        *wt *= if i < groups { 0.6 / gsum } else { 0.4 / dsum };
    }
    let mut acc = 0.0;
    let cdf: Vec<f64> = weights
        .iter()
        .map(|w| {
            acc += w;
            acc
        })
        .collect();

    let msg_started = Instant::now();
    let mut pending = VecDeque::with_capacity(SEED_WINDOW);
    let (mut text_bytes, mut text_chars) = (0u64, 0u64);
    for i in 0..o.messages {
        let x = rng.random::<f64>() * acc;
        let r = cdf.partition_point(|&c| c < x).min(rooms.len() - 1);
        let (room, members) = &rooms[r];
        let from = *members.choose(rng).expect("rooms have members");
        let text = corpus.message(rng);
        text_bytes += text.len() as u64;
        text_chars += text.chars().count() as u64;
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.submit(Op::Send {
            room: *room,
            from,
            client_id: format!("seed-{i}"),
            text,
            origin: Origin::Http(tx),
            received: Instant::now(),
        })
        .await
        .map_err(|e| format!("submit: {e:?}"))?;
        pending.push_back(rx);
        if pending.len() >= SEED_WINDOW
            && let Some(rx) = pending.pop_front()
        {
            settle(rx).await?;
        }
        if (i + 1) % 100_000 == 0 {
            eprint!(
                "\rseed: {} messages, {:.0}/s   ",
                i + 1,
                (i + 1) as f64 / msg_started.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(rx) = pending.pop_front() {
        settle(rx).await?;
    }
    let msg_secs = msg_started.elapsed().as_secs_f64();
    drop(w);
    tokio::task::spawn_blocking(move || join.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the writer thread panicked".to_string())?;
    eprintln!();
    let manifest = Manifest {
        messages: o.messages,
        rooms: rooms.len(),
        users: o.users + o.others,
        seed_secs: started.elapsed().as_secs_f64(),
        seed_rate: o.messages as f64 / msg_secs,
        text_bytes,
        text_chars,
        vocabulary: corpus.vocabulary(),
        group_users: (0..o.users)
            .map(|i| {
                (
                    format!("sb{i}"),
                    rooms_of[i].iter().map(|r| r.to_string()).collect(),
                )
            })
            .collect(),
    };
    let text = serde_json::to_string(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(MANIFEST), text).map_err(|e| format!("write manifest: {e}"))?;
    Ok(manifest)
}

type SendReply =
    tokio::sync::oneshot::Receiver<Result<(confab::store::Message, bool), confab::error::ApiError>>;

async fn settle(rx: SendReply) -> Result<(), String> {
    match rx.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("seed send refused: {e:?}")),
        Err(_) => Err("the writer dropped a seed send".into()),
    }
}

// ---------------------------------------------------------------- server

/// One server start and load run.
#[derive(Clone, Copy, Debug)]
struct RunSpec {
    commit_ms: u64,
    /// false: `search_enabled=false` and only the ingest (the baseline).
    search: bool,
    /// false: no searches and no probes (the index is still fed): what
    /// indexing alone costs.
    queries: bool,
    /// An experiment: the nice value given to the server's indexing threads
    /// (the indexer, tantivy's indexing, merge and segment-updater threads).
    nice: i32,
    /// An experiment: the nice value given to the server's store writer
    /// thread (negative = ahead of everything else; needs root).
    writer_nice: i32,
    /// An experiment: the nice value given to tokio's blocking-pool threads
    /// in the server, where searches run (re-applied every 100 ms, as the
    /// pool starts threads on demand).
    search_nice: i32,
}

impl RunSpec {
    const OFF: RunSpec = RunSpec {
        commit_ms: 1000,
        search: false,
        queries: false,
        nice: 0,
        writer_nice: 0,
        search_nice: 0,
    };

    fn search(commit_ms: u64) -> RunSpec {
        RunSpec {
            commit_ms,
            search: true,
            queries: true,
            nice: 0,
            writer_nice: 0,
            search_nice: 0,
        }
    }

    /// `off`, `MS`, `MS/nice` (indexing threads at nice 10),
    /// `MS/writer-prio` (the store writer at nice -5), `MS/search-nice` (the
    /// blocking pool, where searches run, at nice 5) or `MS/index-only` (no
    /// searches or probes).
    fn parse(item: &str) -> Result<RunSpec, String> {
        let bad = || {
            format!(
                "--runs: cannot read `{item}` (off, MS, MS/nice, MS/writer-prio, MS/search-nice or MS/index-only)"
            )
        };
        let item = item.trim();
        if item == "off" {
            return Ok(RunSpec::OFF);
        }
        let (ms, variant) = item.split_once('/').unwrap_or((item, ""));
        let run = RunSpec::search(ms.parse().map_err(|_| bad())?);
        match variant {
            "" => Ok(run),
            "nice" => Ok(RunSpec { nice: 10, ..run }),
            "writer-prio" => Ok(RunSpec {
                writer_nice: -5,
                ..run
            }),
            "search-nice" => Ok(RunSpec {
                search_nice: 5,
                ..run
            }),
            "index-only" => Ok(RunSpec {
                queries: false,
                ..run
            }),
            _ => Err(bad()),
        }
    }

    fn label(&self) -> String {
        let mut label = if self.search {
            format!("index_commit_ms={}", self.commit_ms)
        } else {
            "baseline: search_enabled=false, ingest only".to_string()
        };
        if self.search && !self.queries {
            label.push_str(", indexing only (no searches)");
        }
        if self.nice != 0 {
            label.push_str(&format!(", indexing threads nice {}", self.nice));
        }
        if self.writer_nice != 0 {
            label.push_str(&format!(", store writer nice {}", self.writer_nice));
        }
        if self.search_nice != 0 {
            label.push_str(&format!(", search threads nice {}", self.search_nice));
        }
        label
    }
}

/// The server's indexing threads (by name).
const INDEXING_THREADS: [&str; 5] = [
    "confab-indexer",
    "segment_updater",
    "merge_thread",
    "thrd-tantivy",
    "docstore",
];

/// Gives the server's threads whose names start with one of `names` the
/// nice value `nice`; returns how many. Threads they start later inherit it.
fn renice(pid: u32, names: &[&str], nice: i32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut n = 0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        if names.iter().any(|name| comm.starts_with(name)) {
            // SAFETY: setpriority(2) on a thread id of our own child.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } == 0 {
                n += 1;
            }
        }
    }
    n
}

/// The server's threads, grouped by what they do.
fn thread_group(comm: &str) -> &'static str {
    const GROUPS: [(&str, &str); 7] = [
        ("confab-writer", "store writer"),
        ("tokio-rt-worker", "tokio (network, JSON, search queries)"),
        ("confab-indexer", "indexing"),
        ("thrd-tantivy", "indexing"),
        ("docstore", "indexing"),
        ("merge_thread", "index merges"),
        ("segment_updater", "index merges"),
    ];
    GROUPS
        .iter()
        .find(|(prefix, _)| comm.starts_with(prefix))
        .map(|(_, group)| *group)
        .unwrap_or("other")
}

/// Per thread of `pid`: (group, CPU seconds, bytes written to storage).
fn thread_stats(pid: u32) -> HashMap<u32, (&'static str, f64, u64)> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" closing the name: state is the 3rd field, so
        // utime (14th) and stime (15th) are the 12th and 13th here.
        let after: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| after.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        let io = std::fs::read_to_string(task.path().join("io")).unwrap_or_default();
        let written = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.insert(tid, (thread_group(comm.trim()), ticks / 100.0, written));
    }
    out
}

/// Per group: (cores, MB/s written) between two snapshots `secs` apart.
fn thread_deltas(
    before: &HashMap<u32, (&'static str, f64, u64)>,
    after: &HashMap<u32, (&'static str, f64, u64)>,
    secs: f64,
) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (tid, (group, cpu, written)) in after {
        let (cpu0, written0) = before.get(tid).map(|b| (b.1, b.2)).unwrap_or((0.0, 0));
        let e = out.entry(group.to_string()).or_default();
        e.0 += (cpu - cpu0) / secs;
        e.1 += written.saturating_sub(written0) as f64 / 1e6 / secs;
    }
    out
}

/// A `kB` line of /proc/PID/status.
fn rss_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Gives tokio's blocking-pool threads of `pid` the nice value `nice`: the
/// threads named like the runtime's, except the first `workers` (the async
/// workers, started first).
fn renice_blocking_pool(pid: u32, workers: usize, nice: i32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    let mut tids: Vec<u32> = tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("tokio-rt-worker"))
        })
        .filter_map(|t| t.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    tids.sort_unstable();
    for tid in tids.into_iter().skip(workers) {
        // SAFETY: setpriority(2) on a thread id of our own child.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid, nice);
        }
    }
}

/// CPU time the whole machine spent busy (not idle or waiting), in seconds.
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …; USER_HZ is 100 on Linux.
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, t)| t)
        .sum();
    busy / 100.0
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts `confab serve` on `dir`; returns it and when it was spawned.
    fn start(dir: &Path, run: RunSpec) -> Result<(Server, Instant), String> {
        let spawned = Instant::now();
        // CONFAB_BIN: another build of the server (e.g. a copy, so that a
        // rebuild of target/ during a long run does not change it).
        let bin = std::env::var_os("CONFAB_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_confab")));
        let mut child = Command::new(bin)
            // No ./config.toml: the built-in defaults plus these settings.
            .current_dir(dir)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(["--set", "log=warn"])
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
            .args(["--set", &format!("index_commit_ms={}", run.commit_ms)])
            .args(["--set", &format!("search_enabled={}", run.search)])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start confab: {e}"))?;
        let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)
            .map_err(|e| format!("reading confab's stdout: {e}"))?;
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("unexpected first line from confab: {line:?}"))?;
        eprintln!("server pid {} listening on {addr}", child.id());
        Ok((Server { child, addr }, spawned))
    }

    /// SIGTERM and wait (the indexer commits what it has on the way out).
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        t.elapsed()
    }
}

async fn metrics_text(conn: &mut Conn) -> Result<String, String> {
    let (status, body) = conn.request(Method::GET, "/metrics", None, None).await?;
    if status != StatusCode::OK {
        return Err(format!("/metrics: {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Sizes of the files under `dir`: (allocated as `du` counts, apparent).
fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => {
                    let (a, b) = dir_size(&e.path());
                    total.0 += a;
                    total.1 += b;
                }
                Ok(m) => {
                    total.0 += m.blocks() * 512;
                    total.1 += m.len();
                }
                Err(_) => {}
            }
        }
    }
    total
}

#[derive(Serialize, Clone, Default)]
struct CatchUp {
    messages: f64,
    secs: f64,
    rate: f64,
    /// Server CPU over the catch-up, in cores.
    cores: f64,
    index_bytes: u64,
    index_apparent_bytes: u64,
}

/// Waits until the index has everything the store has (lag 0). The lag
/// gauge reads 0 from the start until the indexer's first commit, so with a
/// new index (`fresh`: the store's `messages`) this also waits until that
/// many were indexed; with an existing one, at least 2 s.
async fn wait_caught_up(
    server: &Server,
    spawned: Instant,
    dir: &Path,
    fresh: Option<u64>,
) -> Result<CatchUp, String> {
    let mut conn = Conn::open(server.addr).await?;
    let mut last_print = Instant::now();
    loop {
        let text = metrics_text(&mut conn).await?;
        let lag = http::metric(&text, "confab_search_index_lag_messages");
        let indexed = http::metric(&text, "confab_search_indexed_total").unwrap_or(0.0);
        let done = match fresh {
            Some(n) => indexed >= n as f64,
            None => spawned.elapsed() >= Duration::from_secs(2),
        };
        if lag == Some(0.0) && done {
            let secs = spawned.elapsed().as_secs_f64();
            let cpu = http::metric(&text, "confab_process_cpu_seconds_total").unwrap_or(0.0);
            let (bytes, apparent) = dir_size(&dir.join("search"));
            return Ok(CatchUp {
                messages: indexed,
                secs,
                rate: indexed / secs,
                cores: cpu / secs,
                index_bytes: bytes,
                index_apparent_bytes: apparent,
            });
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "catch-up: {indexed:.0} indexed, lag {:.0}, {:.0} s",
                lag.unwrap_or(f64::NAN),
                spawned.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn login(pool: &Pool, name: &str) -> Result<(String, UserId), String> {
    let mut conn = pool.take().await?;
    let v = conn
        .json(
            Method::POST,
            "/api/v1/login",
            None,
            Some(&json!({"username": name, "password": PASSWORD})),
        )
        .await?;
    pool.put(conn);
    let token = v["token"].as_str().ok_or("login: no token")?.to_string();
    let id = v["user"]["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or("login: no user id")?;
    Ok((token, id))
}

// ---------------------------------------------------------------- load

/// Latency histogram in microseconds, 1 µs .. 10 min.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

#[derive(Serialize, Clone, Default)]
struct Percentiles {
    count: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |v: u64| v as f64 / 1000.0;
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    let us = (d.as_micros() as u64).max(1);
    let _ = h.lock().unwrap_or_else(|e| e.into_inner()).record(us);
}

/// A user whose searches (or probes) are measured.
#[derive(Clone)]
struct Searcher {
    token: String,
    rooms: Vec<String>,
}

#[derive(Serialize, Clone)]
struct LoadResult {
    #[serde(skip)]
    run: RunSpec,
    commit_ms: u64,
    search_enabled: bool,
    nice: i32,
    duration_secs: f64,
    ingest_sent: u64,
    ingest_acked: u64,
    ingest_errors: u64,
    ingest_rate: f64,
    /// Messages the server stored and deduplicated in the window.
    stored: f64,
    deduplicated: f64,
    ingest_ack_ms: Percentiles,
    /// send→ack p99 per 10 s of the run, ms.
    ingest_ack_p99_by_10s: Vec<f64>,
    searches: Percentiles,
    search_errors: u64,
    search_by_kind: BTreeMap<String, Percentiles>,
    search_by_shape: BTreeMap<String, Percentiles>,
    /// Share of measured searches with no hit, and the median `total`.
    zero_hit_share: f64,
    median_total: u64,
    /// The server's own time per search (histogram buckets: upper bounds).
    server_search_mean_ms: f64,
    server_search_p99_le_ms: f64,
    /// Searches the server answered in the window (measured + polls).
    server_searches: f64,
    probes: u64,
    probe_ack_ms: Percentiles,
    freshness_ms: Percentiles,
    probes_lost: u64,
    probe_errors: u64,
    /// Lag samples (s, messages) once a second.
    lag: Vec<(f64, f64)>,
    lag_max: f64,
    lag_secs_max: f64,
    lag_first10_mean: f64,
    lag_last10_mean: f64,
    /// Least-squares slope of the lag over the run, messages per second.
    lag_slope: f64,
    /// After the load stopped: time until lag 0.
    drain_secs: f64,
    indexed_per_sec: f64,
    /// Index commits in the window: count, mean and p99 (bucket) duration.
    index_commits: f64,
    index_commit_mean_ms: f64,
    index_commit_p99_le_ms: f64,
    /// The store writer: commits per second, mean batch, mean commit time (ms).
    store_commits_per_sec: f64,
    store_batch_mean: f64,
    store_commit_mean_ms: f64,
    /// Messages visible to the searchers (their rooms' last seq), mean.
    searcher_room_messages: f64,
    server_cores: f64,
    server_rss_mb: f64,
    /// Of it: anonymous memory and file pages (the index's mmap'd segments).
    server_rss_anon_mb: f64,
    server_rss_file_mb: f64,
    /// CPU of this process (load generator and clients), in cores.
    bench_cores: f64,
    /// CPU of everything else on the machine during the run, in cores
    /// (should be ~0: another job beside the bench skews it).
    other_cores: f64,
    /// The server's threads by group: (cores, MB/s written to storage).
    server_threads: BTreeMap<String, (f64, f64)>,
    index_bytes_after: u64,
    /// After the server stopped: index size and messages in the store.
    index_bytes_settled: u64,
    messages_settled: u64,
}

struct Shared {
    /// Random per run: client_ids never repeat across runs on one store (a
    /// repeat would be deduplicated, not stored).
    run_id: u64,
    epoch: Instant,
    stop: AtomicBool,
    searches: Mutex<Histogram<u64>>,
    by_kind: Mutex<BTreeMap<String, Histogram<u64>>>,
    by_shape: Mutex<BTreeMap<String, Histogram<u64>>>,
    totals: Mutex<Vec<u64>>,
    search_errors: AtomicU64,
    probe_ack: Mutex<Histogram<u64>>,
    fresh: Mutex<Histogram<u64>>,
    probe_errors: AtomicU64,
    /// Probe word → when its 201 arrived (since epoch).
    inflight: Mutex<HashMap<String, Duration>>,
    /// Probe words seen by a search before their 201 arrived.
    early: Mutex<HashSet<String>>,
    probes: AtomicU64,
    ingest_sent: AtomicU64,
    ingest_acked: AtomicU64,
    ingest_errors: AtomicU64,
}

fn first_error(slot: &Mutex<Option<String>>, e: String) {
    let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
    if s.is_none() {
        eprintln!("\n(first error: {e})");
        *s = Some(e);
    }
}

#[allow(clippy::too_many_arguments)]
async fn ingest_connection(
    ws: http::Ws,
    conn: usize,
    rooms: Vec<String>,
    count: u64,
    start_us: u64,
    first_us: f64,
    interval_us: f64,
    corpus: Arc<Corpus>,
    sh: Arc<Shared>,
    stop_reading: Arc<AtomicBool>,
) -> (Histogram<u64>, Vec<Histogram<u64>>) {
    let (mut rx, mut tx) = ws.split(tokio::io::split);
    let reader = {
        let sh = sh.clone();
        tokio::spawn(async move {
            let mut acks = histogram();
            // Per 10 s of the schedule.
            let mut windows: Vec<Histogram<u64>> = Vec::new();
            loop {
                // read_frame is not cancel-safe: the loop ends with the
                // server's answer to our Close.
                let Ok(frame) = rx
                    .read_frame(&mut |_| async { Ok::<_, WebSocketError>(()) })
                    .await
                else {
                    break;
                };
                match frame.opcode {
                    OpCode::Text => {}
                    OpCode::Close => break,
                    _ => continue,
                }
                let p: &[u8] = &frame.payload;
                if p.starts_with(br#"{"type":"ack""#) {
                    let now = sh.epoch.elapsed().as_micros() as u64;
                    let v: Value = serde_json::from_slice(p).unwrap_or(Value::Null);
                    // client_id = "i{run}.{conn}.{k}.{scheduled µs}"
                    let due = v["client_id"]
                        .as_str()
                        .and_then(|c| c.rsplit('.').next())
                        .and_then(|d| d.parse::<u64>().ok());
                    if let Some(due) = due {
                        let took = now.saturating_sub(due).max(1);
                        let _ = acks.record(took);
                        let w = (due.saturating_sub(start_us) / 10_000_000) as usize;
                        if windows.len() <= w {
                            windows.resize_with(w + 1, histogram);
                        }
                        let _ = windows[w].record(took);
                        sh.ingest_acked.fetch_add(1, Ordering::Relaxed);
                    }
                } else if p.starts_with(br#"{"type":"error""#) {
                    sh.ingest_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            (acks, windows)
        })
    };
    let mut rng = StdRng::seed_from_u64(sh.run_id ^ conn as u64);
    for k in 0..count {
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let due = (first_us + interval_us * k as f64) as u64;
        let text = corpus.message(&mut rng);
        let room = rooms.choose(&mut rng).expect("senders have rooms");
        let now = sh.epoch.elapsed().as_micros() as u64;
        if due > now {
            tokio::time::sleep(Duration::from_micros(due - now)).await;
        }
        let frame = json!({"type": "send", "room": room, "client_id": format!("i{:x}.{conn}.{k}.{due}", sh.run_id), "text": text})
            .to_string();
        if tx
            .write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
            .await
            .is_err()
        {
            sh.ingest_errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        sh.ingest_sent.fetch_add(1, Ordering::Relaxed);
    }
    while !stop_reading.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tx.write_frame(Frame::close(1000, b"")).await;
    let mut reader = reader;
    match tokio::time::timeout(Duration::from_secs(5), &mut reader).await {
        Ok(Ok(h)) => h,
        _ => {
            reader.abort();
            (histogram(), Vec::new())
        }
    }
}

/// One measured search, scheduled at `due`.
#[allow(clippy::too_many_arguments)]
async fn one_search(
    pool: Pool,
    sh: Arc<Shared>,
    gate: Arc<tokio::sync::Semaphore>,
    errors: Arc<Mutex<Option<String>>>,
    due: Instant,
    path: String,
    token: String,
    kind: QueryKind,
    shape: &'static str,
) {
    let _permit = gate.acquire().await;
    let result = async {
        let mut conn = pool.take().await?;
        let (status, body) = conn.request(Method::GET, &path, Some(&token), None).await?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("{path}: {e}"))?;
        pool.put(conn);
        if status != StatusCode::OK {
            return Err(format!("{path}: {status} {v}"));
        }
        Ok::<_, String>(v["total"].as_u64().unwrap_or(0))
    }
    .await;
    let took = due.elapsed();
    match result {
        Ok(total) => {
            record(&sh.searches, took);
            let us = (took.as_micros() as u64).max(1);
            let _ = sh
                .by_kind
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(kind.name().to_string())
                .or_insert_with(histogram)
                .record(us);
            let _ = sh
                .by_shape
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(shape.to_string())
                .or_insert_with(histogram)
                .record(us);
            sh.totals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(total);
        }
        Err(e) => {
            sh.search_errors.fetch_add(1, Ordering::Relaxed);
            first_error(&errors, e);
        }
    }
}

/// One freshness probe: POST a message with a unique word; its 201 is the ack.
#[allow(clippy::too_many_arguments)]
async fn one_probe(
    pool: Pool,
    sh: Arc<Shared>,
    gate: Arc<tokio::sync::Semaphore>,
    errors: Arc<Mutex<Option<String>>>,
    user: Searcher,
    k: u64,
    word: String,
    room: String,
) {
    let _permit = gate.acquire().await;
    let sent = Instant::now();
    let result = async {
        let mut conn = pool.take().await?;
        let body = json!({"text": format!("freshprobe {word} 확인용 메시지 {k}"), "client_id": format!("probe-{word}")});
        let (status, bytes) = conn
            .request(
                Method::POST,
                &format!("/api/v1/rooms/{room}/messages"),
                Some(&user.token),
                Some(body.to_string()),
            )
            .await?;
        pool.put(conn);
        if status != StatusCode::CREATED {
            return Err(format!(
                "probe: {status} {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        Ok::<_, String>(())
    }
    .await;
    match result {
        Ok(()) => {
            let acked = sh.epoch.elapsed();
            record(&sh.probe_ack, sent.elapsed());
            sh.probes.fetch_add(1, Ordering::Relaxed);
            if sh
                .early
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&word)
            {
                // Already searchable when the 201 arrived.
                record(&sh.fresh, Duration::ZERO);
            } else {
                sh.inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(word, acked);
            }
        }
        Err(e) => {
            sh.probe_errors.fetch_add(1, Ordering::Relaxed);
            first_error(&errors, e);
        }
    }
}

/// Searches for the probes until each is found; ends after `stop` once
/// nothing is in flight (or what is left is given up).
async fn poll_probes(
    addr: SocketAddr,
    sh: Arc<Shared>,
    user: Searcher,
    every: Duration,
    errors: Arc<Mutex<Option<String>>>,
) -> u64 {
    let mut conn = None;
    let mut lost = 0u64;
    let mut next = Instant::now();
    let mut stop_seen: Option<Instant> = None;
    loop {
        next += every;
        tokio::time::sleep_until(next.into()).await;
        if sh.stop.load(Ordering::Relaxed) && stop_seen.is_none() {
            stop_seen = Some(Instant::now());
        }
        let oldest = {
            let inflight = sh.inflight.lock().unwrap_or_else(|e| e.into_inner());
            inflight
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(w, at)| (w.clone(), *at))
        };
        let Some((oldest_word, oldest_at)) = oldest else {
            if stop_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                return lost;
            }
            continue;
        };
        let now = sh.epoch.elapsed();
        if now.saturating_sub(oldest_at) > PROBE_GIVE_UP {
            sh.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&oldest_word);
            lost += 1;
            continue;
        }
        let mut queries = vec!["freshprobe".to_string()];
        if now.saturating_sub(oldest_at) > PROBE_OWN_QUERY_AFTER {
            queries.push(oldest_word);
        }
        for q in queries {
            let path = format!("/api/v1/search?q={}&sort=time&limit=50", http::encode(&q));
            if conn.is_none() {
                match Conn::open(addr).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        first_error(&errors, e);
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let answer = c.request(Method::GET, &path, Some(&user.token), None).await;
            let found_at = sh.epoch.elapsed();
            let v: Value = match answer {
                Ok((StatusCode::OK, body)) => serde_json::from_slice(&body).unwrap_or(Value::Null),
                Ok((status, _)) => {
                    first_error(&errors, format!("probe search: {status}"));
                    continue;
                }
                Err(e) => {
                    conn = None;
                    first_error(&errors, e);
                    continue;
                }
            };
            let hits = v["hits"].as_array().cloned().unwrap_or_default();
            let mut inflight = sh.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for h in hits {
                let Some(word) = h["text"].as_str().and_then(|t| t.split(' ').nth(1)) else {
                    continue;
                };
                if let Some(acked) = inflight.remove(word) {
                    record(&sh.fresh, found_at.saturating_sub(acked));
                } else if !sh.stop.load(Ordering::Relaxed) {
                    // Maybe not acked yet; bounded by the probes in flight.
                    let mut early = sh.early.lock().unwrap_or_else(|e| e.into_inner());
                    if early.len() < 10_000 {
                        early.insert(word.to_string());
                    }
                }
            }
        }
    }
}

/// Deltas of a Prometheus histogram's buckets between two scrapes.
fn bucket_deltas(before: &str, after: &str, name: &str) -> Vec<(f64, f64)> {
    let parse = |text: &str| -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, rest) = rest.split_once("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, rest.trim().parse().ok()?))
            })
            .collect()
    };
    let b = parse(before);
    parse(after)
        .into_iter()
        .map(|(le, n)| {
            let was = b
                .iter()
                .find(|(l, _)| *l == le)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (le, n - was)
        })
        .collect()
}

/// The upper bound (ms) of the bucket holding the 99th percentile of a
/// Prometheus histogram between two scrapes.
fn p99_le(before: &str, after: &str, name: &str) -> f64 {
    let buckets = bucket_deltas(before, after, name);
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets
        .iter()
        .find(|(_, c)| total > 0.0 && *c >= 0.99 * total)
        .map(|(le, _)| le * 1000.0)
        .unwrap_or(f64::NAN)
}

/// CPU time of this process so far (user + system), in seconds.
fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass it.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

#[allow(clippy::too_many_arguments)]
async fn load(
    server: &Server,
    dir: &Path,
    o: &Opts,
    run: RunSpec,
    corpus: Arc<Corpus>,
    senders: &[(String, Vec<String>)],
    searchers: &[Searcher],
    rng: &mut StdRng,
) -> Result<LoadResult, String> {
    let addr = server.addr;
    let errors = Arc::new(Mutex::new(None::<String>));
    // Connect the senders first; the schedule starts when all are in.
    let mut wss = Vec::with_capacity(senders.len());
    for (token, _) in senders {
        wss.push(http::websocket(addr, token).await?);
    }
    let mut mconn = Conn::open(addr).await?;
    let mut visible = 0u64;
    for user in searchers {
        let v = mconn
            .json(Method::GET, "/api/v1/rooms", Some(&user.token), None)
            .await?;
        for room in v["rooms"].as_array().into_iter().flatten() {
            visible += room["last_seq"].as_u64().unwrap_or(0);
        }
    }
    let before = metrics_text(&mut mconn).await?;
    let cpu_before = self_cpu_secs();
    let threads_before = thread_stats(server.child.id());
    let machine_before = machine_busy_secs();
    let sh = Arc::new(Shared {
        // Not from the seeded RNG: a reused --dir has this run's
        // predecessors in it.
        run_id: rand::random(),
        epoch: Instant::now(),
        stop: AtomicBool::new(false),
        searches: Mutex::new(histogram()),
        by_kind: Mutex::new(BTreeMap::new()),
        by_shape: Mutex::new(BTreeMap::new()),
        totals: Mutex::new(Vec::new()),
        search_errors: AtomicU64::new(0),
        probe_ack: Mutex::new(histogram()),
        fresh: Mutex::new(histogram()),
        probe_errors: AtomicU64::new(0),
        inflight: Mutex::new(HashMap::new()),
        early: Mutex::new(HashSet::new()),
        probes: AtomicU64::new(0),
        ingest_sent: AtomicU64::new(0),
        ingest_acked: AtomicU64::new(0),
        ingest_errors: AtomicU64::new(0),
    });
    let stop_reading = Arc::new(AtomicBool::new(false));
    let start_us = sh.epoch.elapsed().as_micros() as f64 + 200_000.0;
    let n = wss.len();
    let interval_us = 1e6 * n as f64 / o.rate as f64;
    let per_conn = o.rate * o.duration / n as u64;
    let mut ingest = Vec::with_capacity(n);
    for (i, ws) in wss.into_iter().enumerate() {
        ingest.push(tokio::spawn(ingest_connection(
            ws,
            i,
            senders[i].1.clone(),
            per_conn,
            start_us as u64,
            start_us + interval_us * i as f64 / n as f64,
            interval_us,
            corpus.clone(),
            sh.clone(),
            stop_reading.clone(),
        )));
    }
    let t0 = Instant::now() + Duration::from_micros(200_000);
    tokio::time::sleep_until(t0.into()).await;

    // Measured searches, open-loop.
    let search_pool = Pool::new(addr);
    let search_gate = Arc::new(tokio::sync::Semaphore::new(MAX_SEARCHES_IN_FLIGHT));
    let scheduler = run.queries.then(|| {
        let (sh, pool, gate, errors, corpus) = (
            sh.clone(),
            search_pool.clone(),
            search_gate.clone(),
            errors.clone(),
            corpus.clone(),
        );
        let searchers = searchers.to_vec();
        let mut rng = StdRng::seed_from_u64(rng.random());
        let every = Duration::from_secs_f64(1.0 / o.qps);
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut due = t0;
            let mut k = 0usize;
            while !sh.stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(due.into()).await;
                let user = &searchers[k % searchers.len()];
                let kind = QueryKind::ALL[rng.random_range(0..QueryKind::ALL.len())];
                let q = corpus.query(&mut rng, kind);
                let mut path = format!("/api/v1/search?q={}&limit=20", http::encode(&q));
                let mut shape = "all rooms, relevance";
                if rng.random_bool(0.25) {
                    let room = user.rooms.choose(&mut rng).expect("searchers have rooms");
                    path.push_str(&format!("&room={room}"));
                    shape = "one room, relevance";
                }
                if rng.random_bool(0.25) {
                    path.push_str("&sort=time");
                    shape = if shape.starts_with("one") {
                        "one room, by time"
                    } else {
                        "all rooms, by time"
                    };
                }
                tasks.spawn(one_search(
                    pool.clone(),
                    sh.clone(),
                    gate.clone(),
                    errors.clone(),
                    due,
                    path,
                    user.token.clone(),
                    kind,
                    shape,
                ));
                while tasks.try_join_next().is_some() {}
                k += 1;
                due += every;
            }
            while tasks.join_next().await.is_some() {}
        })
    });

    // Freshness probes and their poller.
    let prober = run.queries.then(|| {
        let (sh, errors) = (sh.clone(), errors.clone());
        let user = searchers[0].clone();
        let pool = Pool::new(addr);
        let gate = Arc::new(tokio::sync::Semaphore::new(MAX_PROBES_IN_FLIGHT));
        // Probe words must be new to the store, also in a reused --dir.
        let mut rng = StdRng::seed_from_u64(rand::random());
        let every = Duration::from_millis(o.probe_ms);
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut due = t0;
            let mut k = 0u64;
            while !sh.stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(due.into()).await;
                let word: String = (0..10)
                    .map(|i| {
                        if i < 2 {
                            'q'
                        } else {
                            rng.random_range(b'a'..=b'z') as char
                        }
                    })
                    .collect();
                let room = user.rooms.choose(&mut rng).expect("rooms").clone();
                tasks.spawn(one_probe(
                    pool.clone(),
                    sh.clone(),
                    gate.clone(),
                    errors.clone(),
                    user.clone(),
                    k,
                    word,
                    room,
                ));
                while tasks.try_join_next().is_some() {}
                k += 1;
                due += every;
            }
            while tasks.join_next().await.is_some() {}
        })
    });
    let poller = run.queries.then(|| {
        tokio::spawn(poll_probes(
            addr,
            sh.clone(),
            searchers[0].clone(),
            Duration::from_millis(o.poll_ms),
            errors.clone(),
        ))
    });

    // The search-nice experiment: keep the blocking pool reniced.
    let renicer = (run.search_nice != 0).then(|| {
        let (sh, pid, nice) = (sh.clone(), server.child.id(), run.search_nice);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::spawn(async move {
            while !sh.stop.load(Ordering::Relaxed) {
                renice_blocking_pool(pid, workers, nice);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    // Lag once a second, and progress.
    let mut lag = Vec::new();
    let mut lag_secs_max = 0f64;
    let end = t0 + Duration::from_secs(o.duration);
    let mut tick = t0;
    while tick < end {
        tick += Duration::from_secs(1);
        tokio::time::sleep_until(tick.into()).await;
        let text = metrics_text(&mut mconn).await?;
        let l = http::metric(&text, "confab_search_index_lag_messages").unwrap_or(f64::NAN);
        let ls = http::metric(&text, "confab_search_index_lag_seconds").unwrap_or(0.0);
        lag_secs_max = lag_secs_max.max(ls);
        let t = t0.elapsed().as_secs_f64();
        if run.search {
            lag.push((t, l));
        }
        if (t.round() as u64).is_multiple_of(5) {
            let s = percentiles(&sh.searches.lock().unwrap_or_else(|e| e.into_inner()));
            let f = percentiles(&sh.fresh.lock().unwrap_or_else(|e| e.into_inner()));
            eprintln!(
                "t={t:>3.0}s sent={} acked={} lag={l:.0} searches={} p99={:.1} ms fresh={} p99={:.0} ms",
                sh.ingest_sent.load(Ordering::Relaxed),
                sh.ingest_acked.load(Ordering::Relaxed),
                s.count,
                s.p99,
                f.count,
                f.p99
            );
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let after = metrics_text(&mut mconn).await?;

    let cpu_after = self_cpu_secs();
    let threads_after = thread_stats(server.child.id());
    let machine_after = machine_busy_secs();
    // Drain: until the index has everything.
    let drain_secs = if run.search {
        loop {
            let text = metrics_text(&mut mconn).await?;
            if http::metric(&text, "confab_search_index_lag_messages") == Some(0.0)
                || stopped.elapsed() > Duration::from_secs(120)
            {
                break stopped.elapsed().as_secs_f64();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    } else {
        0.0
    };
    // Outstanding acks, up to 5 s.
    let expected = sh.ingest_sent.load(Ordering::Relaxed);
    let wait_acks = Instant::now();
    while sh.ingest_acked.load(Ordering::Relaxed) + sh.ingest_errors.load(Ordering::Relaxed)
        < expected
        && wait_acks.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_reading.store(true, Ordering::Relaxed);
    let mut acks = histogram();
    let mut windows: Vec<Histogram<u64>> = Vec::new();
    for h in ingest {
        let (h, w) = h.await.map_err(|e| e.to_string())?;
        let _ = acks.add(&h);
        for (i, h) in w.iter().enumerate() {
            if windows.len() <= i {
                windows.resize_with(i + 1, histogram);
            }
            let _ = windows[i].add(h);
        }
    }
    for task in [scheduler, prober, renicer].into_iter().flatten() {
        task.await.map_err(|e| e.to_string())?;
    }
    let lost = match poller {
        Some(p) => p.await.map_err(|e| e.to_string())?,
        None => 0,
    };
    let lost = lost + sh.inflight.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;

    let secs = o.duration as f64;
    let get = |text: &str, name: &str| http::metric(text, name).unwrap_or(0.0);
    let n_search = get(&after, "confab_search_duration_seconds_count")
        - get(&before, "confab_search_duration_seconds_count");
    let sum_search = get(&after, "confab_search_duration_seconds_sum")
        - get(&before, "confab_search_duration_seconds_sum");
    let server_p99 = p99_le(&before, &after, "confab_search_duration_seconds");
    let commits = get(&after, "confab_search_commit_duration_seconds_count")
        - get(&before, "confab_search_commit_duration_seconds_count");
    let commit_sum = get(&after, "confab_search_commit_duration_seconds_sum")
        - get(&before, "confab_search_commit_duration_seconds_sum");
    let lags: Vec<f64> = lag.iter().map(|p| p.1).collect();
    let k = lags.len().min(10);
    let totals = {
        let mut t = sh.totals.lock().unwrap_or_else(|e| e.into_inner()).clone();
        t.sort_unstable();
        t
    };
    let (index_bytes_after, _) = dir_size(&dir.join("search"));
    let mut result = LoadResult {
        run,
        commit_ms: run.commit_ms,
        search_enabled: run.search,
        nice: run.nice,
        duration_secs: secs,
        ingest_sent: sh.ingest_sent.load(Ordering::Relaxed),
        ingest_acked: sh.ingest_acked.load(Ordering::Relaxed),
        ingest_errors: sh.ingest_errors.load(Ordering::Relaxed),
        ingest_rate: sh.ingest_acked.load(Ordering::Relaxed) as f64 / secs,
        stored: get(&after, "confab_messages_stored_total")
            - get(&before, "confab_messages_stored_total"),
        deduplicated: get(&after, "confab_messages_deduplicated_total")
            - get(&before, "confab_messages_deduplicated_total"),
        ingest_ack_ms: percentiles(&acks),
        ingest_ack_p99_by_10s: windows.iter().map(|h| percentiles(h).p99).collect(),
        searches: percentiles(&sh.searches.lock().unwrap_or_else(|e| e.into_inner())),
        search_errors: sh.search_errors.load(Ordering::Relaxed),
        search_by_kind: sh
            .by_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, h)| (k.clone(), percentiles(h)))
            .collect(),
        search_by_shape: sh
            .by_shape
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, h)| (k.clone(), percentiles(h)))
            .collect(),
        zero_hit_share: totals.iter().filter(|&&t| t == 0).count() as f64
            / totals.len().max(1) as f64,
        median_total: totals.get(totals.len() / 2).copied().unwrap_or(0),
        server_search_mean_ms: if n_search > 0.0 {
            sum_search / n_search * 1000.0
        } else {
            0.0
        },
        server_search_p99_le_ms: server_p99,
        server_searches: n_search,
        probes: sh.probes.load(Ordering::Relaxed),
        probe_ack_ms: percentiles(&sh.probe_ack.lock().unwrap_or_else(|e| e.into_inner())),
        freshness_ms: percentiles(&sh.fresh.lock().unwrap_or_else(|e| e.into_inner())),
        probes_lost: lost,
        probe_errors: sh.probe_errors.load(Ordering::Relaxed),
        lag_max: lags.iter().copied().fold(0.0, f64::max),
        lag_secs_max,
        lag_first10_mean: mean(&lags[..k]),
        lag_last10_mean: mean(&lags[lags.len() - k..]),
        lag_slope: slope(&lag),
        lag,
        drain_secs,
        indexed_per_sec: (get(&after, "confab_search_indexed_total")
            - get(&before, "confab_search_indexed_total"))
            / secs,
        index_commits: commits,
        index_commit_mean_ms: if commits > 0.0 {
            commit_sum / commits * 1000.0
        } else {
            0.0
        },
        index_commit_p99_le_ms: p99_le(&before, &after, "confab_search_commit_duration_seconds"),
        store_commits_per_sec: (get(&after, "confab_commit_duration_seconds_count")
            - get(&before, "confab_commit_duration_seconds_count"))
            / secs,
        store_batch_mean: ratio(
            get(&after, "confab_commit_batch_size_sum")
                - get(&before, "confab_commit_batch_size_sum"),
            get(&after, "confab_commit_batch_size_count")
                - get(&before, "confab_commit_batch_size_count"),
        ),
        store_commit_mean_ms: 1000.0
            * ratio(
                get(&after, "confab_commit_duration_seconds_sum")
                    - get(&before, "confab_commit_duration_seconds_sum"),
                get(&after, "confab_commit_duration_seconds_count")
                    - get(&before, "confab_commit_duration_seconds_count"),
            ),
        searcher_room_messages: visible as f64 / searchers.len().max(1) as f64,
        bench_cores: (cpu_after - cpu_before) / secs,
        other_cores: 0.0,
        server_threads: thread_deltas(&threads_before, &threads_after, secs),
        index_bytes_settled: 0,
        messages_settled: 0,
        server_cores: (get(&after, "confab_process_cpu_seconds_total")
            - get(&before, "confab_process_cpu_seconds_total"))
            / secs,
        server_rss_mb: get(&after, "confab_process_resident_memory_bytes") / 1e6,
        server_rss_anon_mb: rss_kb(server.child.id(), "RssAnon:") / 1e3,
        server_rss_file_mb: rss_kb(server.child.id(), "RssFile:") / 1e3,
        index_bytes_after,
    };
    result.other_cores =
        ((machine_after - machine_before) / secs - result.server_cores - result.bench_cores)
            .max(0.0);
    if let Some(e) = errors.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        eprintln!("(errors during the load; first: {e})");
    }
    Ok(result)
}

// ---------------------------------------------------------------- report

#[derive(Serialize)]
struct Report {
    command: String,
    messages: u64,
    rooms: usize,
    users: usize,
    seeded: bool,
    seed_secs: f64,
    seed_rate: f64,
    mean_text_chars: f64,
    mean_text_bytes: f64,
    vocabulary: usize,
    store_bytes: u64,
    catch_up: Option<CatchUp>,
    runs: Vec<LoadResult>,
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Whether the indexer kept up: the lag did not trend upwards (slope under
/// 1% of the ingest rate) and it drained within 3 s of the load stopping.
fn kept_up(r: &LoadResult, rate: u64) -> bool {
    r.lag_slope <= 0.01 * rate as f64 && r.drain_secs <= 3.0
}

fn print_report(rep: &Report, o: &Opts) {
    let p = |x: &Percentiles| format!("{:.1} / {:.1} / {:.1} / {:.1}", x.p50, x.p90, x.p99, x.max);
    println!();
    println!("## Results");
    println!();
    println!(
        "corpus: {} messages (mean {:.0} chars, {:.0} bytes), {} rooms, {} users, vocabulary {} forms",
        rep.messages,
        rep.mean_text_chars,
        rep.mean_text_bytes,
        rep.rooms,
        rep.users,
        rep.vocabulary
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    if rep.seeded {
        println!(
            "| seeding (users, rooms, messages through the writer) | {:.1} s, {:.0} msgs/s |",
            rep.seed_secs, rep.seed_rate
        );
    } else {
        println!("| seeding | reused (--dir) |");
    }
    println!("| store file | {:.0} MB |", mb(rep.store_bytes));
    if let Some(c) = &rep.catch_up {
        println!(
            "| index catch-up from zero (start → lag 0) | {:.0} messages in {:.1} s = **{:.0} msgs/s**, server {:.2} cores |",
            c.messages, c.secs, c.rate, c.cores
        );
        println!(
            "| index size right after the catch-up (merges pending) | {:.0} MB = {:.0} bytes/message |",
            mb(c.index_bytes),
            c.index_bytes as f64 / c.messages.max(1.0)
        );
    }
    for r in rep.runs.iter().filter(|r| r.search_enabled) {
        println!(
            "| index size after the index_commit_ms={} run, server stopped | {:.0} MB for {} messages = **{:.0} bytes/message** |",
            r.commit_ms,
            mb(r.index_bytes_settled),
            r.messages_settled,
            r.index_bytes_settled as f64 / r.messages_settled.max(1) as f64
        );
    }
    println!();
    print!("| under load (ms: p50 / p90 / p99 / max) |");
    for r in &rep.runs {
        print!(" {} |", r.run.label());
    }
    println!();
    print!("|---|");
    for _ in &rep.runs {
        print!("---|");
    }
    println!();
    let row = |label: &str, f: &dyn Fn(&LoadResult) -> String| {
        print!("| {label} |");
        for r in &rep.runs {
            print!(" {} |", f(r));
        }
        println!();
    };
    // Rows about search: empty in the baseline column.
    let srow = |label: &str, f: &dyn Fn(&LoadResult) -> String| {
        row(label, &|r| {
            if r.run.queries {
                f(r)
            } else {
                "—".to_string()
            }
        })
    };
    // Rows about the index: empty in the baseline column.
    let irow = |label: &str, f: &dyn Fn(&LoadResult) -> String| {
        row(label, &|r| {
            if r.search_enabled {
                f(r)
            } else {
                "—".to_string()
            }
        })
    };
    row("ingest achieved / sent / errors", &|r| {
        format!(
            "{:.0} msgs/s / {} / {}",
            r.ingest_rate, r.ingest_sent, r.ingest_errors
        )
    });
    row("messages stored / deduplicated (should be 0)", &|r| {
        format!("{:.0} / {:.0}", r.stored, r.deduplicated)
    });
    row("ingest send→ack", &|r| p(&r.ingest_ack_ms));
    row("ingest send→ack p99 per 10 s", &|r| {
        r.ingest_ack_p99_by_10s
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row("store writer: commits/s / mean batch / mean commit", &|r| {
        format!(
            "{:.0} / {:.1} / {:.2} ms",
            r.store_commits_per_sec, r.store_batch_mean, r.store_commit_mean_ms
        )
    });
    srow("messages in the searcher's 20 rooms at the start", &|r| {
        format!("{:.0}", r.searcher_room_messages)
    });
    srow("**search, end to end**", &|r| {
        format!(
            "**{}** ({} queries, {} errors)",
            p(&r.searches),
            r.searches.count,
            r.search_errors
        )
    });
    for kind in QueryKind::ALL {
        srow(&format!("— {}", kind.name()), &|r| {
            r.search_by_kind.get(kind.name()).map(p).unwrap_or_default()
        });
    }
    for shape in [
        "all rooms, relevance",
        "all rooms, by time",
        "one room, relevance",
        "one room, by time",
    ] {
        srow(&format!("— {shape}"), &|r| {
            r.search_by_shape.get(shape).map(p).unwrap_or_default()
        });
    }
    srow("hits: queries with none / median total", &|r| {
        format!("{:.0}% / {}", r.zero_hit_share * 100.0, r.median_total)
    });
    srow("server time per search: mean / p99 (bucket)", &|r| {
        format!(
            "{:.2} / ≤ {:.1} ({:.0} searches incl. probe polls)",
            r.server_search_mean_ms, r.server_search_p99_le_ms, r.server_searches
        )
    });
    srow("probe POST → 201", &|r| p(&r.probe_ack_ms));
    srow("**freshness: ack → found**", &|r| {
        format!(
            "**{}** ({} probes, {} lost, {} errors)",
            p(&r.freshness_ms),
            r.probes,
            r.probes_lost,
            r.probe_errors
        )
    });
    irow("index commits: count / mean / p99 (bucket)", &|r| {
        format!(
            "{:.0} / {:.1} / ≤ {:.0}",
            r.index_commits, r.index_commit_mean_ms, r.index_commit_p99_le_ms
        )
    });
    irow("index lag: max / first 10 s mean / last 10 s mean", &|r| {
        format!(
            "{:.0} / {:.0} / {:.0} messages (max {:.1} s behind)",
            r.lag_max, r.lag_first10_mean, r.lag_last10_mean, r.lag_secs_max
        )
    });
    irow("index lag trend / drained after load", &|r| {
        format!("{:+.1} msgs/s per s / {:.2} s", r.lag_slope, r.drain_secs)
    });
    irow("indexed under load", &|r| {
        format!("{:.0} msgs/s", r.indexed_per_sec)
    });
    row(
        "CPU: server / load generator / anything else (cores of 2)",
        &|r| {
            format!(
                "{:.2} / {:.2} / {:.2}",
                r.server_cores, r.bench_cores, r.other_cores
            )
        },
    );
    row("server RSS at the end (anonymous + file pages)", &|r| {
        format!(
            "{:.0} MB ({:.0} + {:.0})",
            r.server_rss_mb, r.server_rss_anon_mb, r.server_rss_file_mb
        )
    });
    let groups: HashSet<&String> = rep
        .runs
        .iter()
        .flat_map(|r| r.server_threads.keys())
        .collect();
    let mut groups: Vec<&String> = groups.into_iter().collect();
    groups.sort();
    for g in groups {
        row(
            &format!("server threads: {g} (cores / MB/s written)"),
            &|r| {
                r.server_threads
                    .get(g)
                    .map(|(cores, mbs)| format!("{cores:.2} / {mbs:.1}"))
                    .unwrap_or_default()
            },
        );
    }
    println!();
    for r in rep.runs.iter().filter(|r| r.other_cores > 0.1) {
        println!(
            "warning: other processes used {:.2} cores during the {} run: its figures are skewed",
            r.other_cores,
            r.run.label()
        );
    }
    for r in rep.runs.iter().filter(|r| r.run.queries) {
        println!("targets ({}):", r.run.label());
        println!(
            "  {}  search p99 {:.1} ms ≤ {TARGET_SEARCH_P99_MS} ms (errors: {})",
            pass(r.searches.p99 <= TARGET_SEARCH_P99_MS && r.search_errors == 0),
            r.searches.p99,
            r.search_errors
        );
        println!(
            "  {}  freshness p99 {:.0} ms ≤ {TARGET_FRESH_P99_MS} ms (lost probes: {})",
            pass(r.freshness_ms.p99 <= TARGET_FRESH_P99_MS && r.probes_lost == 0 && r.probes > 0),
            r.freshness_ms.p99,
            r.probes_lost
        );
        println!(
            "  {}  indexing keeps up: lag trend {:+.1} msgs/s per s (≤ 1% of {} msgs/s), drained in {:.2} s (≤ 3 s)",
            pass(kept_up(r, o.rate)),
            r.lag_slope,
            o.rate,
            r.drain_secs
        );
        println!(
            "  {}  ingest {:.0} msgs/s of {} with no errors",
            pass(r.ingest_rate >= 0.98 * o.rate as f64 && r.ingest_errors == 0),
            r.ingest_rate,
            o.rate
        );
    }
}

// ---------------------------------------------------------------- main

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(o)) {
        eprintln!("search bench failed: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Opts) -> Result<(), String> {
    let command = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect::<Vec<_>>()
        .join(" ");
    let (dir, keep) = match &o.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            (
                d.canonicalize()
                    .map_err(|e| format!("{}: {e}", d.display()))?,
                true,
            )
        }
        None => {
            let d =
                std::env::temp_dir().join(format!("confab-search-bench-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            (d, false)
        }
    };
    eprintln!("data directory: {}", dir.display());
    let result = run_in(&o, &dir, command).await;
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(o: &Opts, dir: &Path, command: String) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let corpus = Arc::new(Corpus::new(&mut rng));
    let (manifest, seeded) = match std::fs::read(dir.join(MANIFEST)) {
        Ok(bytes) => (
            serde_json::from_slice::<Manifest>(&bytes).map_err(|e| format!("{MANIFEST}: {e}"))?,
            false,
        ),
        Err(_) => (seed(dir, o, &corpus, &mut rng).await?, true),
    };
    if o.reindex {
        let _ = std::fs::remove_dir_all(dir.join("search"));
    }
    let index_existed = dir.join("search").join("meta.json").exists();
    let store_bytes = dir_size(&dir.join("confab.redb")).0.max(
        std::fs::metadata(dir.join("confab.redb"))
            .map(|m| m.len())
            .unwrap_or(0),
    );

    let mut runs = Vec::new();
    let mut catch_up = None;
    for &run in &o.runs {
        // How many messages a new index has to take in (the store is closed now).
        let fresh = (!dir.join("search").join("meta.json").exists())
            .then(|| Store::open(dir).map(|s| s.feed.committed()))
            .transpose()?;
        let (server, spawned) = Server::start(dir, run)?;
        if run.nice != 0 {
            let n = renice(server.child.id(), &INDEXING_THREADS, run.nice);
            eprintln!(
                "{n} indexing threads of the server now run at nice {}",
                run.nice
            );
        }
        if run.writer_nice != 0 {
            let n = renice(server.child.id(), &["confab-writer"], run.writer_nice);
            eprintln!(
                "{n} writer thread of the server now runs at nice {}",
                run.writer_nice
            );
        }
        if run.search {
            let c = wait_caught_up(&server, spawned, dir, fresh).await?;
            eprintln!(
                "index caught up: {:.0} messages in {:.1} s ({:.0} msgs/s); index {:.0} MB",
                c.messages,
                c.secs,
                c.rate,
                mb(c.index_bytes)
            );
            if catch_up.is_none() && !index_existed {
                catch_up = Some(c);
            }
        }
        // Tokens: searchers are the first group users, senders the next.
        let pool = Pool::new(server.addr);
        let mut searchers = Vec::new();
        for (name, rooms) in manifest.group_users.iter().take(SEARCHERS) {
            let (token, _) = login(&pool, name).await?;
            searchers.push(Searcher {
                token,
                rooms: rooms.clone(),
            });
        }
        let mut senders = Vec::new();
        for (name, rooms) in manifest.group_users.iter().skip(SEARCHERS).take(o.senders) {
            let (token, _) = login(&pool, name).await?;
            senders.push((token, rooms.clone()));
        }
        if run.search {
            eprintln!(
                "load: {} msgs/s from {} connections for {} s, {} searches/s, probes every {} ms (index_commit_ms={})",
                o.rate,
                senders.len(),
                o.duration,
                o.qps,
                o.probe_ms,
                run.commit_ms
            );
        } else {
            eprintln!(
                "baseline: {} msgs/s from {} connections for {} s, search_enabled=false",
                o.rate,
                senders.len(),
                o.duration
            );
        }
        let r = load(
            &server,
            dir,
            o,
            run,
            corpus.clone(),
            &senders,
            &searchers,
            &mut rng,
        )
        .await;
        let stop = tokio::task::spawn_blocking(move || server.stop())
            .await
            .map_err(|e| e.to_string())?;
        eprintln!("server stopped in {:.1} s", stop.as_secs_f64());
        let mut r = r?;
        // Settled: the indexer committed everything on the way out.
        r.index_bytes_settled = dir_size(&dir.join("search")).0;
        r.messages_settled = Store::open(dir)?.feed.committed();
        runs.push(r);
    }
    let rep = Report {
        command: format!("cargo bench --bench search -- {command}"),
        messages: manifest.messages,
        rooms: manifest.rooms,
        users: manifest.users,
        seeded,
        seed_secs: manifest.seed_secs,
        seed_rate: manifest.seed_rate,
        mean_text_chars: manifest.text_chars as f64 / manifest.messages.max(1) as f64,
        mean_text_bytes: manifest.text_bytes as f64 / manifest.messages.max(1) as f64,
        vocabulary: manifest.vocabulary,
        store_bytes,
        catch_up,
        runs,
    };
    print_report(&rep, o);
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
