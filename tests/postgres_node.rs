//! `confab serve` with its storage in PostgreSQL (`database_url`): a node
//! that keeps nothing of its own in its data directory (only the search
//! index and the token secret), serves the same API and keeps everything
//! across restarts; and the database's failures at start: an unreachable
//! one is waited for (saying which), one with a newer schema or the wrong
//! credentials is refused with the reason, and nothing is changed.
//! (Every other suite runs on PostgreSQL too with
//! `CONFAB_TEST_STORAGE=postgres`, which `tests/run` does for the chat's.)

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Server, confab_command, pg};
use hyper::StatusCode;
use serde_json::json;

/// A fresh database as a URL `database_url` takes.
fn database() -> (String, String) {
    let server = pg::server();
    let conn = server.fresh_database("serve");
    let dbname = conn
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .expect("dbname")
        .to_string();
    (
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", server.port()),
        dbname,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_postgres_serves_and_keeps_everything_across_restarts() {
    let (url, dbname) = database();
    let setting = format!("database_url={url}");
    let mut srv = Server::start(&[&setting]);
    let api = srv.api();
    let (code, status) = api.get("/api/v1/status", "").await;
    assert_eq!(code, StatusCode::OK, "{status}");
    assert_eq!(status["storage"]["backend"], "postgres");
    assert_eq!(status["storage"]["state"], "ok");
    assert_eq!(status["storage"]["database"]["pool_max"], 16);
    let a = api.new_user("pga").await;
    let b = api.new_user("pgb").await;
    let room = api.direct_room(&a.token, &b.id).await;
    let rid = room["id"].as_str().expect("room id").to_string();
    for i in 0..5 {
        let (code, body) = api
            .post(
                &format!("/api/v1/rooms/{rid}/messages"),
                &a.token,
                &json!({"text": format!("hello {i}"), "client_id": format!("c{i}")}),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
        assert_eq!(body["seq"], i + 1);
    }
    // The rows are in the database, and no embedded store was made.
    assert_eq!(
        pg::server()
            .psql(&dbname, "SELECT count(*) FROM messages")
            .trim(),
        "5"
    );
    assert!(!srv.data_dir().join("confab.redb").exists());

    srv.stop();
    srv.restart();
    let api = srv.api();
    let (code, body) = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": b.username, "password": common::PASSWORD}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let token = body["token"].as_str().expect("token").to_string();
    let (code, history) = api
        .get(&format!("/api/v1/rooms/{rid}/messages"), &token)
        .await;
    assert_eq!(code, StatusCode::OK, "{history}");
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(
        texts,
        ["hello 0", "hello 1", "hello 2", "hello 3", "hello 4"]
    );
    // A token of the first run still works (the same secret).
    let (code, _) = api.get("/api/v1/rooms", &a.token).await;
    assert_eq!(code, StatusCode::OK);
    // Search finds what the indexer read from the database.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, found) = api.get("/api/v1/search?q=hello", &token).await;
        assert_eq!(code, StatusCode::OK, "{found}");
        if found["hits"].as_array().is_some_and(|h| h.len() == 5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "search never found the 5: {found}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.stop();
}

/// Starts `confab serve` on `url` without waiting for it to listen; its
/// output lines arrive on the returned channel.
fn serve(
    url: &str,
    dir: &std::path::Path,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut cmd = confab_command(&["serve", "--listen", "127.0.0.1:0", "--data-dir"], dir);
    cmd.arg(dir)
        .arg("--set")
        .arg(format!("database_url={url}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn confab");
    let (tx, rx) = std::sync::mpsc::channel();
    for out in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

/// Lines until one contains `want` (or `within` passes): all of them.
fn until(rx: &std::sync::mpsc::Receiver<String>, want: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let hit = line.contains(want);
        seen.push(line);
        if hit {
            break;
        }
    }
    seen
}

#[test]
fn an_unreachable_database_is_waited_for_and_a_refusing_one_ends_the_start() {
    let dir = tempfile::tempdir().expect("dir");
    // Nothing listens on this port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (mut child, rx) = serve(
        &format!("postgresql://postgres@127.0.0.1:{closed}/nothing"),
        dir.path(),
    );
    let lines = until(&rx, "waiting for the database", Duration::from_secs(15));
    let said = lines.join("\n");
    assert!(
        said.contains("waiting for the database") && said.contains(&format!("127.0.0.1:{closed}")),
        "the node says which database it waits for:\n{said}"
    );
    // Still waiting a while later (no crash loop, no exit).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the node gave up:\n{said}"
    );
    let _ = child.kill();
    let _ = child.wait();

    // Wrong credentials: refused at once, with the database's reason.
    let server = pg::server();
    let (_, dbname) = database();
    let (mut child, rx) = serve(
        &format!("postgresql://nobody@127.0.0.1:{}/{dbname}", server.port()),
        dir.path(),
    );
    let status = wait_exit(&mut child, Duration::from_secs(15));
    let said: Vec<String> = rx.try_iter().collect();
    assert!(!status.success());
    assert!(
        said.join("\n").contains("\"nobody\""),
        "the refusal names the role:\n{}",
        said.join("\n")
    );

    // A database of a newer schema: refused naming both versions, unchanged.
    let (url, dbname) = database();
    let (mut child, rx) = serve(&url, dir.path());
    let _ = until(&rx, "confab listening", Duration::from_secs(20));
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = wait_exit(&mut child, Duration::from_secs(20));
    server.psql(
        &dbname,
        "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
    );
    let (mut child, rx) = serve(&url, dir.path());
    let status = wait_exit(&mut child, Duration::from_secs(15));
    let said = rx.try_iter().collect::<Vec<_>>().join("\n");
    assert!(!status.success());
    assert!(
        said.contains("schema version 99")
            && said.contains(&format!(
                "({})",
                confab::storage::postgres::schema::SCHEMA_VERSION
            )),
        "the refusal names both versions:\n{said}"
    );
    assert_eq!(
        server
            .psql(
                &dbname,
                "SELECT value FROM meta WHERE key = 'schema_version'"
            )
            .trim(),
        "99"
    );
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            // Let the output threads drain.
            std::thread::sleep(Duration::from_millis(100));
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP relay in front of the database that can cut a connection right
/// after passing on the `COMMIT` of a transaction that carried a given
/// text (the server commits; the client never hears so: an unknown
/// outcome), and refuse new connections for a while (a failover in
/// progress).
struct Relay {
    addr: std::net::SocketAddr,
    /// Cut the next connection that commits a transaction which sent
    /// `marker`, after passing its COMMIT on.
    cut_after_commit: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Close new connections at once.
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr, marker: &'static [u8]) -> Relay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let (c, r) = (cut.clone(), refusing.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let cut = c.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    let mut buf = vec![0u8; 1 << 16];
                    let mut marked = false;
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let chunk = &buf[..n];
                        marked |= chunk.windows(marker.len()).any(|w| w == marker);
                        if !chunk.windows(6).any(|w| w == b"COMMIT") {
                            continue;
                        }
                        if std::mem::take(&mut marked) && cut.swap(false, Ordering::SeqCst) {
                            // Let the server commit, then drop both sides
                            // before its answer reaches the client.
                            down.abort();
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            return;
                        }
                    }
                    down.abort();
                });
            }
        });
        Relay {
            addr,
            cut_after_commit: cut,
            refusing,
        }
    }
}

/// A send whose COMMIT reached the database but whose answer was lost is
/// resolved before it is answered: acked once, with the seq it got, and a
/// resend of it is the same message. While the writer is finding out,
/// other sends are refused at once with a retryable error rather than
/// left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_resolved_and_other_sends_are_refused_meanwhile() {
    use std::sync::atomic::Ordering;
    let (_, dbname) = database();
    let pg_addr: std::net::SocketAddr = format!("127.0.0.1:{}", pg::server().port())
        .parse()
        .expect("addr");
    let relay = Relay::start(pg_addr, b"in doubt").await;
    let setting = format!(
        "database_url=postgresql://postgres@127.0.0.1:{}/{dbname}",
        relay.addr.port()
    );
    let mut settings = vec![setting.as_str()];
    settings.extend(common::UNLIMITED);
    let mut srv = Server::start(&settings);
    let api = srv.api();
    let a = api.new_user("lost_a").await;
    let b = api.new_user("lost_b").await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (code, first) = api.post_message(&a.token, &room, "c-1", "before").await;
    assert_eq!(code, StatusCode::CREATED, "{first}");

    // The next commit's answer is lost, and the database is unreachable
    // for 3 s after it.
    relay.refusing.store(true, Ordering::SeqCst);
    relay.cut_after_commit.store(true, Ordering::SeqCst);
    let (token, r) = (a.token.clone(), room.clone());
    let lost = tokio::spawn(async move {
        let t = Instant::now();
        let (code, body) = api.post_message(&token, &r, "c-2", "in doubt").await;
        (code, body, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !lost.is_finished(),
        "the send in doubt waits for its outcome"
    );
    let t = Instant::now();
    let (code, body) = api.post_message(&a.token, &room, "c-3", "meanwhile").await;
    let waited = t.elapsed();
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        waited < Duration::from_millis(1500),
        "refused at once, not held behind the commit in doubt: {waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    relay.refusing.store(false, Ordering::SeqCst);

    // The commit did happen: acked with its seq, after the database came back.
    let (code, body, took) = lost.await.expect("send");
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(body["seq"], 2, "{body}");
    assert!(
        took >= Duration::from_secs(2),
        "answered only once resolved: {took:?}"
    );
    // Sent again with its client_id: the same message, not a second one;
    // the refused one goes through now.
    let (code, again) = api.post_message(&a.token, &room, "c-2", "in doubt").await;
    assert!(code.is_success(), "{code} {again}");
    assert_eq!(again["seq"], 2, "{again}");
    let (code, later) = api.post_message(&a.token, &room, "c-3", "meanwhile").await;
    assert_eq!(code, StatusCode::CREATED, "{later}");
    assert_eq!(later["seq"], 3, "{later}");
    let history = api.history_all(&a.token, &room).await;
    let texts: Vec<&str> = history.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, ["before", "in doubt", "meanwhile"]);
    srv.stop();
}
