//! Faults: a damaged store is never served as if it were right. The tests
//! damage a stopped server's `confab.redb` themselves — bits flipped inside
//! one stored message's text, or a whole 4 KiB page of the messages b-tree
//! overwritten with garbage — then start the real server and check over
//! real sockets what clients, `confab check`, `confab backup` and
//! `confab restore` make of it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::{Value, json};

fn confab(args: &[&str], cwd: &Path) -> Output {
    confab_command(args, cwd).output().expect("run confab")
}

fn out(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
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

fn store_file(dir: &Path) -> PathBuf {
    dir.join("confab.redb")
}

/// Every offset of `needle` in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Flips the case bit of 8 letters (8 bits) inside every copy of `needle`
/// in the store file — the text stays valid UTF-8, only different. Returns
/// the number of copies changed.
fn flip_text(dir: &Path, needle: &str) -> usize {
    let path = store_file(dir);
    let mut bytes = std::fs::read(&path).expect("read store");
    let at = find_all(&bytes, needle.as_bytes());
    for &i in &at {
        for b in &mut bytes[i..i + 8] {
            assert!(b.is_ascii_alphabetic(), "the needle starts with 8 letters");
            *b ^= 0x20;
        }
    }
    std::fs::write(&path, &bytes).expect("write store");
    at.len()
}

/// Overwrites every 4 KiB page of the store file that holds `needle` with
/// garbage. Returns the pages overwritten.
fn trash_pages(dir: &Path, needle: &str) -> Vec<usize> {
    let path = store_file(dir);
    let mut bytes = std::fs::read(&path).expect("read store");
    let mut pages: Vec<usize> = find_all(&bytes, needle.as_bytes())
        .into_iter()
        .map(|i| i / 4096)
        .collect();
    pages.dedup();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for &p in &pages {
        for b in &mut bytes[p * 4096..(p + 1) * 4096] {
            // xorshift: the same garbage every run.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(&path, &bytes).expect("write store");
    pages
}

/// The store's text: whether anything in it still holds `needle`.
fn store_holds(dir: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(store_file(dir)).expect("read store");
    !find_all(&bytes, needle.as_bytes()).is_empty()
}

async fn metrics(api: &Api) -> String {
    let r = api.raw(Method::GET, "/metrics", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The value of one sample line of `/metrics` (0 when absent).
fn sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn lines(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad export line {l}: {e}")))
        .collect()
}

/// alice, her direct room with bob (the one the tests damage) and her
/// direct room with carol (the one that must keep working).
async fn alice_with_two_rooms(api: &Api) -> (User, String, String) {
    let alice = api.new_user("alice").await;
    let mut rooms = Vec::new();
    for peer in ["bob", "carol"] {
        let peer = api.new_user(peer).await;
        let room = api.direct_room(&alice.token, &peer.id).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        rooms.push(room);
    }
    let other = rooms.pop().expect("carol's room");
    let room = rooms.pop().expect("bob's room");
    (alice, room, other)
}

/// A room's export (`GET /api/v1/rooms/{id}/export`) as its JSON lines.
async fn room_export(api: &Api, token: &str, room: &str) -> Vec<Value> {
    let r = api
        .raw(
            Method::GET,
            &format!("/api/v1/rooms/{room}/export"),
            token,
            None,
            &[],
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    lines(&r.body)
}

/// Collects message frames (by seq) of `room` until `n` distinct seqs or
/// an error frame for `room`.
async fn catch_up(ws: &mut Ws, room: &str, n: usize) -> (BTreeMap<u64, Value>, Option<Value>) {
    let mut got = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < n && Instant::now() < deadline {
        let Some(v) = ws.recv(Duration::from_secs(5)).await else {
            break;
        };
        if v["type"] == "message" && v["room"] == room {
            got.insert(v["seq"].as_u64().expect("seq"), v);
        } else if v["type"] == "error" && v["room"] == room {
            return (got, Some(v));
        }
    }
    (got, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bits_in_a_message_serve_it_as_unreadable_and_a_backup_never_hides_it() {
    let mut srv = Server::start(&[]);
    let api = srv.api();
    let alice = api.new_user("alice").await;
    let bob = api.new_user("bob").await;
    let room = api.direct_room(&alice.token, &bob.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let needle = format!("ZZDAMAGEZZ-{:016x}", rand::random::<u64>());
    let texts = ["first", "second", needle.as_str(), "fourth", "fifth"];
    for (i, t) in texts.iter().enumerate() {
        let who = if i % 2 == 0 { &alice } else { &bob };
        let (st, body) = api.post_message(&who.token, &room, &cid("f"), t).await;
        assert_eq!(st.as_u16(), 201, "{body}");
    }
    let carol = api.new_user("carol").await;
    let other = api.direct_room(&alice.token, &carol.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    api.post_message(&carol.token, &other, &cid("o"), "elsewhere")
        .await;
    srv.stop();

    // A clean store checks clean (exit 0), engine included.
    let dir = srv.data_dir().to_path_buf();
    let clean = confab(&["check", "--data-dir", s(&dir)], &dir);
    assert_eq!(clean.status.code(), Some(0), "{}", out(&clean));
    let text = String::from_utf8_lossy(&clean.stdout).into_owned();
    assert!(
        text.contains("engine: verified") && text.contains("result: clean"),
        "{text}"
    );

    // Eight bits flipped inside the stored text.
    assert!(
        flip_text(&dir, &needle) >= 1,
        "the text is in the store file"
    );
    assert!(!store_holds(&dir, &needle));
    // `confab check` right away: the record's checksum and redb's own page
    // checksum both say so (once the server has written that page again,
    // redb's checksum covers the damaged bytes; the record's still fails).
    let check = confab(&["check", "--data-dir", s(&dir)], &dir);
    assert_eq!(check.status.code(), Some(1), "{}", out(&check));
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        text.contains(&format!(
            "damage: record messages room {room} seq 3: checksum mismatch"
        )) && text.contains("engine: damaged"),
        "{text}"
    );
    srv.restart_with(&["store_scrub_secs=1"]);
    let api = srv.api();

    // HTTP history: the damaged message is unreadable, never other text;
    // its neighbours load; every page around it answers.
    let all = api.history_all(&alice.token, &room).await;
    let seqs: Vec<u64> = all
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "the seq chain stays whole");
    for (m, t) in all.iter().zip(texts) {
        if m["seq"] == 3 {
            assert_eq!(m["unreadable"], true, "{m}");
            assert_eq!(m["text"], "", "{m}");
            assert_eq!(m["from"], "0000000000000000", "{m}");
            assert_eq!(m["client_id"], "", "{m}");
        } else {
            assert_eq!(m["text"], t, "{m}");
            assert!(m.get("unreadable").is_none(), "{m}");
        }
    }
    for q in ["before=4&limit=2", "after=2&limit=1", "limit=50"] {
        let (st, body) = api
            .get(&format!("/api/v1/rooms/{room}/messages?{q}"), &bob.token)
            .await;
        assert_eq!(st.as_u16(), 200, "{q}: {body}");
        let page = body["messages"].as_array().expect("messages");
        assert!(
            page.iter()
                .any(|m| m["seq"] == 3 && m["unreadable"] == true),
            "{q}: {body}"
        );
    }
    let entry = api.room_entry(&alice.token, &room).await;
    assert_eq!(entry["last_message"]["text"], "fifth");

    // WebSocket resume from before it: all the others, and it, unreadable.
    let mut ws = Ws::connect(srv.addr).await;
    ws.auth(&bob.token, json!({ room.clone(): 1 })).await;
    let (got, err) = catch_up(&mut ws, &room, 4).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    assert_eq!(got[&3]["unreadable"], true);
    assert_eq!(got[&3]["text"], "");
    assert_eq!(got[&4]["text"], "fourth");
    // The session goes on.
    ws.send_and_ack(&room, &cid("after"), "sixth").await;
    ws.close().await;

    // The room's export: every good message, an `unreadable` line, `end`.
    let ex = room_export(&api, &alice.token, &room).await;
    let kinds: Vec<(String, u64)> = ex
        .iter()
        .filter(|l| l["type"] == "message" || l["type"] == "unreadable")
        .map(|l| {
            (
                l["type"].as_str().unwrap_or("").to_string(),
                l["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("message".into(), 1),
            ("message".into(), 2),
            ("unreadable".into(), 3),
            ("message".into(), 4),
            ("message".into(), 5),
            ("message".into(), 6),
        ]
    );
    let end = ex.last().expect("lines");
    assert_eq!(end["type"], "end", "{end}");
    assert_eq!(end["messages"], 5);
    assert_eq!(end["damaged"], 1);

    // Reported: a metric, and a log line naming the room and the seq.
    let m = metrics(&api).await;
    assert_eq!(
        sample(&m, "confab_store_damaged_records_total{table=\"messages\"}"),
        1.0,
        "{m}"
    );
    let log = srv.log_tail();
    assert!(
        log.lines()
            .any(|l| l.contains("damaged record") && l.contains(&room) && l.contains("seq=3")),
        "{log}"
    );
    // The scrub finds it too, and /api/v1/status shows it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, st) = api.get("/api/v1/status?history=0", "").await;
        let scrub = &st["store"]["scrub"];
        if scrub["passes"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(scrub["last_damage_total"], 1, "{st}");
            assert_eq!(scrub["last_damage"][0]["room"], room.as_str(), "{st}");
            assert_eq!(scrub["last_damage"][0]["seq"], 3, "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "no scrub pass: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // `confab check` through the running server names it and exits 1.
    let online = confab(&["check", "--data-dir", s(&dir)], &dir);
    assert_eq!(online.status.code(), Some(1), "{}", out(&online));
    let text = String::from_utf8_lossy(&online.stdout).into_owned();
    assert!(
        text.contains("through the running server")
            && text
                .lines()
                .any(|l| l.starts_with("damage: record messages")
                    && l.contains(&format!("room {room} seq 3"))
                    && l.contains("checksum")),
        "{text}"
    );

    // A backup of it fails loudly, naming it, and leaves no file…
    let work = tmpdir("confab-faults-");
    let file = work.path().join("b.cfbk");
    let refused = confab(&["backup", "--to", s(&file), "--data-dir", s(&dir)], &dir);
    assert!(!refused.status.success(), "{}", out(&refused));
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        err.contains(&format!("room {room} seq 3")) && err.contains("--skip-damaged"),
        "{err}"
    );
    assert!(!file.exists() && !work.path().join("b.cfbk.partial").exists());
    // …and so does one taken with the server stopped.
    srv.stop();
    let offline = confab(&["backup", "--to", s(&file), "--data-dir", s(&dir)], &dir);
    assert!(!offline.status.success(), "{}", out(&offline));
    assert!(String::from_utf8_lossy(&offline.stderr).contains(&format!("room {room} seq 3")));
    assert!(
        std::fs::read_dir(work.path()).expect("ls").next().is_none(),
        "no file is left"
    );

    // `confab check` on the stopped store names it.
    let offline = confab(&["check", "--data-dir", s(&dir)], &dir);
    assert_eq!(offline.status.code(), Some(1), "{}", out(&offline));
    let text = String::from_utf8_lossy(&offline.stdout).into_owned();
    assert!(text.contains(&format!("room {room} seq 3")), "{text}");

    // --skip-damaged saves the rest, says what it left out, and restores.
    let saved = confab(
        &[
            "backup",
            "--skip-damaged",
            "--to",
            s(&file),
            "--data-dir",
            s(&dir),
        ],
        &dir,
    );
    assert!(saved.status.success(), "{}", out(&saved));
    let err = String::from_utf8_lossy(&saved.stderr).into_owned();
    assert!(
        err.contains("warning") && err.contains("1 damaged"),
        "{err}"
    );
    let summary: Value = serde_json::from_slice(&saved.stdout).expect("summary");
    assert_eq!(summary["damaged_total"], 1, "{summary}");
    let target_dir = tmpdir("confab-faults-restored-");
    let target = target_dir.path().to_path_buf();
    let restored = confab(
        &["restore", "--from", s(&file), "--data-dir", s(&target)],
        work.path(),
    );
    assert!(restored.status.success(), "{}", out(&restored));
    assert!(String::from_utf8_lossy(&restored.stderr).contains("--skip-damaged"));
    // The restored store checks clean (the lost message is a known loss).
    let check = confab(&["check", "--data-dir", s(&target)], work.path());
    assert_eq!(check.status.code(), Some(0), "{}", out(&check));
    assert!(String::from_utf8_lossy(&check.stdout).contains("lost: 1"));
    let srv2 = Server::start_in(target_dir, &[]);
    let all = srv2.api().history_all(&alice.token, &room).await;
    let got: Vec<(u64, bool, String)> = all
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap_or(0),
                m["unreadable"] == true,
                m["text"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, false, "first".into()),
            (2, false, "second".into()),
            (3, true, String::new()),
            (4, false, "fourth".into()),
            (5, false, "fifth".into()),
            (6, false, "sixth".into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_page_answers_storage_damaged_and_everything_else_keeps_working() {
    let mut srv = Server::start(&UNLIMITED);
    let api = srv.api();
    let (alice, room, other) = alice_with_two_rooms(&api).await;
    // Enough text for several leaf pages of `messages`.
    let n = 160u64;
    let mut ws = Ws::connect(srv.addr).await;
    ws.auth(&alice.token, json!({})).await;
    for i in 1..=n {
        ws.send_and_ack(
            &room,
            &format!("p-{i}"),
            &format!("PAGEDMG-{i:04}-{}", "x".repeat(80)),
        )
        .await;
    }
    for i in 1..=3 {
        ws.send_and_ack(&other, &format!("o-{i}"), &format!("other {i}"))
            .await;
    }
    ws.close().await;
    srv.stop();
    let dir = srv.data_dir().to_path_buf();
    let pages = trash_pages(&dir, "PAGEDMG-0080-");
    assert!(!pages.is_empty(), "the message is in the store file");
    srv.restart();
    let api = srv.api();

    // A request that reads the damaged page gets an answer: 500
    // storage_damaged (not a dropped connection).
    let r = try_http(
        srv.addr,
        Method::GET,
        &format!("/api/v1/rooms/{room}/messages?after=0&limit=200"),
        &alice.token,
        None,
        &[],
    )
    .await
    .expect("an answer, not a dropped connection");
    assert_eq!(r.status.as_u16(), 500, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "storage_damaged", "{}", r.json);
    // The other room works.
    let got = api.history_all(&alice.token, &other).await;
    assert_eq!(got.len(), 3);

    // WebSocket resume: an error frame naming the damaged room, the other
    // room's messages, and the session goes on.
    let mut ws = Ws::connect(srv.addr).await;
    ws.auth(&alice.token, json!({ room.clone(): 0, other.clone(): 0 }))
        .await;
    let mut error = None;
    let mut others = 0;
    let deadline = Instant::now() + WAIT;
    while (error.is_none() || others < 3) && Instant::now() < deadline {
        let Some(v) = ws.recv(Duration::from_secs(5)).await else {
            break;
        };
        if v["type"] == "error" {
            assert_eq!(v["room"], room.as_str(), "{v}");
            error = Some(v);
        } else if v["type"] == "message" && v["room"] == other {
            others += 1;
        }
    }
    let error = error.expect("an error frame for the damaged room");
    assert_eq!(error["code"], "storage_damaged", "{error}");
    assert_eq!(others, 3);
    ws.ping().await;
    ws.send_and_ack(&other, &cid("still"), "still here").await;
    ws.close().await;

    // The export of the damaged room: every message it can read, an
    // `unreadable` line for each it cannot, and `end`.
    let ex = room_export(&api, &alice.token, &room).await;
    let end = ex.last().expect("lines");
    assert_eq!(end["type"], "end", "{end}");
    let mut seqs: Vec<u64> = ex
        .iter()
        .filter(|l| l["type"] == "message" || l["type"] == "unreadable")
        .map(|l| l["seq"].as_u64().unwrap_or(0))
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "every seq, once");
    let damaged = end["damaged"].as_u64().unwrap_or(0);
    assert!(damaged >= 1 && damaged < n, "{end}");
    assert!(
        ex.iter()
            .any(|l| l["type"] == "unreadable" && l["seq"] == 80)
    );

    let m = metrics(&api).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("confab_store_read_failures_total") && !l.ends_with(" 0")),
        "{m}"
    );
    srv.stop();

    // `confab check` names the page and each message on it; exit 1.
    let check = confab(&["check", "--data-dir", s(&dir)], &dir);
    assert_eq!(check.status.code(), Some(1), "{}", out(&check));
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(text.contains("damage: page messages"), "{text}");
    assert!(
        text.contains(&format!("unreachable messages room {room} seq 80")),
        "{text}"
    );
    assert!(text.contains("engine: damaged"), "{text}");

    // A backup refuses; --skip-damaged keeps every other message, and the
    // placeholders keep the chain.
    let work = tmpdir("confab-faults-page-");
    let file = work.path().join("p.cfbk");
    let refused = confab(&["backup", "--to", s(&file), "--data-dir", s(&dir)], &dir);
    assert!(!refused.status.success(), "{}", out(&refused));
    assert!(!file.exists());
    let saved = confab(
        &[
            "backup",
            "--skip-damaged",
            "--to",
            s(&file),
            "--data-dir",
            s(&dir),
        ],
        &dir,
    );
    assert!(saved.status.success(), "{}", out(&saved));
    let summary: Value = serde_json::from_slice(&saved.stdout).expect("summary");
    assert!(
        summary["damaged_total"].as_u64().unwrap_or(0) >= 1,
        "{summary}"
    );
    let target = work.path().join("r");
    let restored = confab(
        &["restore", "--from", s(&file), "--data-dir", s(&target)],
        work.path(),
    );
    assert!(restored.status.success(), "{}", out(&restored));
    let check = confab(&["check", "--data-dir", s(&target)], work.path());
    assert_eq!(check.status.code(), Some(0), "{}", out(&check));
}

/// The texts in the open chat's log, in order.
async fn log_texts(page: &common::browser::Page) -> Vec<String> {
    let v = page
        .eval("[...document.querySelectorAll('.log .msg .text')].map(e => e.textContent)")
        .await;
    serde_json::from_value(v).expect("texts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_shows_an_unreadable_message_as_such_in_english_and_korean() {
    let mut srv = Server::start(&[]);
    let api = srv.api();
    let alice = api.new_user("uia").await;
    let bob = api.new_user("uib").await;
    let room = api.direct_room(&bob.token, &alice.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let needle = format!(
        "ZZDAMAGEZZ-{:016x} <b>not markup</b>",
        rand::random::<u64>()
    );
    for t in ["before", needle.as_str(), "after"] {
        let (st, body) = api.post_message(&bob.token, &room, &cid("u"), t).await;
        assert_eq!(st.as_u16(), 201, "{body}");
    }
    srv.stop();
    assert!(flip_text(srv.data_dir(), &needle[..20]) >= 1);
    srv.restart();

    let browser = common::browser::Browser::launch().await;
    let a = browser.new_page().await;
    a.set_viewport(1280, 800, false).await;
    a.goto(&format!("http://{}/", srv.addr)).await;
    a.fill("textbox", "Username", &alice.username).await;
    a.fill("textbox", "Password", PASSWORD).await;
    a.click("button", "Log in").await;
    a.wait_for_role("button", &bob.username, WAIT).await;
    a.click("button", &bob.username).await;
    a.wait_for(
        "[...document.querySelectorAll('.log .msg .text')].some(e => e.textContent === 'after')",
        WAIT,
    )
    .await;
    assert_eq!(
        log_texts(&a).await,
        vec!["before", "This message could not be read", "after"]
    );
    // A text node in a message marked as unreadable, nothing from the store.
    let marked = a
        .eval("document.querySelector('.log .msg.unreadable .text')?.childNodes.length === 1 && document.querySelector('.log .msg.unreadable .text').firstChild.nodeType === 3 && !document.querySelector('.log b')")
        .await;
    assert_eq!(marked, true);

    // In Korean.
    a.eval("localStorage.setItem('confab.lang', 'ko')").await;
    a.reload().await;
    a.wait_for_role("button", &bob.username, WAIT).await;
    a.click("button", &bob.username).await;
    a.wait_for(
        "[...document.querySelectorAll('.log .msg .text')].some(e => e.textContent === 'after')",
        WAIT,
    )
    .await;
    assert_eq!(
        log_texts(&a).await,
        vec!["before", "이 메시지를 읽을 수 없습니다", "after"]
    );
    assert!(a.exceptions().is_empty(), "{:?}", a.exceptions());
}

/// A write whose transaction needs a damaged page (the last page of a
/// room's messages, where the next one goes) is answered — over WebSocket
/// and HTTP — and the writer goes on serving the other rooms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_into_a_damaged_page_is_answered_and_the_writer_goes_on() {
    let mut srv = Server::start(&UNLIMITED);
    let api = srv.api();
    let (alice, room, other) = alice_with_two_rooms(&api).await;
    let mut ws = Ws::connect(srv.addr).await;
    ws.auth(&alice.token, json!({})).await;
    for i in 1..=160 {
        ws.send_and_ack(
            &room,
            &format!("p-{i}"),
            &format!("TAILDMG-{i:04}-{}", "x".repeat(80)),
        )
        .await;
    }
    // As many in the other room, so that its last page (where its next
    // message goes) is far from the damaged one in key order.
    for i in 1..=160 {
        ws.send_and_ack(
            &other,
            &format!("o-{i}"),
            &format!("SOUND-{i:04}-{}", "x".repeat(80)),
        )
        .await;
    }
    ws.close().await;
    srv.stop();
    let pages = trash_pages(srv.data_dir(), "TAILDMG-0160-");
    assert!(!pages.is_empty(), "the last message is in the store file");
    srv.restart();
    let api = srv.api();

    let mut ws = Ws::connect(srv.addr).await;
    ws.auth(&alice.token, json!({})).await;
    let started = Instant::now();
    ws.send_msg(&room, "p-161", "into the damaged page").await;
    ws.expect_error("storage_damaged").await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let (status, body) = api
        .post_message(&alice.token, &room, "p-162", "again, over HTTP")
        .await;
    assert_eq!(
        body["error"]["code"],
        "storage_damaged",
        "{body}\n{}",
        srv.log_tail()
    );
    assert_eq!(status.as_u16(), 500, "{body}");
    // The writer still writes everywhere else, on the same session and
    // over HTTP, and the server stays ready.
    ws.send_and_ack(&other, "o-161", "other 161").await;
    let (status, body) = api
        .post_message(&alice.token, &other, "o-162", "other 162")
        .await;
    assert_eq!(status.as_u16(), 201, "{body}");
    let r = api.raw(Method::GET, "/readyz", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    // (Only its newest: its first messages may share the damaged page.)
    let (status, body) = api
        .get(
            &format!("/api/v1/rooms/{other}/messages?after=160"),
            &alice.token,
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let texts: Vec<&str> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["other 161", "other 162"]);
    ws.close().await;
}
