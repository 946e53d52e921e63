//! Micro-benchmarks of the message hot path, on the real library code:
//!
//! - `frames/*`: parsing a client `send` frame (one typed parse, as the
//!   session reader does, and the older Value-then-typed two-step) and
//!   serialising the server `message` and `ack` frames (`confab::frames`);
//! - `record/*`: a message record encoded and sealed with its checksum (the
//!   writer), unsealed and decoded (every read), against plain encode/decode;
//! - `fanout/k`: pushing one message frame to k online sessions through
//!   `confab::hub::Hub` (what the writer does after each commit);
//! - `group_commit/B`: B sends submitted at once to the real
//!   `GroupCommitWriter` on a fresh redb file and awaited (durable commits,
//!   fsync included), reported as messages/s.
//!
//! Run with `cargo bench --bench hot_path` (about two minutes on two cores);
//! a criterion filter narrows it, e.g. `cargo bench --bench hot_path -- fanout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

use confab::api::ws::ClientFrame;
use confab::config::StoreConfig;
use confab::frames;
use confab::hub::{Hub, OutFrame, SessionOutbox};
use confab::ids::{RoomId, UserId};
use confab::store::{Message, Store};
use confab::writes::{GroupCommitWriter, Op, Origin, WriterHandle};

/// A typical chat line (~100 bytes).
const TEXT: &str = "On my way, should be there in ten minutes or so. Can you save me a seat near the window, please?";

/// Session outbox capacity, as in the default `outbox_frames`.
const OUTBOX_FRAMES: usize = 4096;

// ---------------------------------------------------------------------------
// frames

/// The session reader's parse before commit 3fed84e: to a
/// `serde_json::Value`, look at `client_id` and `type`, then convert the value
/// to the typed frame (and parse the room id, as `on_send` does). Kept for
/// comparison; the reader now does [`parse_direct`] and only falls back to a
/// `Value` to explain a frame that failed.
fn parse_two_step(bytes: &[u8]) -> Option<(RoomId, Option<String>, String)> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let client_id = value
        .get("client_id")
        .and_then(|c| c.as_str())
        .map(str::to_owned);
    let kind = value.get("type").and_then(|t| t.as_str())?.to_owned();
    if kind != "send" {
        return None;
    }
    match serde_json::from_value::<ClientFrame>(value).ok()? {
        ClientFrame::Send { room, text, .. } => Some((room.parse().ok()?, client_id, text)),
        _ => None,
    }
}

/// What the session reader does now: one typed parse of the text frame
/// (then `on_send` parses the room id).
fn parse_direct(bytes: &[u8]) -> Option<(RoomId, Option<String>, String)> {
    match serde_json::from_slice::<ClientFrame>(bytes).ok()? {
        ClientFrame::Send {
            room,
            client_id,
            text,
        } => Some((room.parse().ok()?, client_id, text)),
        _ => None,
    }
}

fn sample_message() -> Message {
    Message {
        room: RoomId(0x0123_4567_89ab_cdef),
        seq: 123_456,
        from: UserId(0x7edc_ba98_7654_3210),
        ts: 1_795_600_000_000,
        text: TEXT.to_owned(),
        client_id: "c-7f3a9e10-000042".to_owned(),
        kind: None,
        payment: None,
        unreadable: false,
    }
}

/// What the record checksum (store schema 4) adds per message: the writer
/// encodes and seals each record (`MessageRecord::sealed`), every read
/// unseals and decodes one (`MessageRecord::open`); before, it was
/// `encode` and `decode_body` alone.
fn bench_records(c: &mut Criterion) {
    use confab::store::MessageRecord;
    let rec = MessageRecord {
        from: 0x7edc_ba98_7654_3210,
        ts: 1_795_600_000_000,
        client_id: "c-7f3a9e10-000042".to_owned(),
        text: TEXT.to_owned(),
        payment: None,
    };
    let room = RoomId(0x0123_4567_89ab_cdef);
    let sealed = rec.sealed(room, 123_456);
    let plain = rec.encode();
    let mut g = c.benchmark_group("record");
    g.bench_function("encode", |b| b.iter(|| black_box(&rec).encode()));
    g.bench_function("encode_and_seal", |b| {
        b.iter(|| black_box(&rec).sealed(room, black_box(123_456)))
    });
    g.bench_function("decode", |b| {
        b.iter(|| MessageRecord::decode_body(black_box(&plain)))
    });
    g.bench_function("unseal_and_decode", |b| {
        b.iter(|| MessageRecord::open(room, black_box(123_456), black_box(&sealed)))
    });
    g.finish();
}

fn bench_frames(c: &mut Criterion) {
    let send = serde_json::json!({
        "type": "send",
        "room": "0123456789abcdef",
        "client_id": "c-7f3a9e10-000042",
        "text": TEXT,
    })
    .to_string();
    let send = send.as_bytes();
    assert!(parse_two_step(send).is_some(), "the sample frame parses");
    assert!(parse_direct(send).is_some(), "the sample frame parses");

    let msg = sample_message();
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_send/value_then_typed", |b| {
        b.iter(|| parse_two_step(black_box(send)))
    });
    g.bench_function("parse_send/typed", |b| {
        b.iter(|| parse_direct(black_box(send)))
    });
    g.bench_function("serialize_message", |b| {
        b.iter(|| frames::message(black_box(&msg)))
    });
    g.bench_function("serialize_ack", |b| b.iter(|| frames::ack(black_box(&msg))));
    g.finish();
}

// ---------------------------------------------------------------------------
// fan-out

fn bench_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for k in [2usize, 10, 100, 1000] {
        let hub = Hub::default();
        let members: Vec<UserId> = (1..=k as u64).map(UserId).collect();
        let outboxes: Vec<Arc<SessionOutbox>> = members
            .iter()
            .enumerate()
            .map(|(i, &u)| SessionOutbox::new(i as u64 + 1, u, format!("jti-{i}"), OUTBOX_FRAMES))
            .collect();
        for o in &outboxes {
            hub.register(o.clone());
        }
        let frame = OutFrame {
            bytes: frames::message(&sample_message()),
            room_seq: Some((RoomId(1), 1)),
            pong: false,
        };
        // Fan out in chunks of 32 messages, then drain every outbox (untimed):
        // queues stay short, as behind a session writer that keeps up, and
        // no session is ever kicked.
        let chunk = 32u64;
        g.throughput(Throughput::Elements(k as u64));
        g.bench_with_input(BenchmarkId::from_parameter(k), &k, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(chunk);
                    let start = Instant::now();
                    for _ in 0..n {
                        // As GroupCommitWriter::deliver does for each message.
                        for &m in &members {
                            black_box(hub.send_to_user(m, &frame, None));
                        }
                    }
                    total += start.elapsed();
                    for o in &outboxes {
                        drop(black_box(o.take()));
                    }
                    left -= n;
                }
                assert!(
                    outboxes.iter().all(|o| !o.is_kicked()),
                    "no session was kicked"
                );
                total
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// group commit

/// Counts `confab_commit_batch_size` records (= commits), so the report can
/// say how many commits the B messages actually took.
mod commits {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use metrics::{
        Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString,
        Unit,
    };

    pub static COMMITS: AtomicU64 = AtomicU64::new(0);

    struct CountCommits;
    impl HistogramFn for CountCommits {
        fn record(&self, _value: f64) {
            COMMITS.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct BatchRecorder;
    impl Recorder for BatchRecorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            if key.name() == "confab_commit_batch_size" {
                Histogram::from_arc(Arc::new(CountCommits))
            } else {
                Histogram::noop()
            }
        }
    }

    pub fn install() {
        // Fails only if a recorder is already installed (then counts stay 0).
        let _ = metrics::set_global_recorder(BatchRecorder);
    }
}

struct Writer {
    rt: tokio::runtime::Runtime,
    handle: WriterHandle,
    join: std::thread::JoinHandle<()>,
    room: RoomId,
    from: UserId,
    _dir: tempfile::TempDir,
}

/// confab's default `[store]` settings (the embedded config.toml), with a
/// batch limit of 1000 and no deliberate wait.
fn store_config() -> StoreConfig {
    let mut defaults: toml::Table = confab::config::DEFAULTS
        .parse()
        .expect("the embedded config.toml parses");
    let mut store = match defaults.remove("store") {
        Some(toml::Value::Table(t)) => t,
        _ => panic!("the embedded config.toml has a [store] table"),
    };
    store.insert("commit_batch_max".into(), 1000.into());
    store.insert("commit_wait_us".into(), 0.into());
    store.insert("writer_queue".into(), 65536.into());
    toml::Value::Table(store)
        .try_into()
        .expect("the [store] defaults make a StoreConfig")
}

fn start_writer() -> Writer {
    let dir = tempfile::tempdir().expect("create a temporary data dir");
    let store = Store::open(dir.path()).expect("open the store");
    let config = store_config();
    eprintln!("group_commit: {config:?}");
    let (handle, join) = GroupCommitWriter::spawn(store, Arc::new(Hub::default()), config, 1024)
        .expect("start the writer thread");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    let (a, _b, room) = rt.block_on(async {
        let mut users = Vec::new();
        for name in ["alice", "bob"] {
            let u = handle
                .call(|reply| Op::CreateUser {
                    username: name.to_owned(),
                    display_name: name.to_owned(),
                    password_hash: "x".to_owned(),
                    reply,
                })
                .await
                .expect("create a user");
            users.push(u.id);
        }
        let (room, _) = handle
            .call(|reply| Op::CreateDirect {
                a: users[0],
                b: users[1],
                reply,
            })
            .await
            .expect("create the direct room");
        (users[0], users[1], room.id)
    });
    Writer {
        rt,
        handle,
        join,
        room,
        from: a,
        _dir: dir,
    }
}

fn bench_group_commit(c: &mut Criterion) {
    commits::install();
    let w = start_writer();
    let next_id = AtomicU64::new(0);
    let mut g = c.benchmark_group("group_commit");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut report = Vec::new();
    for batch in [1usize, 10, 100, 1000] {
        let (mut iters_total, commits_before) = (0u64, commits::COMMITS.load(Ordering::Relaxed));
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter_custom(|iters| {
                iters_total += iters;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Build the ops (and their reply channels) untimed.
                    let mut ops = Vec::with_capacity(batch);
                    let mut replies = Vec::with_capacity(batch);
                    for _ in 0..batch {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        ops.push(Op::Send {
                            room: w.room,
                            from: w.from,
                            client_id: format!("c-{id:08}"),
                            text: TEXT.to_owned(),
                            origin: Origin::Http(tx),
                            received: Instant::now(),
                        });
                        replies.push(rx);
                    }
                    let start = Instant::now();
                    w.rt.block_on(async {
                        for op in ops {
                            w.handle.submit(op).await.expect("queue a send");
                        }
                        for rx in replies {
                            let (msg, dup) = rx
                                .await
                                .expect("the writer answers")
                                .expect("the send is stored");
                            assert!(!dup, "client ids are distinct");
                            black_box(msg);
                        }
                    });
                    total += start.elapsed();
                }
                total
            })
        });
        let commits = commits::COMMITS.load(Ordering::Relaxed) - commits_before;
        report.push((batch, iters_total, commits));
    }
    g.finish();
    eprintln!("\ngroup_commit: commits actually taken per round of B sends");
    for (batch, iters, commits) in report {
        if iters > 0 {
            eprintln!(
                "  B = {batch:>4}: {iters} rounds, {commits} commits, {:.2} commits/round",
                commits as f64 / iters as f64
            );
        }
    }
    let Writer {
        rt, handle, join, ..
    } = w;
    rt.block_on(async {
        let _ = handle.submit(Op::Stop).await;
    });
    drop(handle);
    join.join().expect("the writer thread ends cleanly");
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_frames, bench_records, bench_fanout, bench_group_commit
}
criterion_main!(benches);
