//! Faults an operator meets: a full disk. The server runs on a small tmpfs
//! of its own (a private mount namespace, made with `unshare`), its disk is
//! filled under load and freed again; every send must get an answer, writes
//! resume by themselves, and SIGTERM stops it whatever the storage's state.

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// A server whose data directory is a `size_mb` tmpfs that only it sees.
struct SmallDisk {
    child: Option<Child>,
    addr: SocketAddr,
    /// The data directory as this process reaches it (through the server's
    /// mount namespace).
    data: PathBuf,
    log: Arc<Mutex<VecDeque<String>>>,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn start(size_mb: u32, settings: &[&str]) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).expect("mount point");
        let mut script = format!(
            "mount -t tmpfs -o size={size_mb}m tmpfs '{m}' && exec '{bin}' serve --listen 127.0.0.1:0 --data-dir '{m}'",
            m = mount.display(),
            bin = env!("CARGO_BIN_EXE_confab"),
        );
        for s in settings {
            script.push_str(&format!(" --set '{s}'"));
        }
        let mut cmd = Command::new("unshare");
        cmd.args(["-Urm", "sh", "-c", &script])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CONFAB_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("spawn unshare");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        drain_lines(child.stdout.take().expect("stdout"), log.clone(), Some(tx));
        drain_lines(child.stderr.take().expect("stderr"), log.clone(), None);
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("no listening line; log: {:?}", log.lock().expect("log"))
            });
        let data = PathBuf::from(format!("/proc/{}/root", child.id()))
            .join(mount.strip_prefix("/").expect("an absolute mount point"));
        SmallDisk {
            child: Some(child),
            addr,
            data,
            log,
            _dir: dir,
        }
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log");
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes zeros into `path` until the file system is full.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let block = vec![0u8; 64 << 10];
    let mut n = 0u64;
    while f.write_all(&block).is_ok() {
        n += block.len() as u64;
    }
    let _ = f.sync_all();
    n
}

async fn readiness(api: &Api) -> (u16, Value) {
    let (st, v) = api.get("/readyz", "").await;
    (st.as_u16(), v)
}

/// Sends one message and returns its answer (`ack` or `error`), which
/// must come within a second.
async fn send_one(ws: &mut Ws, room: &str, c: &str, text: &str) -> Value {
    let t = Instant::now();
    ws.send_msg(room, c, text).await;
    let v = ws
        .recv_until(|v| v["client_id"] == c || is_end(v), Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("send {c} got no answer within 5 s"));
    assert!(
        v["type"] == "ack" || v["type"] == "error",
        "the session ended: {v}"
    );
    let took = t.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "{c} was answered after {took:?}: {v}"
    );
    v
}

/// Sends until `enough` errors with code `code` came back (and no other
/// error); returns the acked (client id, seq) pairs.
async fn send_until_refused(
    ws: &mut Ws,
    room: &str,
    text: &str,
    tag: &str,
    code: &str,
    enough: usize,
) -> Vec<(String, u64)> {
    let mut acked = Vec::new();
    let mut refused = 0;
    let started = Instant::now();
    let mut i = 0;
    while refused < enough {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the disk never filled: {} acked",
            acked.len()
        );
        let c = format!("{tag}-{i}");
        i += 1;
        let v = send_one(ws, room, &c, text).await;
        if v["type"] == "ack" {
            acked.push((c, v["seq"].as_u64().expect("seq")));
        } else {
            assert_eq!(v["code"], code, "{v}");
            refused += 1;
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_recovers_by_itself_and_loses_nothing() {
    let mut settings = vec![
        "storage_reserve_mb=2",
        "shutdown_grace_secs=4",
        "search_enabled=false",
    ];
    settings.extend(UNLIMITED);
    let srv = SmallDisk::start(24, &settings);
    let api = Api(srv.addr);
    let a = api.new_user("full_a").await;
    let b = api.new_user("full_b").await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    assert_eq!(readiness(&api).await.0, 200);
    // Most of the disk is a file the test can delete later.
    let filler = srv.data.join("filler");
    let filled = fill(&filler);
    assert!(filled > 8 << 20, "the filler took {filled} bytes");
    std::fs::remove_file(&filler).expect("free the filler");
    let filler_size = filled - (4 << 20);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        f.write_all(&vec![0u8; filler_size as usize])
            .expect("write the filler");
        f.sync_all().expect("sync");
    }

    // Fill the rest with messages: every send is answered within a second,
    // first with acks, then with `storage_full`.
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    let text = "x".repeat(4000);
    let mut acked = send_until_refused(&mut ws, &room, &text, "fill", "storage_full", 20).await;
    assert!(
        !acked.is_empty(),
        "nothing was stored before the disk filled"
    );
    let (st, body) = readiness(&api).await;
    assert_eq!(st, 507, "{body}");
    assert_eq!(body["error"]["code"], "storage_full");
    assert_eq!(body["storage"], "full");
    let (st, _) = api.get("/healthz", "").await;
    assert_eq!(st.as_u16(), 200, "healthz is liveness");
    let (_, status) = api.get("/api/v1/status", "").await;
    assert_eq!(status["storage"]["state"], "full", "{status}");
    let metrics = api.raw(hyper::Method::GET, "/metrics", "", None, &[]).await;
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("confab_storage_state 1"),
        "the gauge says full"
    );
    // HTTP writes get the same clear answer.
    let r = api
        .post_message(&a.token, &room, &cid("h"), "by http")
        .await;
    assert_err(&r, 507, "storage_full");
    // Read positions and logouts still fit on the reserve.
    let extra = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": a.username, "password": PASSWORD}),
        )
        .await;
    assert_eq!(extra.0.as_u16(), 200, "{}", extra.1);
    let token = extra.1["token"].as_str().expect("token").to_string();
    let out = api.post("/api/v1/logout", &token, &json!({})).await;
    assert_eq!(out.0.as_u16(), 204, "a logout on a full disk: {}", out.1);

    // Space comes back: sends are acked again within 10 s, no restart.
    std::fs::remove_file(&filler).expect("free space");
    let freed = Instant::now();
    let mut n = 0;
    loop {
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "still not writable 10 s after space came back\n{}",
            srv.log_tail()
        );
        let c = format!("back-{n}");
        n += 1;
        let v = send_one(&mut ws, &room, &c, "after").await;
        if v["type"] == "ack" {
            acked.push((c, v["seq"].as_u64().expect("seq")));
            break;
        }
        assert_eq!(v["code"], "storage_full", "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("writable again {:?} after space came back", freed.elapsed());
    assert_eq!(readiness(&api).await.0, 200);
    for i in 0..5 {
        let v = ws
            .send_and_ack(&room, &format!("more{i}"), "and more")
            .await;
        acked.push((format!("more{i}"), v["seq"].as_u64().expect("seq")));
    }

    // Every acked message is stored, once, at its seq.
    let history = api.history_all(&b.token, &room).await;
    let by_client: HashMap<&str, u64> = history
        .iter()
        .filter_map(|m| Some((m["client_id"].as_str()?, m["seq"].as_u64()?)))
        .collect();
    for (c, seq) in &acked {
        assert_eq!(by_client.get(c.as_str()), Some(seq), "acked {c} at {seq}");
    }
    let seqs: Vec<u64> = history.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");

    // Full again, then SIGTERM: the server exits within its grace period.
    let _ = fill(&srv.data.join("filler2"));
    acked.extend(send_until_refused(&mut ws, &room, &text, "again", "storage_full", 1).await);
    let pid = srv.pid();
    let t = Instant::now();
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let mut srv = srv;
    let mut child = srv.child.take().expect("child");
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "no exit 6 s after SIGTERM with a full disk\n{}",
            srv.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("--- server log ---\n{}", srv.log_tail());
    assert!(status.success(), "{status:?}\n{}", srv.log_tail());
}
