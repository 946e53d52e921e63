//! Operations: an online backup taken while clients send holds exactly a
//! gap-free prefix of every room (all that was acked before it), restores
//! into a working server whose old tokens still work and whose ledger
//! verifies; restore refuses damaged files and non-empty targets without
//! changing anything; exports stream every message once, in order, and only
//! to members; a schema-1 store written by an old binary is backed up and
//! migrated on start, a newer schema refused; periodic backups keep a count.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Runs `confab ARGS` to completion (hermetic, see `confab_command`).
fn confab(args: &[&str], cwd: &Path) -> Output {
    confab_command(args, cwd).output().expect("run confab")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout_json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(o)
        )
    })
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn tmpdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// The messages of a room as (seq, from, client_id, text).
fn keyed(history: &[Value]) -> Vec<(u64, String, String, String)> {
    history
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["from"].as_str().expect("from").to_string(),
                m["client_id"].as_str().unwrap_or("").to_string(),
                m["text"].as_str().expect("text").to_string(),
            )
        })
        .collect()
}

/// `confab wallet verify` on a data dir; must report no breach.
fn wallet_verify(dir: &Path) -> Value {
    let out = confab(&["wallet", "verify", "--data-dir", s(dir)], dir);
    assert!(out.status.success(), "wallet verify: {}", stderr(&out));
    let v = stdout_json(&out);
    assert_eq!(v["breaches"], json!([]), "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_holds_exactly_the_acked_prefix_and_restores_into_a_working_server() {
    let settings = [
        "signup_bonus=100000",
        "send_rate_per_sec=100000",
        "send_burst=100000",
        "user_send_rate_per_sec=100000",
        "user_send_burst=100000",
        "frame_rate_per_sec=100000",
        "frame_burst=100000",
    ];
    let srv = Server::start(&settings);
    let api = srv.api();
    let mut users = Vec::new();
    for _ in 0..5 {
        users.push(api.new_user("bk").await);
    }
    let ids: Vec<&str> = users.iter().map(|u| u.id.as_str()).collect();
    let group = api.group_room(&users[0].token, "모두 all", &ids).await["id"]
        .as_str()
        .expect("group id")
        .to_string();
    let mut rooms = vec![group.clone()];
    for i in 0..5 {
        let peer = &users[(i + 1) % 5];
        let r = api.direct_room(&users[i].token, &peer.id).await;
        rooms.push(r["id"].as_str().expect("room id").to_string());
    }
    // Money moves too, so the ledger in the backup is not trivial.
    for i in 0..5 {
        let (status, body) = api
            .post(
                "/api/v1/wallet/transfers",
                &users[i].token,
                &json!({"to_user_id": users[(i + 1) % 5].id, "amount": 1000 + i, "idempotency_key": cid("k")}),
            )
            .await;
        assert_eq!(status.as_u16(), 201, "{body}");
    }

    // Five clients send continuously (each waits for its ack), alternating
    // between its direct room and the group; every ack is recorded with
    // the time it arrived.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let (addr, token) = (srv.addr, u.token.clone());
        let (direct, group, stop) = (rooms[i + 1].clone(), group.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws = Ws::connect_auth(addr, &token).await;
            let mut acks: Vec<(Instant, String, u64, String)> = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let room = if n.is_multiple_of(2) { &group } else { &direct };
                let c = format!("c{i}-{n}");
                ws.send_msg(room, &c, &format!("backup load {i} {n} 백업"))
                    .await;
                let ack = ws
                    .expect("an ack", |v| {
                        v["type"] == "ack" && v["client_id"] == c.as_str()
                    })
                    .await;
                acks.push((
                    Instant::now(),
                    room.clone(),
                    ack["seq"].as_u64().expect("seq"),
                    c,
                ));
            }
            acks
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let file = srv
        .data_dir()
        .parent()
        .expect("tmp")
        .join(format!("confab-test-backup-{}.cfbk", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let started = Instant::now();
    let out = {
        let (dir, file) = (srv.data_dir().to_path_buf(), file.clone());
        tokio::task::spawn_blocking(move || {
            confab(&["backup", "--to", s(&file), "--data-dir", s(&dir)], &dir)
        })
        .await
        .expect("backup task")
    };
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert!(
        stderr(&out).contains("by the running server"),
        "the running server takes the backup: {}",
        stderr(&out)
    );
    let summary = stdout_json(&out);
    // Keep sending a little after the snapshot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<(Instant, String, u64, String)> = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("sender"));
    }
    let before: Vec<_> = acked.iter().filter(|a| a.0 < started).collect();
    let after_backup = acked.len() - before.len();
    assert!(
        before.len() > 50,
        "only {} sends acked before the backup",
        before.len()
    );
    assert!(after_backup > 0, "nothing was sent during/after the backup");

    // Restore into a new directory.
    let target = tmpdir("confab-restored-");
    let restored_dir = target.path().join("data");
    let out = confab(
        &[
            "restore",
            "--from",
            s(&file),
            "--data-dir",
            s(&restored_dir),
        ],
        target.path(),
    );
    assert!(out.status.success(), "restore: {}", stderr(&out));
    let report = stdout_json(&out);
    assert_eq!(report["contents"]["messages"], summary["messages"]);
    assert_eq!(report["wallet"]["breaches"], json!([]), "{report}");
    assert_eq!(report["secret_restored"], true);
    assert!(
        !restored_dir.join("search").exists(),
        "the index is not restored"
    );
    wallet_verify(&restored_dir);

    // A server on the restored store: the old tokens still work.
    let data = tempfile::TempDir::new_in(target.path()).expect("tempdir");
    std::fs::remove_dir(data.path()).expect("rmdir");
    std::fs::rename(&restored_dir, data.path()).expect("move restored dir");
    let copy = Server::start_in(data, &settings);
    let capi = copy.api();
    let mut total = 0u64;
    for (i, room) in rooms.iter().enumerate() {
        // Room 0 is the group; room i > 0 is user i-1's direct room.
        let member = &users[i.saturating_sub(1)];
        let live = keyed(&api.history_all(&member.token, room).await);
        let got = keyed(&capi.history_all(&member.token, room).await);
        // Gap-free from 1, and exactly the live room's first messages.
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.0, i as u64 + 1, "room {room}: a gap at {}", i + 1);
        }
        assert_eq!(
            got[..],
            live[..got.len()],
            "room {room}: the backup differs from the live store"
        );
        // Everything acked before the backup started is in it.
        let have: HashSet<u64> = got.iter().map(|m| m.0).collect();
        for a in before.iter().filter(|a| &a.1 == room) {
            assert!(
                have.contains(&a.2),
                "room {room}: acked seq {} ({}) missing",
                a.2,
                a.3
            );
        }
        total += got.len() as u64;
    }
    assert_eq!(Some(total), summary["messages"].as_u64(), "{summary}");
    assert!(
        (total as usize) < before.len() + after_backup + 5,
        "the backup cannot hold messages sent after it finished"
    );

    // Balances match what the live server had (no transfer since), and the
    // index rebuilds: a restored message is searchable.
    for u in &users {
        let (_, live) = api.get("/api/v1/wallet", &u.token).await;
        let (status, got) = capi.get("/api/v1/wallet", &u.token).await;
        assert_eq!(status.as_u16(), 200, "{got}");
        assert_eq!(got["balance"], live["balance"]);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = capi
            .get(
                "/api/v1/search?q=%EB%B0%B1%EC%97%85&limit=1",
                &users[0].token,
            )
            .await;
        assert_eq!(status.as_u16(), 200, "{body}");
        if body["total"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restored messages never became searchable"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_file(&file);
}

/// A stopped server's store with a few messages, and its offline backup.
async fn small_backup(prefix: &str) -> (Server, PathBuf, User, String) {
    let mut srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user(prefix).await;
    let b = api.new_user(prefix).await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    for i in 0..20 {
        let (st, _) = api
            .post_message(&a.token, &room, &cid("m"), &format!("hello {i}"))
            .await;
        assert!(st.is_success());
    }
    srv.stop();
    let file = srv
        .data_dir()
        .join("..")
        .join(format!("{prefix}-{}.cfbk", std::process::id()));
    let out = confab(
        &["backup", "--to", s(&file), "--data-dir", s(srv.data_dir())],
        srv.data_dir(),
    );
    assert!(out.status.success(), "offline backup: {}", stderr(&out));
    assert!(!stderr(&out).contains("by the running server"));
    assert_eq!(stdout_json(&out)["messages"], 20);
    (srv, file, a, room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_damaged_files_and_non_empty_targets_and_changes_nothing() {
    let (mut srv, file, a, room) = small_backup("rf").await;
    let good = std::fs::read(&file).expect("read backup");
    let work = tmpdir("confab-restore-");

    // The same file name again is refused without --force.
    let out = confab(
        &["backup", "--to", s(&file), "--data-dir", s(srv.data_dir())],
        work.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));

    let target = work.path().join("new");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    cases.push(("a flipped byte", flipped, "damaged"));
    let mut flipped_end = good.clone();
    let n = flipped_end.len();
    flipped_end[n - 3] ^= 1;
    cases.push(("a flipped checksum byte", flipped_end, "damaged"));
    cases.push((
        "truncated",
        good[..good.len() * 2 / 3].to_vec(),
        "truncated",
    ));
    cases.push((
        "cut before the checksum",
        good[..good.len() - 10].to_vec(),
        "truncated",
    ));
    let mut magic = good.clone();
    magic[0] = b'X';
    cases.push(("another file", magic, "not a confab backup"));
    cases.push(("empty", Vec::new(), "not a confab backup"));
    for (what, bytes, expect) in cases {
        let bad = work.path().join("bad.cfbk");
        std::fs::write(&bad, &bytes).expect("write");
        let out = confab(
            &["restore", "--from", s(&bad), "--data-dir", s(&target)],
            work.path(),
        );
        assert!(!out.status.success(), "{what}: restore succeeded");
        let err = stderr(&out);
        // A flipped byte is caught by the checksum, or earlier by the
        // record it lands in (a length, say): either way, refused.
        let caught =
            err.contains(expect) || (expect == "damaged" && err.contains("corrupt backup"));
        assert!(err.contains("restore refused") && caught, "{what}: {err}");
        assert!(!target.exists(), "{what}: the target was created");
    }

    // A non-empty target: refused, untouched.
    let busy = work.path().join("busy");
    std::fs::create_dir_all(&busy).expect("mkdir");
    std::fs::write(busy.join("keep.txt"), b"mine").expect("write");
    let out = confab(
        &["restore", "--from", s(&file), "--data-dir", s(&busy)],
        work.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(listing(&busy), vec!["keep.txt"]);

    // --force with a damaged file: still nothing changes.
    let bad = work.path().join("bad.cfbk");
    std::fs::write(&bad, &good[..good.len() / 2]).expect("write");
    let out = confab(
        &[
            "restore",
            "--from",
            s(&bad),
            "--data-dir",
            s(&busy),
            "--force",
        ],
        work.path(),
    );
    assert!(!out.status.success());
    assert_eq!(listing(&busy), vec!["keep.txt"]);

    // --force onto a running server's directory is refused.
    srv.restart();
    let before = listing(srv.data_dir());
    let out = confab(
        &[
            "restore",
            "--from",
            s(&file),
            "--data-dir",
            s(srv.data_dir()),
            "--force",
        ],
        work.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("running"), "{}", stderr(&out));
    assert_eq!(listing(srv.data_dir()), before);
    let history = srv.api().history_all(&a.token, &room).await;
    assert_eq!(history.len(), 20);
    srv.stop();

    // A good file with --force replaces the store and keeps other files.
    let out = confab(
        &[
            "restore",
            "--from",
            s(&file),
            "--data-dir",
            s(&busy),
            "--force",
        ],
        work.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        listing(&busy),
        vec!["confab.redb", "jwt_secret", "keep.txt"]
    );
    let _ = std::fs::remove_file(&file);
}

/// Reads a JSON Lines export: every line parses on its own.
fn lines(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("utf-8 export");
    assert!(text.ends_with('\n'), "the export ends with a newline");
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("line {}: {e}: {l}", i + 1))
        })
        .collect()
}

/// Every room's messages in an export: in seq order, once each, gap-free.
fn messages_by_room(export: &[Value]) -> BTreeMap<String, Vec<(u64, String, String, String)>> {
    let mut out: BTreeMap<String, Vec<(u64, String, String, String)>> = BTreeMap::new();
    let mut current_room = String::new();
    for v in export {
        match v["type"].as_str() {
            Some("room") => current_room = v["id"].as_str().expect("room id").to_string(),
            Some("message") => {
                let room = v["room"].as_str().expect("room").to_string();
                assert_eq!(room, current_room, "messages follow their room line");
                assert!(v["ts"].is_i64(), "{v}");
                out.entry(room)
                    .or_default()
                    .extend(keyed(std::slice::from_ref(v)));
            }
            _ => {}
        }
    }
    for (room, msgs) in &out {
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(
                m.0,
                i as u64 + 1,
                "room {room}: out of order, repeated or missing at {}",
                i + 1
            );
        }
    }
    out
}

/// What [`export_through_the_api`] exported, for the checks that follow.
struct Exported {
    mine: Vec<Value>,
    by_room: BTreeMap<String, Vec<(u64, String, String, String)>>,
    transfers: Vec<Value>,
    username: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_stream_every_message_once_in_order_and_only_to_members() {
    let mut settings = vec!["signup_bonus=50000"];
    settings.extend(UNLIMITED);
    let mut srv = Server::start(&settings);
    let e = export_through_the_api(&srv).await;
    offline_exports(&mut srv, &e);
}

/// The same exports from a node whose storage is PostgreSQL: one
/// repeatable-read snapshot, the same lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_on_postgres_are_the_same_snapshot_lines() {
    let url = common::pg::server().fresh_database("export");
    let dbname = url
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .expect("dbname")
        .to_string();
    let database = format!(
        "database_url=postgresql://postgres@127.0.0.1:{}/{dbname}",
        common::pg::server().port()
    );
    let mut settings = vec!["signup_bonus=50000", database.as_str()];
    settings.extend(UNLIMITED);
    let srv = Server::start(&settings);
    export_through_the_api(&srv).await;
}

/// Users, a contact, a direct chat of 250 messages, a group of 30, a
/// transfer; then the exports over HTTP and through the CLI (the running
/// server's admin socket), checked against the live history.
async fn export_through_the_api(srv: &Server) -> Exported {
    let api = srv.api();
    let a = api.new_user("ex").await;
    let b = api.new_user("ex").await;
    let c = api.new_user("ex").await;
    let (st, _) = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": b.username}),
        )
        .await;
    assert!(st.is_success());
    let direct = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let group = api.group_room(&a.token, "내보내기", &[&b.id, &c.id]).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    for i in 0..250 {
        let text = format!("line {i} \"quoted\"\nnext 줄 {i}");
        let (st, _) = api.post_message(&a.token, &direct, &cid("e"), &text).await;
        assert!(st.is_success());
    }
    for i in 0..30 {
        let from = if i % 2 == 0 { &b } else { &c };
        let (st, _) = api
            .post_message(&from.token, &group, &cid("g"), &format!("group {i}"))
            .await;
        assert!(st.is_success());
    }
    let (st, body) = api
        .post(
            "/api/v1/wallet/transfers",
            &a.token,
            &json!({"to_user_id": b.id, "amount": 1234, "idempotency_key": "exp-1", "note": "점심"}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "{body}");

    // GET /api/v1/me/export
    let r = api
        .raw(hyper::Method::GET, "/api/v1/me/export", &a.token, None, &[])
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/x-ndjson"),
        "{:?}",
        r.header("content-type")
    );
    let mine = lines(&r.body);
    assert_eq!(mine[0]["type"], "export");
    assert_eq!(mine[0]["format"], "confab-export");
    assert_eq!(mine[0]["scope"], "user");
    assert_eq!(mine[1]["type"], "user");
    assert_eq!(mine[1]["id"], a.id.as_str());
    assert_eq!(mine[1]["username"], a.username.as_str());
    assert!(
        mine[1].get("password_hash").is_none(),
        "no password hash in an export"
    );
    let contacts: Vec<&Value> = mine.iter().filter(|v| v["type"] == "contact").collect();
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0]["id"], b.id.as_str());
    let rooms: HashSet<&str> = mine
        .iter()
        .filter(|v| v["type"] == "room")
        .map(|v| v["id"].as_str().expect("id"))
        .collect();
    assert_eq!(rooms, HashSet::from([direct.as_str(), group.as_str()]));
    let by_room = messages_by_room(&mine);
    for room in [&direct, &group] {
        let live = keyed(&api.history_all(&a.token, room).await);
        assert_eq!(by_room[room.as_str()], live, "room {room}");
    }
    let payment = mine
        .iter()
        .find(|v| v["type"] == "message" && v["kind"] == "payment")
        .expect("the payment message");
    assert_eq!(payment["payment"]["amount"], 1234);
    let wallet = mine
        .iter()
        .find(|v| v["type"] == "wallet")
        .expect("wallet line");
    assert_eq!(wallet["balance"], 50000 - 1234);
    let transfers: Vec<&Value> = mine.iter().filter(|v| v["type"] == "transfer").collect();
    assert!(
        transfers
            .iter()
            .any(|t| t["amount"] == 1234 && t["direction"] == "out")
    );
    let end = mine.last().expect("end line");
    assert_eq!(end["type"], "end");
    assert_eq!(end["messages"], 281);
    assert_eq!(end["rooms"], 2);

    // A room export: members only.
    let path = format!("/api/v1/rooms/{direct}/export");
    let (st, body) = api.get(&path, &c.token).await;
    assert_err(&(st, body), 404, "room_not_found");
    let (st, _) = api.get(&path, "").await;
    assert_eq!(st.as_u16(), 401);
    let (st, body) = api.get("/api/v1/rooms/zz/export", &a.token).await;
    assert_eq!(st.as_u16(), 400, "{body}");
    let r = api
        .raw(hyper::Method::GET, &path, &b.token, None, &[])
        .await;
    assert_eq!(r.status.as_u16(), 200);
    let room_lines = lines(&r.body);
    assert_eq!(room_lines[0]["scope"], "room");
    assert_eq!(
        messages_by_room(&room_lines)[direct.as_str()],
        by_room[direct.as_str()]
    );

    // The CLI, through the running server.
    let dir = srv.data_dir().to_path_buf();
    let online = confab(&["export", "--room", &direct, "--data-dir", s(&dir)], &dir);
    assert!(online.status.success(), "{}", stderr(&online));
    let online = lines(&online.stdout);
    assert_eq!(
        messages_by_room(&online)[direct.as_str()],
        by_room[direct.as_str()]
    );
    let out = confab(
        &["export", "--user", "nobody_here", "--data-dir", s(&dir)],
        &dir,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("user"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "no output on an error");
    let by_user = confab(
        &["export", "--user", &a.username, "--data-dir", s(&dir)],
        &dir,
    );
    assert!(by_user.status.success(), "{}", stderr(&by_user));
    assert_eq!(messages_by_room(&lines(&by_user.stdout)), by_room);
    let transfers = transfers.into_iter().cloned().collect();
    Exported {
        mine,
        by_room,
        transfers,
        username: a.username.clone(),
    }
}

/// Exports straight from a stopped embedded server's store: the same lines.
fn offline_exports(srv: &mut Server, e: &Exported) {
    let Exported {
        mine,
        by_room,
        transfers,
        username,
    } = e;
    let dir = srv.data_dir().to_path_buf();
    srv.stop();
    let file = dir.join("a.jsonl");
    let out = confab(
        &[
            "export",
            "--user",
            username,
            "--out",
            s(&file),
            "--data-dir",
            s(&dir),
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let offline = lines(&std::fs::read(&file).expect("read export"));
    assert_eq!(offline.len(), mine.len());
    assert_eq!(&messages_by_room(&offline), by_room);
    // Transfer ids too are the server's (the key comes from its secret).
    let offline_transfers: Vec<Value> = offline
        .iter()
        .filter(|v| v["type"] == "transfer")
        .cloned()
        .collect();
    assert_eq!(&offline_transfers, transfers);
    let out = confab(
        &[
            "export",
            "--room",
            "0123456789abcdef",
            "--data-dir",
            s(&dir),
        ],
        &dir,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("room"), "{}", stderr(&out));
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/store-v1")
}

/// A temporary data dir holding a copy of the schema-1 fixture.
fn fixture_copy() -> tempfile::TempDir {
    let dir = tmpdir("confab-v1-");
    std::fs::copy(
        fixture_dir().join("confab.redb"),
        dir.path().join("confab.redb"),
    )
    .expect("copy fixture");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_store_from_an_old_binary_is_backed_up_and_migrated_and_a_newer_one_refused() {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(fixture_dir().join("manifest.json")).expect("manifest"),
    )
    .expect("manifest json");
    assert_eq!(manifest["schema_version"], 1);
    let secret = format!(
        "jwt_secret={}",
        manifest["jwt_secret"].as_str().expect("secret")
    );
    let srv = Server::start_in(fixture_copy(), &[&secret]);
    let log = srv.log_tail();
    assert!(log.contains("store backed up before migration"), "{log}");
    assert!(log.contains("store upgraded from schema 1 to 4"), "{log}");
    let backups = listing(&srv.data_dir().join("backups"));
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert!(backups[0].starts_with("pre-migration-schema1-") && backups[0].ends_with(".cfbk"));

    // Everything the old binary stored is there, for its users.
    let api = srv.api();
    let password = manifest["password"].as_str().expect("password");
    let mut tokens = HashMap::new();
    for u in manifest["users"].as_array().expect("users") {
        let (st, body) = api
            .post(
                "/api/v1/login",
                "",
                &json!({"username": u["username"], "password": password}),
            )
            .await;
        assert_eq!(st.as_u16(), 200, "login {}: {body}", u["username"]);
        assert_eq!(body["user"]["display_name"], u["display_name"]);
        tokens.insert(
            u["id"].as_str().expect("id").to_string(),
            body["token"].as_str().expect("token").to_string(),
        );
    }
    for room in manifest["rooms"].as_array().expect("rooms") {
        let id = room["id"].as_str().expect("id");
        let member = room["members"][0].as_str().expect("member");
        let entry = api.room_entry(&tokens[member], id).await;
        assert_eq!(entry["name"], room["name"]);
        assert_eq!(entry["last_seq"], room["last_seq"]);
        let got = api.history_all(&tokens[member], id).await;
        let want: Vec<&Value> = manifest["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["room"] == id)
            .collect();
        assert_eq!(got.len(), want.len(), "room {id}");
        for (g, w) in got.iter().zip(want) {
            for field in ["seq", "from", "text", "client_id", "ts"] {
                assert_eq!(g[field], w[field], "room {id} seq {}: {field}", w["seq"]);
            }
        }
    }
    // The migrated messages are indexed (the log was back-filled).
    let alice = &tokens[manifest["users"][0]["id"].as_str().expect("id")];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = api.get("/api/v1/search?q=%ED%9A%8C%EC%9D%98", alice).await;
        if body["total"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "migrated messages never searchable: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The automatic backup restores to the schema-1 store as it was.
    let work = tmpdir("confab-v1-restore-");
    let target = work.path().join("d");
    let pre = srv.data_dir().join("backups").join(&backups[0]);
    let out = confab(
        &["restore", "--from", s(&pre), "--data-dir", s(&target)],
        work.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout_json(&out);
    assert_eq!(report["contents"]["schema_version"], 1);
    assert_eq!(
        report["contents"]["messages"],
        manifest["messages"]
            .as_array()
            .map(|m| m.len())
            .unwrap_or(0)
    );

    // The restored schema-1 store checks clean as what it is (its records
    // decode; it has no checksums until a server migrates it).
    let out = confab(&["check", "--json", "--data-dir", s(&target)], work.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["schema_version"], 1);

    // Every migrated record now carries a checksum that verifies, every
    // room's chain is whole and the log matches it.
    let mut srv = srv;
    srv.stop();
    let out = confab(
        &["check", "--json", "--data-dir", s(srv.data_dir())],
        srv.data_dir(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = stdout_json(&out);
    assert_eq!(report["schema_version"], 4, "{report}");
    assert_eq!(report["engine"], "verified", "{report}");
    assert_eq!(report["damage_total"], 0, "{report}");
    assert_eq!(
        report["messages"],
        manifest["messages"].as_array().map_or(0, |m| m.len()),
        "{report}"
    );
    assert_eq!(
        report["tables"]["message_log"], report["messages"],
        "{report}"
    );

    // A store from a newer confab is refused with a clear message, untouched.
    let newer = fixture_copy();
    {
        let db = redb::Database::open(newer.path().join("confab.redb")).expect("open");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .expect("meta");
            meta.insert("schema_version", 99).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let digest = |p: &Path| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(p).expect("read store")))
    };
    let before = digest(&newer.path().join("confab.redb"));
    let out = confab(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            s(newer.path()),
        ],
        newer.path(),
    );
    assert!(!out.status.success(), "a newer store must be refused");
    let err = stderr(&out);
    assert!(
        err.contains("newer confab") && err.contains("schema 99"),
        "{err}"
    );
    assert_eq!(
        digest(&newer.path().join("confab.redb")),
        before,
        "the newer store was written to"
    );
    assert!(!newer.path().join("backups").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_backups_keep_the_newest_few() {
    let dir = tmpdir("confab-periodic-");
    let bk = dir.path().join("bk");
    let mut srv = Server::start(&[
        &format!("backup_dir={}", s(&bk)),
        "backup_interval_secs=1",
        "backup_keep=2",
    ]);
    let api = srv.api();
    let a = api.new_user("pb").await;
    let b = api.new_user("pb").await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (st, _) = api
        .post_message(&a.token, &room, &cid("p"), "periodic")
        .await;
    assert!(st.is_success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = HashSet::new();
    while seen.len() < 4 {
        for f in listing(&bk) {
            assert!(f.ends_with(".cfbk") || f.ends_with(".partial"), "{f}");
            if f.ends_with(".cfbk") {
                seen.insert(f);
            }
        }
        // A new backup is complete before the oldest is pruned: for a
        // moment there are keep + 1.
        let now = listing(&bk)
            .into_iter()
            .filter(|f| f.ends_with(".cfbk"))
            .count();
        assert!(now <= 3, "more than backup_keep=2 kept: {:?}", listing(&bk));
        assert!(
            Instant::now() < deadline,
            "only {} periodic backups in 20 s",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, metrics) = {
        let r = api.raw(hyper::Method::GET, "/metrics", "", None, &[]).await;
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    assert_eq!(st.as_u16(), 200);
    assert!(
        metrics.contains("confab_backups_total{outcome=\"ok\"}"),
        "{metrics}"
    );
    srv.stop();
    let kept: Vec<String> = listing(&bk)
        .into_iter()
        .filter(|f| f.ends_with(".cfbk"))
        .collect();
    assert_eq!(kept.len(), 2, "backup_keep=2: {kept:?}");
    // The newest one restores and holds the message.
    let newest = listing(&bk)
        .into_iter()
        .rfind(|f| f.ends_with(".cfbk"))
        .expect("a backup");
    let target = dir.path().join("restored");
    let out = confab(
        &[
            "restore",
            "--from",
            s(&bk.join(newest)),
            "--data-dir",
            s(&target),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["contents"]["messages"], 1);
}

#[test]
fn version_names_the_commit_and_a_first_start_says_where_to_go() {
    let out = confab(&["--version"], Path::new(env!("CARGO_MANIFEST_DIR")));
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        v.starts_with(&format!("confab {} (git ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    let srv = Server::start(&[]);
    let want = format!("first start: open http://{}/ in a browser", srv.addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !srv.log_tail().contains(&want) {
        assert!(Instant::now() < deadline, "{}", srv.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    }
}
