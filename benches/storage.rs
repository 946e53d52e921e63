//! Which embedded database for confab's workload: redb (what confab uses)
//! versus SQLite (rusqlite, bundled), on the two operations that matter:
//!
//! 1. the message insert of a send — append `(room, seq)` → message and the
//!    `(room, sender, client_id)` dedup entry — committed durably, with B
//!    messages per commit (B = 1, 10, 100, 1000: group commit's batch);
//! 2. the history read — the last 50 messages of a random room — from a store
//!    of `CONFAB_STORAGE_BENCH_MESSAGES` messages (default 200,000) in
//!    `CONFAB_STORAGE_BENCH_ROOMS` rooms (default 2,000).
//!
//! redb runs on confab's own file layout (`Store::open`, the `MESSAGES` and
//! `CLIENT_IDS` tables, `MessageRecord::sealed`) with `Durability::Immediate`
//! (fsync per commit, redb's default and what confab uses), once as is and
//! once with redb's quick-repair mode (each commit also saves the allocator
//! state, so a restart after a crash skips the repair scan). SQLite runs in
//! WAL mode with `synchronous=FULL` (the WAL is fsync'd at every commit, so a
//! commit is as durable as redb's), one `WITHOUT ROWID` table keyed by
//! `(room, seq)` and a UNIQUE index on `(room, sender, client_id)`.
//!
//! Each engine bulk-loads its store (10,000 messages per commit); then, for
//! each batch size, the durable inserts (~3 s of commits or 60,000 messages
//! per engine); then 20,000 history reads each. The engines take turns within
//! every phase (three turns each), so a disturbance on a shared machine hits
//! all of them. Prints Markdown tables. The files live in one temporary
//! directory. Run with `cargo bench --bench storage` (about a minute on two
//! cores).

use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::{Durability, ReadableTable};
use rusqlite::{Connection, params};

use confab::store::{CLIENT_IDS, DEFAULT_CACHE_BYTES, MESSAGES, MessageRecord, Store};

/// A typical chat line (~100 bytes).
const TEXT: &str = "On my way, should be there in ten minutes or so. Can you save me a seat near the window, please?";
const BATCHES: [usize; 4] = [1, 10, 100, 1000];
const LOAD_BATCH: usize = 10_000;
/// Per engine and batch size: time spent committing, and most messages.
const INSERT_BUDGET: Duration = Duration::from_secs(3);
const INSERT_MAX_MESSAGES: usize = 60_000;
/// Each phase is split into this many turns per engine, alternating.
const ROUNDS: usize = 3;
const READS: usize = 20_000;
const HISTORY: usize = 50;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One message to store, as the writer has it after assigning the seq.
struct NewMessage {
    room: u64,
    seq: u64,
    rec: MessageRecord,
}

/// The workload: rooms with two members each, a seq counter per room (the
/// writer's cache), messages to random rooms from one of their members.
struct Workload {
    rng: StdRng,
    rooms: Vec<(u64, [u64; 2])>,
    seqs: Vec<u64>,
    next_client_id: u64,
}

impl Workload {
    fn new(rooms: usize, seed: u64) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let rooms = (0..rooms)
            .map(|_| {
                // Direct room ids have the top bit clear; user ids are random.
                let room = rng.random::<u64>() >> 1;
                (room, [rng.random::<u64>(), rng.random::<u64>()])
            })
            .collect::<Vec<_>>();
        let seqs = vec![0; rooms.len()];
        Workload {
            rng,
            rooms,
            seqs,
            next_client_id: 0,
        }
    }

    fn next(&mut self) -> NewMessage {
        let i = self.rng.random_range(0..self.rooms.len());
        let (room, members) = self.rooms[i];
        self.seqs[i] += 1;
        self.next_client_id += 1;
        NewMessage {
            room,
            seq: self.seqs[i],
            rec: MessageRecord {
                from: members[self.rng.random_range(0..2)],
                ts: 1_795_600_000_000 + self.next_client_id as i64,
                client_id: format!("c-{:012}", self.next_client_id),
                text: TEXT.to_owned(),
                payment: None,
            },
        }
    }

    fn batch(&mut self, n: usize) -> Vec<NewMessage> {
        (0..n).map(|_| self.next()).collect()
    }

    fn random_room(&mut self) -> u64 {
        self.rooms[self.rng.random_range(0..self.rooms.len())].0
    }
}

trait Engine {
    fn name(&self) -> &'static str;
    /// Stores `batch` in one durable transaction.
    fn commit(&mut self, batch: &[NewMessage]) -> Result<()>;
    /// The last `HISTORY` messages of `room`, ascending.
    fn history(&self, room: u64) -> Result<Vec<(u64, MessageRecord)>>;
    /// Bytes on disk (all files of the store).
    fn size(&self) -> Result<u64>;
}

// ---------------------------------------------------------------------------
// redb, on confab's tables

struct Redb {
    store: Store,
    dir: std::path::PathBuf,
    /// redb's quick-repair mode: each commit also saves the allocator state,
    /// so that opening after a crash needs no full repair scan.
    quick_repair: bool,
}

impl Redb {
    fn open(dir: &Path, quick_repair: bool) -> Result<Redb> {
        let store = Store::open(dir)?;
        Ok(Redb {
            store,
            dir: dir.to_path_buf(),
            quick_repair,
        })
    }
}

impl Engine for Redb {
    fn name(&self) -> &'static str {
        if self.quick_repair {
            "redb+quick_repair"
        } else {
            "redb"
        }
    }

    fn commit(&mut self, batch: &[NewMessage]) -> Result<()> {
        let mut txn = self.store.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(self.quick_repair);
        {
            let mut messages = txn.open_table(MESSAGES)?;
            let mut client_ids = txn.open_table(CLIENT_IDS)?;
            for m in batch {
                // As the writer does: look the client_id up, then insert both.
                let key = (m.room, m.rec.from, m.rec.client_id.as_str());
                if client_ids.get(key)?.is_some() {
                    return Err("duplicate client_id".into());
                }
                // Sealed with its checksum, as the writer stores it.
                messages.insert(
                    (m.room, m.seq),
                    m.rec.sealed(confab::ids::RoomId(m.room), m.seq).as_slice(),
                )?;
                client_ids.insert(key, m.seq)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn history(&self, room: u64) -> Result<Vec<(u64, MessageRecord)>> {
        // Store::history without the membership check.
        let txn = self.store.db.begin_read()?;
        let messages = txn.open_table(MESSAGES)?;
        let mut out = Vec::with_capacity(HISTORY);
        for entry in messages
            .range((room, 1)..=(room, u64::MAX))?
            .rev()
            .take(HISTORY)
        {
            let (k, v) = entry?;
            // Unsealed (checksum verified) and decoded, as history does.
            let (room, seq) = k.value();
            let rec = MessageRecord::open(confab::ids::RoomId(room), seq, v.value())?
                .ok_or("a lost message")?;
            out.push((seq, rec));
        }
        out.reverse();
        Ok(out)
    }

    fn size(&self) -> Result<u64> {
        dir_size(&self.dir)
    }
}

// ---------------------------------------------------------------------------
// SQLite

struct Sqlite {
    conn: Connection,
    dir: std::path::PathBuf,
}

impl Sqlite {
    fn open(dir: &Path) -> Result<Sqlite> {
        let conn = Connection::open(dir.join("confab.sqlite"))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if mode != "wal" {
            return Err(format!("SQLite refused WAL mode ({mode})").into());
        }
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             PRAGMA cache_size = -262144;
             CREATE TABLE messages (
                 room INTEGER NOT NULL,
                 seq INTEGER NOT NULL,
                 sender INTEGER NOT NULL,
                 ts INTEGER NOT NULL,
                 client_id TEXT NOT NULL,
                 text TEXT NOT NULL,
                 PRIMARY KEY (room, seq)
             ) WITHOUT ROWID;
             CREATE UNIQUE INDEX messages_client_id ON messages (room, sender, client_id);",
        )?;
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
        if sync != 2 {
            return Err(format!("SQLite synchronous is {sync}, not FULL (2)").into());
        }
        Ok(Sqlite {
            conn,
            dir: dir.to_path_buf(),
        })
    }
}

impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "SQLite"
    }

    fn commit(&mut self, batch: &[NewMessage]) -> Result<()> {
        let txn = self.conn.transaction()?;
        {
            // The UNIQUE index rejects a repeated client_id.
            let mut insert = txn.prepare_cached(
                "INSERT INTO messages (room, seq, sender, ts, client_id, text)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for m in batch {
                // SQLite integers are i64: ids are stored bit for bit.
                insert.execute(params![
                    m.room as i64,
                    m.seq as i64,
                    m.rec.from as i64,
                    m.rec.ts,
                    m.rec.client_id,
                    m.rec.text
                ])?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn history(&self, room: u64) -> Result<Vec<(u64, MessageRecord)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, sender, ts, client_id, text FROM messages
             WHERE room = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![room as i64, HISTORY as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                MessageRecord {
                    from: r.get::<_, i64>(1)? as u64,
                    ts: r.get(2)?,
                    client_id: r.get(3)?,
                    text: r.get(4)?,
                    payment: None,
                },
            ))
        })?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    fn size(&self) -> Result<u64> {
        dir_size(&self.dir)
    }
}

// ---------------------------------------------------------------------------

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

struct InsertResult {
    messages: usize,
    commits: usize,
    per_sec: f64,
    commit_p50: Duration,
    commit_p99: Duration,
}

struct EngineResult {
    name: &'static str,
    load_per_sec: f64,
    size_after_load: u64,
    inserts: Vec<InsertResult>,
    read_p50: Duration,
    read_p99: Duration,
    read_mean: Duration,
}

/// One engine under test, with its own copy of the workload (the same seed
/// for every engine: the same rooms, messages and reads).
struct Contender {
    engine: Box<dyn Engine>,
    w: Workload,
    /// Per batch size: commit times, messages stored.
    commits: Vec<(Vec<Duration>, usize)>,
    reads: Vec<Duration>,
    load_per_sec: f64,
    size_after_load: u64,
}

impl Contender {
    fn new(engine: Box<dyn Engine>, rooms: usize) -> Contender {
        Contender {
            engine,
            w: Workload::new(rooms, 42),
            commits: BATCHES.iter().map(|_| (Vec::new(), 0)).collect(),
            reads: Vec::new(),
            load_per_sec: 0.0,
            size_after_load: 0,
        }
    }

    fn load(&mut self, messages: usize) -> Result<()> {
        let started = Instant::now();
        let mut left = messages;
        while left > 0 {
            let n = left.min(LOAD_BATCH);
            self.engine.commit(&self.w.batch(n))?;
            left -= n;
        }
        self.load_per_sec = messages as f64 / started.elapsed().as_secs_f64();
        self.size_after_load = self.engine.size()?;
        Ok(())
    }

    /// Durable commits of `BATCHES[i]` messages each, for `budget` or
    /// `max_messages`, whichever comes first (at least one commit).
    fn insert(&mut self, i: usize, budget: Duration, max_messages: usize) -> Result<()> {
        let batch = BATCHES[i];
        let (times, stored) = &mut self.commits[i];
        let (mut busy, mut n) = (Duration::ZERO, 0);
        while n == 0 || (busy < budget && n + batch <= max_messages) {
            let b = self.w.batch(batch);
            let t = Instant::now();
            self.engine.commit(&b)?;
            let d = t.elapsed();
            busy += d;
            times.push(d);
            n += batch;
        }
        *stored += n;
        Ok(())
    }

    fn read(&mut self, reads: usize) -> Result<()> {
        for _ in 0..reads {
            let room = self.w.random_room();
            let t = Instant::now();
            let got = self.engine.history(room)?;
            let d = t.elapsed();
            if got.is_empty() || got.len() > HISTORY || got.windows(2).any(|p| p[0].0 >= p[1].0) {
                let name = self.engine.name();
                return Err(format!("{name}: bad history for room {room:016x}").into());
            }
            std::hint::black_box(got);
            self.reads.push(d);
        }
        Ok(())
    }

    fn result(mut self) -> EngineResult {
        let inserts = self
            .commits
            .iter_mut()
            .map(|(times, stored)| {
                let busy: Duration = times.iter().sum();
                times.sort();
                InsertResult {
                    messages: *stored,
                    commits: times.len(),
                    per_sec: *stored as f64 / busy.as_secs_f64(),
                    commit_p50: percentile(times, 0.50),
                    commit_p99: percentile(times, 0.99),
                }
            })
            .collect();
        let total: Duration = self.reads.iter().sum();
        let mean = total / self.reads.len().max(1) as u32;
        self.reads.sort();
        EngineResult {
            name: self.engine.name(),
            load_per_sec: self.load_per_sec,
            size_after_load: self.size_after_load,
            inserts,
            read_p50: percentile(&self.reads, 0.50),
            read_p99: percentile(&self.reads, 0.99),
            read_mean: mean,
        }
    }
}

/// Runs the phases with the engines interleaved (each phase split into
/// `ROUNDS` turns), so that a disturbance on the machine hits all of them.
fn run(mut cs: Vec<Contender>, messages: usize, rooms: usize) -> Result<Vec<EngineResult>> {
    for c in &mut cs {
        eprintln!(
            "{}: loading {messages} messages into {rooms} rooms",
            c.engine.name()
        );
        c.load(messages)?;
    }
    for (i, batch) in BATCHES.iter().enumerate() {
        for _ in 0..ROUNDS {
            for c in &mut cs {
                c.insert(
                    i,
                    INSERT_BUDGET / ROUNDS as u32,
                    INSERT_MAX_MESSAGES / ROUNDS,
                )?;
            }
        }
        for c in &cs {
            let (times, stored) = &c.commits[i];
            let busy: Duration = times.iter().sum();
            eprintln!(
                "{}: B = {batch}: {} commits, {:.0} messages/s",
                c.engine.name(),
                times.len(),
                *stored as f64 / busy.as_secs_f64()
            );
        }
    }
    for _ in 0..ROUNDS {
        for c in &mut cs {
            c.read(READS / ROUNDS)?;
        }
    }
    Ok(cs.into_iter().map(Contender::result).collect())
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => Ok(v
            .parse()
            .map_err(|e| format!("{name}={v}: not a number: {e}"))?),
        Err(_) => Ok(default),
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; this program takes no arguments.
    let messages = env_usize("CONFAB_STORAGE_BENCH_MESSAGES", 200_000)?;
    let rooms = env_usize("CONFAB_STORAGE_BENCH_ROOMS", 2_000)?.max(1);
    if messages < rooms {
        return Err("CONFAB_STORAGE_BENCH_MESSAGES must be at least the number of rooms".into());
    }

    let dir = tempfile::tempdir()?;
    let sqlite_dir = dir.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir)?;
    let engines = std::env::var("CONFAB_STORAGE_BENCH_ENGINES")
        .unwrap_or_else(|_| "redb,redb-qr,sqlite".to_owned())
        .to_lowercase();
    let mut contenders = Vec::new();
    for engine in engines.split(',').map(str::trim) {
        let engine: Box<dyn Engine> = match engine {
            "redb" => Box::new(Redb::open(&dir.path().join("redb"), false)?),
            "redb-qr" => Box::new(Redb::open(&dir.path().join("redb-qr"), true)?),
            "sqlite" => Box::new(Sqlite::open(&sqlite_dir)?),
            other => return Err(format!("unknown engine `{other}` (redb, redb-qr, sqlite)").into()),
        };
        contenders.push(Contender::new(engine, rooms));
    }
    let results = run(contenders, messages, rooms)?;

    println!("\n### Durable message inserts ({messages} messages already stored, {rooms} rooms)\n");
    print!("| batch (messages/commit) |");
    for r in &results {
        print!(
            " {} msg/s | {} commit p50 | {} commit p99 |",
            r.name, r.name, r.name
        );
    }
    println!();
    println!("|---:|{}", "---:|---:|---:|".repeat(results.len()));
    for (i, batch) in BATCHES.iter().enumerate() {
        print!("| {batch} |");
        for r in &results {
            let x = &r.inserts[i];
            print!(
                " {:.0} | {} | {} |",
                x.per_sec,
                ms(x.commit_p50),
                ms(x.commit_p99)
            );
        }
        println!();
    }
    print!("| commits measured |");
    for r in &results {
        let c: Vec<String> = r.inserts.iter().map(|x| x.commits.to_string()).collect();
        let m: usize = r.inserts.iter().map(|x| x.messages).sum();
        print!(" {} ({m} messages) | | |", c.join(" / "));
    }
    println!();

    println!(
        "\n### History read (last {HISTORY} messages of a random room, {READS} reads) and size\n"
    );
    println!(
        "| engine | read p50 | read p99 | read mean | bulk load ({LOAD_BATCH}/commit) | file size after load | bytes/message |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {:.0} msg/s | {:.1} MB | {:.0} |",
            r.name,
            us(r.read_p50),
            us(r.read_p99),
            us(r.read_mean),
            r.load_per_sec,
            r.size_after_load as f64 / 1e6,
            r.size_after_load as f64 / messages as f64
        );
    }
    println!(
        "\nSQLite: WAL, synchronous=FULL, cache_size=256 MiB, WITHOUT ROWID (room, seq) + UNIQUE (room, sender, client_id); its size counts the -wal file. redb: confab's tables through Store::open ({} MiB page cache), Durability::Immediate; redb+quick_repair also sets set_quick_repair(true) on every write transaction.",
        DEFAULT_CACHE_BYTES >> 20
    );
    Ok(())
}
