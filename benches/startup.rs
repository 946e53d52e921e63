//! Start-up time with a large store: fills a data directory with
//! `CONFAB_STARTUP_MESSAGES` messages (default 10,000,000) in 10,000 rooms
//! through confab's own tables and encodings, then starts the real binary
//! several times and reports how long it takes until it listens and until
//! `/healthz` answers — after a clean shutdown and after a SIGKILL.
//!
//! Run with `cargo bench --bench startup`. Set `CONFAB_STARTUP_DIR` to keep
//! (and reuse) the filled directory between runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use confab::store::{MESSAGES, MessageRecord, Store};

const ROOMS: u64 = 10_000;
const BATCH: u64 = 100_000;

fn fill(dir: &Path, total: u64) {
    let store = Store::open(dir).expect("open store");
    let started = Instant::now();
    let mut done = 0u64;
    while done < total {
        let txn = store.db.begin_write().expect("begin write");
        {
            let mut messages = txn.open_table(MESSAGES).expect("messages table");
            for i in done..(done + BATCH).min(total) {
                let room = i % ROOMS + 1;
                let seq = i / ROOMS + 1;
                let rec = MessageRecord {
                    from: room,
                    ts: 1_764_000_000_000 + i as i64,
                    client_id: format!("fill-{i}"),
                    text: format!("message {i} — 채팅 메시지 for the start-up benchmark"),
                    payment: None,
                };
                messages
                    .insert(
                        (room, seq),
                        rec.sealed(confab::ids::RoomId(room), seq).as_slice(),
                    )
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
        done = (done + BATCH).min(total);
        eprint!("\rfilled {done}/{total}");
    }
    eprintln!(" in {:.1} s", started.elapsed().as_secs_f64());
}

/// The caller waits for the returned child.
/// Starts the server; returns (time to the listening line, time to a 200
/// from /healthz) and the child.
#[allow(clippy::zombie_processes)]
fn start(dir: &Path) -> (Duration, Duration, std::process::Child) {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--set",
            "log=warn",
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start confab");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let listening = t0.elapsed();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap_or_default()
        .to_string();
    loop {
        if let Ok(mut s) = TcpStream::connect(&addr) {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return (listening, t0.elapsed(), child);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    let total: u64 = std::env::var("CONFAB_STARTUP_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let keep = std::env::var_os("CONFAB_STARTUP_DIR");
    let dir = match &keep {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("confab-startup-{}", std::process::id())),
    };
    if !dir.join("confab.redb").exists() {
        fill(&dir, total);
    }
    let size = std::fs::metadata(dir.join("confab.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("store: {} ({:.2} GB)", dir.display(), size as f64 / 1e9);
    println!("| start | after | listening | /healthz 200 |");
    println!("|---|---|---|---|");
    for run in 1..=3 {
        let (l, h, mut child) = start(&dir);
        println!(
            "| {run} | clean shutdown | {:.0} ms | {:.0} ms |",
            l.as_secs_f64() * 1e3,
            h.as_secs_f64() * 1e3
        );
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let _ = child.wait();
    }
    let (_, _, mut child) = start(&dir);
    let _ = child.kill();
    let _ = child.wait();
    let (l, h, mut child) = start(&dir);
    println!(
        "| 4 | SIGKILL | {:.0} ms | {:.0} ms |",
        l.as_secs_f64() * 1e3,
        h.as_secs_f64() * 1e3
    );
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
