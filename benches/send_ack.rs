//! A first look at the message path: send→ack and send→deliver latency and
//! commit batch sizes at a few fixed rates (the full stepped load test is
//! `confab bench`, a later issue).
//!
//! Starts the real server binary on a random loopback port with a fresh data
//! directory, signs up `PAIRS` pairs of users, gives each pair a direct room,
//! connects every user over a WebSocket, then for each rate sends open-loop
//! (the schedule decides when a send is due, not the previous ack) for
//! `SECS` seconds and reports percentiles. Run with `cargo bench --bench send_ack`;
//! `CONFAB_BENCH_RATES=500,1000` and `CONFAB_BENCH_SECS=5` adjust it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

const PAIRS: usize = 50;

struct SpawnExecutor;
impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

async fn http(addr: &str, method: Method, path: &str, token: Option<&str>, body: Value) -> Value {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

async fn ws(addr: &str, token: &str) -> WebSocket<TokioIo<Upgraded>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let req = Request::builder()
        .uri("/api/v1/ws")
        .header("host", addr)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header(
            "sec-websocket-key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let (mut ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
        .await
        .expect("ws handshake");
    let auth = json!({"type": "auth", "token": token}).to_string();
    ws.write_frame(Frame::text(Payload::Owned(auth.into_bytes())))
        .await
        .expect("auth");
    loop {
        let f = ws.read_frame().await.expect("ready");
        if f.opcode == OpCode::Text {
            let v: Value = serde_json::from_slice(&f.payload).expect("json");
            if v["type"] == "ready" {
                return ws;
            }
        }
    }
}

fn metric_sum_count(text: &str, name: &str) -> (f64, f64) {
    let get = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix} ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (get("sum"), get("count"))
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

type Lat = Arc<Mutex<Vec<u64>>>;

#[tokio::main]
async fn main() {
    let rates: Vec<u64> = std::env::var("CONFAB_BENCH_RATES")
        .unwrap_or_else(|_| "200,1000,2000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let secs: u64 = std::env::var("CONFAB_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("confab-bench-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .env_remove("CONFAB_BENCH_RATES")
        .env_remove("CONFAB_BENCH_SECS")
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args([
            "--set",
            "send_rate_per_sec=100000",
            "--set",
            "send_burst=100000",
            "--set",
            "log=warn",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start confab");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap_or_default()
        .to_string();
    println!("server at {addr}, {PAIRS} pairs, {secs} s per rate");

    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        let mut toks = Vec::new();
        for side in ["a", "b"] {
            let v = http(
                &addr,
                Method::POST,
                "/api/v1/signup",
                None,
                json!({"username": format!("bench{i}{side}"), "password": "bench-password"}),
            )
            .await;
            toks.push((
                v["token"].as_str().unwrap_or_default().to_string(),
                v["user"]["id"].clone(),
            ));
        }
        let room = http(
            &addr,
            Method::POST,
            "/api/v1/rooms",
            Some(&toks[0].0),
            json!({"kind": "direct", "user_id": toks[1].1}),
        )
        .await["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        pairs.push((toks[0].0.clone(), toks[1].0.clone(), room));
    }

    println!(
        "| rate (msg/s) | sent | acked | ack p50 | ack p99 | ack max | deliver p50 | deliver p99 | deliver max | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let start = Instant::now();
    for &rate in &rates {
        let acks: Lat = Arc::default();
        let delivers: Lat = Arc::default();
        let m0 = metrics_text(&addr).await;
        let mut tasks = Vec::new();
        let per_sender = rate as f64 / PAIRS as f64;
        for (i, (ta, tb, room)) in pairs.iter().enumerate() {
            let a = ws(&addr, ta).await;
            let mut b = ws(&addr, tb).await;
            let (acks, delivers) = (acks.clone(), delivers.clone());
            let room = room.clone();
            let n = (per_sender * secs as f64).round() as u64;
            // Receiver: record send→deliver from the client_id's timestamp.
            let recv = tokio::spawn(async move {
                let mut got = 0;
                while got < n {
                    let Ok(Ok(f)) =
                        tokio::time::timeout(Duration::from_secs(10), b.read_frame()).await
                    else {
                        break;
                    };
                    if f.opcode != OpCode::Text {
                        continue;
                    }
                    let v: Value = serde_json::from_slice(&f.payload).unwrap_or(Value::Null);
                    if v["type"] == "message" {
                        if let Some(t) = v["client_id"]
                            .as_str()
                            .and_then(|c| c.split(':').nth(1))
                            .and_then(|s| s.parse::<u64>().ok())
                        {
                            delivers
                                .lock()
                                .expect("lock")
                                .push(start.elapsed().as_micros() as u64 - t);
                        }
                        got += 1;
                    }
                }
            });
            let send = tokio::spawn(async move {
                let (mut rx, mut tx) = a.split(tokio::io::split);
                let reader = tokio::spawn(async move {
                    let mut got = 0;
                    while got < n {
                        let Ok(Ok(f)) = tokio::time::timeout(
                            Duration::from_secs(10),
                            rx.read_frame(&mut |_| async {
                                Ok::<_, fastwebsockets::WebSocketError>(())
                            }),
                        )
                        .await
                        else {
                            break;
                        };
                        if f.opcode != OpCode::Text {
                            continue;
                        }
                        let v: Value = serde_json::from_slice(&f.payload).unwrap_or(Value::Null);
                        if v["type"] == "ack" {
                            if let Some(t) = v["client_id"]
                                .as_str()
                                .and_then(|c| c.split(':').nth(1))
                                .and_then(|s| s.parse::<u64>().ok())
                            {
                                acks.lock()
                                    .expect("lock")
                                    .push(start.elapsed().as_micros() as u64 - t);
                            }
                            got += 1;
                        }
                    }
                });
                let t0 = Instant::now()
                    + Duration::from_millis((i as u64 * 1000) / PAIRS as u64 % 1000 / 10);
                for k in 0..n {
                    let due = t0 + Duration::from_secs_f64(k as f64 / per_sender);
                    tokio::time::sleep_until(due.into()).await;
                    let sent_at = start.elapsed().as_micros() as u64;
                    let frame = json!({"type": "send", "room": room, "client_id": format!("{k}:{sent_at}"), "text": "hello from the bench, 안녕하세요"}).to_string();
                    if tx
                        .write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                let _ = reader.await;
            });
            tasks.push((send, recv, n));
        }
        let mut sent = 0;
        for (s, r, n) in tasks {
            let _ = s.await;
            let _ = r.await;
            sent += n;
        }
        let m1 = metrics_text(&addr).await;
        let (s0, c0) = metric_sum_count(&m0, "confab_commit_batch_size");
        let (s1, c1) = metric_sum_count(&m1, "confab_commit_batch_size");
        let mut a = acks.lock().expect("lock").clone();
        let mut d = delivers.lock().expect("lock").clone();
        a.sort_unstable();
        d.sort_unstable();
        println!(
            "| {rate} | {sent} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} |",
            a.len(),
            pct(&a, 0.5),
            pct(&a, 0.99),
            pct(&a, 1.0),
            pct(&d, 0.5),
            pct(&d, 0.99),
            pct(&d, 1.0),
            (s1 - s0) / (c1 - c0).max(1.0)
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn metrics_text(addr: &str) -> String {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/metrics")
        .header("host", addr)
        .body(Empty::<Bytes>::new())
        .expect("req");
    let resp = send.send_request(req).await.expect("resp");
    String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned()
}
