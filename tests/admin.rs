//! The admin socket and the commands that use it, under faults (real
//! processes): accept failing for lack of file descriptors backs off
//! instead of spinning; `confab wallet credit` against a server that does
//! not answer gives up with one clear line, and the server does not run the
//! request it gave up on; partial backups left by a dead process are removed
//! at start (never one a running backup holds); a `confab backup` killed
//! mid-way cancels the server's backup, which removes its partial file and
//! frees the backup slot.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `confab ARGS` to completion (hermetic, see `confab_command`).
fn confab(args: &[&str], cwd: &Path) -> Output {
    confab_command(args, cwd).output().expect("run confab")
}

fn tmpdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

/// Waits until the server has logged a line containing `needle`.
fn wait_for_log(srv: &Server, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let tail = srv.log_tail();
        if tail.contains(needle) {
            return tail;
        }
        if Instant::now() > deadline {
            panic!(
                "the server did not log `{needle}` within {within:?}\n--- server log ---\n{tail}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU seconds (user + system, all threads) the process has used so far.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // After `(comm)` (which may hold spaces) come the fields from `state`
    // (field 3) on: utime is field 14, stime field 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// The process's open-file limit (soft, hard), as /proc shows it.
fn nofile(pid: i32) -> (String, String) {
    let limits =
        std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .expect("Max open files line");
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[0].to_string(), f[1].to_string())
}

fn prlimit_nofile(pid: i32, soft: &str, hard: &str) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:{hard}"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(out.status.success(), "prlimit: {}", stderr(&out));
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

async fn balance(api: &Api, u: &User) -> u64 {
    let (status, body) = api.get("/api/v1/wallet", &u.token).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    body["balance"].as_u64().expect("balance")
}

fn credit(srv: &Server, user: &str, amount: &str, timeout: &str) -> Output {
    let dir = srv.data_dir();
    confab(
        &[
            "wallet",
            "credit",
            user,
            amount,
            "--data-dir",
            s(dir),
            "--timeout",
            timeout,
        ],
        dir,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_backs_off_instead_of_spinning_when_out_of_file_descriptors() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let u = api.new_user("fds").await;
    let before = balance(&api, &u).await;
    let pid = srv.pid();
    let sock = srv.data_dir().join("admin.sock");
    let (soft, hard) = nofile(pid);

    // A limit just above the descriptors it has open: the first connections
    // take what is left, accept fails for the others.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .count();
    prlimit_nofile(pid, &(open + 2).to_string(), &hard);
    let conns: Vec<std::os::unix::net::UnixStream> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).expect("connect admin.sock"))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = cpu_secs(pid);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let share = (cpu_secs(pid) - t0) / started.elapsed().as_secs_f64();
    assert!(
        share < 0.20,
        "the server used {:.0}% of a core while accept failed (a spin, not a back-off)\n--- server log ---\n{}",
        share * 100.0,
        srv.log_tail()
    );
    // Logged once per episode, not once per attempt: a descriptor freed
    // elsewhere in the server may let one accept through and start a new
    // episode, which ends with its own "accepting again" line.
    let log = wait_for_log(&srv, "admin socket: accept failed", Duration::from_secs(5));
    let episodes = log.matches("admin socket: accept failed").count();
    let ended = log.matches("admin socket: accepting again").count();
    assert!(
        episodes == ended + 1 && episodes <= 3,
        "{episodes} failure lines, {ended} recoveries\n{log}"
    );

    // Meanwhile the CLI waits a bounded time and says what happened.
    let t = Instant::now();
    let out = credit(&srv, &u.username, "7", "2");
    assert!(!out.status.success(), "credit while accept fails: {out:?}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        stderr(&out).contains("did not answer within 2 s"),
        "{}",
        stderr(&out)
    );

    // The limit back: the server accepts again (within its back-off) and
    // a credit works; the request given up on above was not run.
    prlimit_nofile(pid, &soft, &hard);
    drop(conns);
    let out = credit(&srv, &u.username, "1", "10");
    assert!(
        out.status.success(),
        "credit after the limit was restored: {}",
        stderr(&out)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("credit answer");
    assert_eq!(answer["ok"], true, "{answer}");
    wait_for_log(
        &srv,
        "admin socket: accepting again",
        Duration::from_secs(5),
    );
    wait_for_log(
        &srv,
        "its client went away before it ran",
        Duration::from_secs(5),
    );
    assert_eq!(balance(&api, &u).await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_credit_gives_up_with_one_clear_line_when_the_server_does_not_answer() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let u = api.new_user("stop").await;
    let before = balance(&api, &u).await;
    let pid = srv.pid();

    // Stopped, the server's socket still takes the connection (the kernel
    // queues it) but nothing answers.
    signal(pid, libc::SIGSTOP);
    let t = Instant::now();
    let out = credit(&srv, &u.username, "5", "2");
    let took = t.elapsed();
    signal(pid, libc::SIGCONT);

    assert!(!out.status.success(), "{out:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(7),
        "gave up after {took:?} with --timeout 2"
    );
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("did not answer within 2 s"), "{err}");
    assert!(err.contains("see its log"), "{err}");
    assert!(
        err.contains("balance"),
        "says the credit is unconfirmed: {err}"
    );

    // Resumed, the server finds the request's client gone and does not run it.
    wait_for_log(
        &srv,
        "its client went away before it ran",
        Duration::from_secs(10),
    );
    assert_eq!(balance(&api, &u).await, before);
    let out = credit(&srv, &u.username, "5", "10");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(balance(&api, &u).await, before + 5);
}

/// Holds an exclusive `flock` on `path`, as a running backup holds its
/// partial file.
fn hold(path: &Path) -> std::fs::File {
    let f = std::fs::File::open(path).expect("open partial");
    // SAFETY: flock(2) on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0, "flock {}", path.display());
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_backups_left_by_a_dead_process_are_removed_but_not_one_being_written() {
    let dir = tmpdir("confab-test-");
    let bk = tmpdir("confab-test-bk-");
    let backups = dir.path().join("backups");
    std::fs::create_dir_all(&backups).expect("mkdir backups");
    let stale: Vec<PathBuf> = vec![
        backups.join("confab-20260101-000000.cfbk.partial"),
        backups.join("pre-migration-schema2-20260101-000000.cfbk.partial"),
        bk.path().join("confab-20260102-030405.cfbk.partial"),
    ];
    let kept: Vec<PathBuf> = vec![
        // Not named the way confab names its own backups.
        bk.path().join("notes.cfbk.partial"),
        bk.path().join("confab-latest.cfbk.partial"),
        // A finished backup.
        bk.path().join("confab-20260101-000000.cfbk"),
        // Being written (its writer holds the lock).
        bk.path().join("confab-20260103-000000.cfbk.partial"),
    ];
    for p in stale.iter().chain(&kept) {
        std::fs::write(p, b"half a backup").expect("write");
    }
    let held = hold(&kept[3]);

    let srv = Server::start_in(dir, &[&format!("backup_dir={}", s(bk.path()))]);
    for p in &stale {
        let name = p.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(!p.exists(), "{} is still there", p.display());
        wait_for_log(&srv, name, Duration::from_secs(5));
    }
    for p in &kept {
        assert!(p.exists(), "{} was removed", p.display());
    }
    drop(held);

    // Beside a file an operator chose: a partial left by a dead backup is
    // replaced by the next backup to that file ...
    let file = bk.path().join("mine.cfbk");
    let partial = bk.path().join("mine.cfbk.partial");
    std::fs::write(&partial, b"left by a killed server").expect("write");
    let data = srv.data_dir();
    let out = confab(&["backup", "--to", s(&file), "--data-dir", s(data)], data);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(file.exists() && !partial.exists());
    wait_for_log(&srv, "mine.cfbk.partial", Duration::from_secs(5));

    // ... but one that a running backup is writing is left alone, and the
    // new backup refused.
    let file = bk.path().join("busy.cfbk");
    let partial = bk.path().join("busy.cfbk.partial");
    std::fs::write(&partial, b"being written").expect("write");
    let held = hold(&partial);
    let out = confab(&["backup", "--to", s(&file), "--data-dir", s(data)], data);
    assert!(
        !out.status.success(),
        "a second writer of busy.cfbk.partial"
    );
    assert!(stderr(&out).contains("another backup"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&partial).expect("read"), b"being written");
    assert!(!file.exists());
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_cli_is_killed_is_cancelled_its_partial_removed_and_the_slot_freed() {
    let mut settings: Vec<&str> = UNLIMITED.to_vec();
    settings.extend([
        "search_enabled=false",
        "max_text_chars=600000",
        "max_body_bytes=1000000",
    ]);
    let srv = Server::start(&settings);
    let api = srv.api();
    let a = api.new_user("big").await;
    let room = api.group_room(&a.token, "big", &[]).await["id"]
        .as_str()
        .expect("room id")
        .to_string();
    // ~100 MB of messages: an online backup of them takes a few hundred ms.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (token, room) = (a.token.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let text = format!("{t:01}-{i:02} ").repeat(100_000);
                let (status, body) = api.post_message(&token, &room, &cid("big"), &text).await;
                assert_eq!(status.as_u16(), 201, "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("seed task");
    }

    let out_dir = tmpdir("confab-test-out-");
    let file = out_dir.path().join("killed.cfbk");
    let partial = out_dir.path().join("killed.cfbk.partial");
    let data = srv.data_dir();
    let mut cli = confab_command(&["backup", "--to", s(&file), "--data-dir", s(data)], data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn confab backup");
    // The backup has begun as soon as its partial file appears: freeze the
    // server right then (the backup has most of its work ahead), kill the
    // CLI, let the server go on: it must notice that nobody waits for the
    // backup any more.
    let pid = srv.pid();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !partial.exists() {
        assert!(Instant::now() < deadline, "the backup never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(pid, libc::SIGSTOP);
    let was_running = partial.exists() && !file.exists();
    signal(cli.id() as i32, libc::SIGKILL);
    let _ = cli.wait();
    // Stopped for longer than the server's 100 ms client check: it is due
    // as the server goes on (a 100 MB backup from the page cache takes less
    // than that; a real one is seconds long).
    std::thread::sleep(Duration::from_millis(300));
    signal(pid, libc::SIGCONT);
    assert!(was_running, "the backup was not under way");

    wait_for_log(&srv, "backup cancelled", Duration::from_secs(10));
    assert!(
        !partial.exists(),
        "the cancelled backup's partial file is still there"
    );
    assert!(
        !file.exists(),
        "the backup ran to its end although its client was gone"
    );

    // The slot is free: the next backup starts at once and completes.
    let out = confab(&["backup", "--to", s(&file), "--data-dir", s(data)], data);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("by the running server"),
        "{}",
        stderr(&out)
    );
    assert!(file.exists() && !partial.exists());
}
