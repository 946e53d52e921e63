//! One step of the stepped load test: every user connected first, then
//! sends **open-loop** on a fixed schedule (latency measured from the
//! scheduled time, so a stalled server cannot hide its stall), every ack
//! and delivery recorded in HDR histograms sharded by connection, and after
//! the step the loss check (every acked message at every other member) and
//! the history check (every acked message stored exactly once).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use hdrhistogram::Histogram;
use hyper::Method;
use serde_json::{Value, json};

use super::args::BenchArgs;
use super::client::{Target, Ws};
use super::results::{StepResult, TIERS_MS, percentiles, server_sample};
use super::seed::Seed;

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

#[allow(clippy::too_many_arguments)]
pub(super) async fn run_step(
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
