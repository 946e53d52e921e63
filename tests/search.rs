//! Message search over HTTP: Korean and English analysis (the labelled
//! quality set in `tests/data/search_quality.json`, compared with tantivy's
//! default tokenizer), phrases, filters, sorting, paging, snippets,
//! authorization, freshness, and recovery of the index.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn search(api: &Api, token: &str, params: &[(&str, &str)]) -> (hyper::StatusCode, Value) {
    let qs: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    api.get(&format!("/api/v1/search?{}", qs.join("&")), token)
        .await
}

/// The texts of the hits for `q` (must be a 200).
async fn hit_texts(api: &Api, token: &str, params: &[(&str, &str)]) -> Vec<String> {
    let (status, body) = search(api, token, params).await;
    assert_eq!(status.as_u16(), 200, "{params:?}: {body}");
    body["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h["text"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Polls until `q` returns at least `n` hits (the index commits about once a second).
async fn wait_hits(
    api: &Api,
    token: &str,
    params: &[(&str, &str)],
    n: usize,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = search(api, token, params).await;
        if status.as_u16() == 200 && body["hits"].as_array().map_or(0, Vec::len) >= n {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{params:?}: fewer than {n} hits after {within:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server with two users in a direct room.
async fn pair(prefix: &str) -> (Server, User, User, String) {
    pair_with(prefix, &[]).await
}

/// [`pair`] with config overrides.
async fn pair_with(prefix: &str, settings: &[&str]) -> (Server, User, User, String) {
    let srv = Server::start(settings);
    let api = srv.api();
    let a = api.new_user(&format!("{prefix}a")).await;
    let b = api.new_user(&format!("{prefix}b")).await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    (srv, a, b, room)
}

/// Posts `n` messages `format!("{text} {i}")` from `from` into `room`.
async fn post_n(api: &Api, from: &User, room: &str, text: &str, n: usize) {
    for i in 0..n {
        let (status, body) = api
            .post_message(&from.token, room, &cid("p"), &format!("{text} {i}"))
            .await;
        assert!(status.is_success(), "{body}");
    }
}

struct Quality {
    messages: BTreeMap<String, String>,
    queries: Vec<(String, BTreeSet<String>, BTreeSet<String>)>,
}

fn quality_set() -> Quality {
    let v: Value =
        serde_json::from_str(include_str!("data/search_quality.json")).expect("quality set JSON");
    let messages = v["messages"]
        .as_object()
        .expect("messages")
        .iter()
        .map(|(k, t)| (k.clone(), t.as_str().expect("text").to_string()))
        .collect();
    let ids = |x: &Value| -> BTreeSet<String> {
        x.as_array()
            .expect("id list")
            .iter()
            .map(|s| s.as_str().expect("id").to_string())
            .collect()
    };
    let queries = v["queries"]
        .as_array()
        .expect("queries")
        .iter()
        .map(|q| {
            (
                q["q"].as_str().expect("q").to_string(),
                ids(&q["must"]),
                ids(&q["must_not"]),
            )
        })
        .collect();
    Quality { messages, queries }
}

/// Micro-averaged precision and recall of `results` against the `must` sets.
fn precision_recall(q: &Quality, results: &[BTreeSet<String>]) -> (f64, f64) {
    let (mut tp, mut retrieved, mut relevant) = (0usize, 0usize, 0usize);
    for ((_, must, _), got) in q.queries.iter().zip(results) {
        tp += got.intersection(must).count();
        retrieved += got.len();
        relevant += must.len();
    }
    (
        tp as f64 / retrieved.max(1) as f64,
        tp as f64 / relevant.max(1) as f64,
    )
}

/// The same corpus and queries through tantivy's default tokenizer and query parser.
fn baseline(q: &Quality) -> Vec<BTreeSet<String>> {
    use tantivy::collector::TopDocs;
    use tantivy::query::QueryParser;
    use tantivy::schema::{STORED, STRING, Schema, TEXT, Value as _};
    use tantivy::{Index, IndexWriter, TantivyDocument};
    let mut sb = Schema::builder();
    let id = sb.add_text_field("id", STRING | STORED);
    let text = sb.add_text_field("text", TEXT);
    let index = Index::create_in_ram(sb.build());
    let mut w: IndexWriter<TantivyDocument> = index
        .writer_with_num_threads(1, 15_000_000)
        .expect("writer");
    for (k, t) in &q.messages {
        let mut d = TantivyDocument::default();
        d.add_text(id, k);
        d.add_text(text, t);
        w.add_document(d).expect("add");
    }
    w.commit().expect("commit");
    let searcher = index.reader().expect("reader").searcher();
    let mut parser = QueryParser::for_index(&index, vec![text]);
    parser.set_conjunction_by_default();
    q.queries
        .iter()
        .map(|(query, _, _)| {
            let Ok(parsed) = parser.parse_query(query) else {
                return BTreeSet::new();
            };
            searcher
                .search(&parsed, &TopDocs::with_limit(100).order_by_score())
                .expect("search")
                .into_iter()
                .filter_map(|(_, addr)| {
                    let doc: TantivyDocument = searcher.doc(addr).ok()?;
                    doc.get_first(id)
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_set_korean_and_english_beats_the_default_tokenizer() {
    let q = quality_set();
    assert!(q.queries.len() >= 40);
    let (srv, a, b, room) = pair("sq").await;
    let api = srv.api();
    let mut id_of: HashMap<String, String> = HashMap::new();
    for (k, text) in &q.messages {
        let (status, body) = api.post_message(&a.token, &room, &cid("q"), text).await;
        assert!(status.is_success(), "{body}");
        id_of.insert(text.clone(), k.clone());
    }
    // The last message posted is searchable → everything is.
    let last = q.messages.values().last().expect("corpus");
    let word = last.split_whitespace().next().expect("word");
    wait_hits(&api, &b.token, &[("q", word)], 1, Duration::from_secs(5)).await;

    let mut ours = Vec::new();
    let mut failures = Vec::new();
    for (query, must, must_not) in &q.queries {
        let texts = hit_texts(&api, &b.token, &[("q", query), ("limit", "50")]).await;
        let got: BTreeSet<String> = texts.iter().filter_map(|t| id_of.get(t).cloned()).collect();
        let missing: Vec<_> = must.difference(&got).collect();
        let wrong: Vec<_> = must_not.intersection(&got).collect();
        if !missing.is_empty() || !wrong.is_empty() {
            failures.push(format!(
                "{query:?}: missing {missing:?}, must not have {wrong:?}"
            ));
        }
        ours.push(got);
    }
    assert!(
        failures.is_empty(),
        "quality set failures:\n{}",
        failures.join("\n")
    );
    let (p, r) = precision_recall(&q, &ours);
    let base = baseline(&q);
    let (bp, br) = precision_recall(&q, &base);
    let base_ok = q
        .queries
        .iter()
        .zip(&base)
        .filter(|((_, must, must_not), got)| must.is_subset(got) && must_not.is_disjoint(got))
        .count();
    eprintln!(
        "search quality over {} queries: confab precision {p:.3} recall {r:.3} (all {} pass); \
         tantivy default tokenizer precision {bp:.3} recall {br:.3} ({base_ok} pass)",
        q.queries.len(),
        q.queries.len()
    );
    assert_eq!(r, 1.0);
    assert!(
        r > br,
        "recall must beat the default tokenizer ({r} vs {br})"
    );
    assert!(p >= bp, "precision must not be worse ({p} vs {bp})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_sorting_paging_and_snippets() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("sfa").await;
    let b = api.new_user("sfb").await;
    let c = api.new_user("sfc").await;
    let direct = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    let group = api
        .group_room(&a.token, "프로젝트 project", &[&b.id, &c.id])
        .await["id"]
        .as_str()
        .expect("group")
        .to_string();
    // Relevance: a message saying "배포" three times beats one saying it once;
    // among equal scores the newer wins.
    let msgs = [
        (&a, &direct, "배포 준비 중"),
        (&b, &direct, "배포 배포 배포 언제 해요"),
        (&c, &group, "그룹 배포 일정 공유"),
        (&a, &group, "배포 준비 중"),
    ];
    let mut ts = Vec::new();
    for (u, room, text) in msgs {
        let (status, body) = api.post_message(&u.token, room, &cid("f"), text).await;
        assert!(status.is_success(), "{body}");
        ts.push(body["ts"].as_i64().expect("ts"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let body = wait_hits(&api, &a.token, &[("q", "배포")], 4, Duration::from_secs(5)).await;
    assert_eq!(body["total"], 4);
    let texts: Vec<&str> = body["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        texts[0], "배포 배포 배포 언제 해요",
        "most relevant first: {texts:?}"
    );
    // Two equal "배포 준비 중" messages: the newer (in the group) comes first.
    let equal: Vec<&Value> = body["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .filter(|h| h["text"] == "배포 준비 중")
        .collect();
    assert_eq!(equal.len(), 2);
    assert!(equal[0]["ts"].as_i64() >= equal[1]["ts"].as_i64());
    assert_eq!(equal[0]["room"], group.as_str());

    // Sort by time: newest first.
    let by_time = hit_texts(&api, &a.token, &[("q", "배포"), ("sort", "time")]).await;
    assert_eq!(
        by_time,
        [
            "배포 준비 중",
            "그룹 배포 일정 공유",
            "배포 배포 배포 언제 해요",
            "배포 준비 중"
        ]
    );
    // Room filter, sender filter, date range.
    assert_eq!(
        hit_texts(
            &api,
            &a.token,
            &[("q", "배포"), ("room", &direct), ("sort", "time")]
        )
        .await,
        ["배포 배포 배포 언제 해요", "배포 준비 중"]
    );
    assert_eq!(
        hit_texts(&api, &a.token, &[("q", "배포"), ("from", &c.id)]).await,
        ["그룹 배포 일정 공유"]
    );
    let after = ts[2].to_string();
    let before = (ts[3] + 1).to_string();
    assert_eq!(
        hit_texts(
            &api,
            &a.token,
            &[
                ("q", "배포"),
                ("after", &after),
                ("before", &before),
                ("sort", "time")
            ]
        )
        .await,
        ["배포 준비 중", "그룹 배포 일정 공유"]
    );
    let (_, none) = search(
        &api,
        &a.token,
        &[("q", "배포"), ("before", &ts[0].to_string())],
    )
    .await;
    assert_eq!(none["total"], 0);
    // Paging: limit + offset, next_offset until the end.
    let mut seen = Vec::new();
    let mut offset = Some(0u64);
    while let Some(off) = offset {
        let (status, page) = search(
            &api,
            &a.token,
            &[
                ("q", "배포"),
                ("sort", "time"),
                ("limit", "3"),
                ("offset", &off.to_string()),
            ],
        )
        .await;
        assert_eq!(status.as_u16(), 200);
        for h in page["hits"].as_array().expect("hits") {
            seen.push(h["text"].as_str().unwrap_or("").to_string());
        }
        offset = page["next_offset"].as_u64();
    }
    assert_eq!(seen, by_time);
    // Snippets: the matched words are marked by character offsets.
    let (_, snip) = search(&api, &a.token, &[("q", "일정")]).await;
    let hit = &snip["hits"][0];
    assert_eq!(hit["snippet"], "그룹 배포 일정 공유");
    assert_eq!(hit["highlights"], json!([[6, 8]]));
    assert_eq!(hit["from"], c.id.as_str());
    assert!(hit["seq"].as_u64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_find_messages_also_after_leaving() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("saa").await;
    let b = api.new_user("sab").await;
    let outsider = api.new_user("sao").await;
    let group = api.group_room(&a.token, "secret", &[&b.id]).await["id"]
        .as_str()
        .expect("group")
        .to_string();
    let (status, _) = api
        .post_message(&a.token, &group, &cid("s"), "비밀번호는 hunter2 입니다")
        .await;
    assert!(status.is_success());
    wait_hits(
        &api,
        &b.token,
        &[("q", "hunter2")],
        1,
        Duration::from_secs(5),
    )
    .await;
    // Never for someone who is not in the room, whatever they try.
    for params in [
        vec![("q", "hunter2")],
        vec![("q", "비밀번호")],
        vec![("q", "hunter2"), ("from", a.id.as_str())],
    ] {
        let (status, body) = search(&api, &outsider.token, &params).await;
        assert_eq!(status.as_u16(), 200);
        assert_eq!(body["total"], 0, "{params:?}: {body}");
    }
    let (status, body) = search(&api, &outsider.token, &[("q", "hunter2"), ("room", &group)]).await;
    assert_err(&(status, body), 404, "room_not_found");
    // B leaves: from now on B gets nothing from that room.
    let (status, _) = api
        .delete(&format!("/api/v1/rooms/{group}/members/{}", b.id), &b.token)
        .await;
    assert_eq!(status.as_u16(), 204);
    let (_, body) = search(&api, &b.token, &[("q", "hunter2")]).await;
    assert_eq!(body["total"], 0, "{body}");
    // A still does.
    assert_eq!(
        hit_texts(&api, &a.token, &[("q", "hunter2")]).await.len(),
        1
    );
    // Bad input: clear errors.
    let bad: [(&[(&str, &str)], &str); 7] = [
        (&[("q", "")], "bad_request"),
        (&[("q", "?!")], "bad_request"),
        (&[("q", "x"), ("limit", "0")], "bad_request"),
        (&[("q", "x"), ("sort", "random")], "bad_request"),
        (&[("q", "x"), ("room", "nope")], "bad_id"),
        (&[("q", "x"), ("after", "yesterday")], "bad_request"),
        (&[("q", "x"), ("offset", "2000")], "bad_request"),
    ];
    for (params, code) in bad {
        assert_err(&search(&api, &a.token, params).await, 400, code);
    }
    assert_err(&search(&api, "", &[("q", "x")]).await, 401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_message_is_found_within_one_and_a_half_seconds() {
    let (srv, a, b, room) = pair("sn").await;
    let api = srv.api();
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    // Back-to-back sends (the second lands while the index waits to commit).
    for i in 0..5 {
        let word = format!("fresh{i}x{}", rand::random::<u32>());
        let cid = cid("n");
        ws.send_msg(&room, &cid, &format!("{word} 새 메시지")).await;
        ws.expect_ack(&cid).await;
        let acked = Instant::now();
        wait_hits(
            &api,
            &b.token,
            &[("q", &word)],
            1,
            Duration::from_millis(1500),
        )
        .await;
        eprintln!("searchable {:?} after the ack", acked.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_is_rebuilt_after_deletion_and_catches_up_after_kill9() {
    let (mut srv, a, b, room) = pair("sr").await;
    let api = srv.api();
    post_n(&api, &a, &room, "recover 복구", 20).await;
    let all_20 = [("q", "복구"), ("limit", "50")];
    wait_hits(&api, &b.token, &all_20, 20, Duration::from_secs(5)).await;

    // Deleted while stopped → rebuilt on start; a damaged index (garbage
    // meta.json) → rebuilt too.
    let damage: [fn(&std::path::Path); 2] = [
        |dir| std::fs::remove_dir_all(dir.join("search")).expect("remove index"),
        |dir| std::fs::write(dir.join("search/meta.json"), b"{ not json").expect("damage"),
    ];
    for harm in damage {
        srv.stop();
        harm(srv.data_dir());
        srv.restart();
        let api = srv.api();
        wait_hits(&api, &b.token, &all_20, 20, Duration::from_secs(10)).await;
    }

    // kill -9 in the middle of a stream of sends: every acked message is
    // searchable after the restart.
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    let sender = ws.sender();
    let room2 = room.clone();
    let pump = tokio::spawn(async move {
        for i in 0..100_000u32 {
            if sender.try_send_json(&json!({"type":"send","room":room2,"client_id":format!("k{i}"),"text":format!("stream 흐름 {i}")})).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
    let mut acked = 0usize;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        if let Some(f) = ws.recv(Duration::from_millis(100)).await
            && f["type"] == "ack"
        {
            acked += 1;
        }
    }
    srv.kill9();
    pump.abort();
    assert!(acked > 50, "only {acked} acks before the kill");
    srv.restart();
    let api = srv.api();
    let stored = api.history_all(&b.token, &room).await.len() - 20;
    assert!(stored >= acked, "acked {acked} but stored {stored}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = search(&api, &b.token, &[("q", "흐름")]).await;
        if body["total"].as_u64() == Some(stored as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "searchable {} of {stored} stored",
            body["total"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_store_is_upgraded_and_its_messages_indexed() {
    let (mut srv, a, b, room) = pair("su").await;
    let api = srv.api();
    for i in 0..10 {
        let (status, _) = api
            .post_message(
                &a.token,
                &room,
                &cid("u"),
                &format!("업그레이드 upgrade {i}"),
            )
            .await;
        assert!(status.is_success());
    }
    srv.stop();
    // Make it look like a version-1 store: schema_version 1, no message
    // log, no privacy table, records without their checksums (those came
    // with schema 4; a record sealed twice can decode as something else),
    // no index.
    {
        let db = redb::Database::open(srv.data_dir().join("confab.redb")).expect("open store");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .expect("meta");
            meta.insert("schema_version", 1).expect("version");
        }
        use redb::ReadableTable;
        macro_rules! unseal_table {
            ($k:ty, $name:expr) => {{
                let def = redb::TableDefinition::<$k, &[u8]>::new($name);
                let mut t = txn.open_table(def).expect($name);
                let all: Vec<_> = t
                    .range::<$k>(..)
                    .expect("range")
                    .map(|e| {
                        let (k, v) = e.expect("record");
                        let v = v.value();
                        (k.value(), v[..v.len() - 4].to_vec())
                    })
                    .collect();
                for (k, body) in all {
                    t.insert(k, body.as_slice()).expect("unsealed");
                }
            }};
        }
        unseal_table!(u64, "users");
        unseal_table!(u64, "rooms");
        unseal_table!((u64, u64), "members");
        unseal_table!((u64, u64), "messages");
        unseal_table!((u64, u64), "wallet_entries");
        unseal_table!(u64, "wallet_transfers");
        unseal_table!(u64, "cluster_outbox");
        txn.delete_table(redb::TableDefinition::<u64, (u64, u64)>::new("message_log"))
            .expect("drop log");
        txn.delete_table(redb::TableDefinition::<u64, &[u8]>::new("privacy"))
            .expect("drop privacy");
        txn.commit().expect("commit");
    }
    std::fs::remove_dir_all(srv.data_dir().join("search")).expect("remove index");
    srv.restart();
    let api = srv.api();
    wait_hits(
        &api,
        &b.token,
        &[("q", "업그레이드")],
        10,
        Duration::from_secs(10),
    )
    .await;
    // New messages keep numbering after the back-filled ones.
    let (status, _) = api
        .post_message(&a.token, &room, &cid("u"), "업그레이드 after")
        .await;
    assert!(status.is_success());
    wait_hits(
        &api,
        &b.token,
        &[("q", "업그레이드"), ("limit", "50")],
        11,
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confab_reindex_rebuilds_and_refuses_a_running_server() {
    let (mut srv, a, b, room) = pair("sx").await;
    let api = srv.api();
    post_n(&api, &a, &room, "재색인 reindex", 30).await;
    let dir = srv.data_dir().to_path_buf();
    let reindex = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .arg("reindex")
            .arg("--data-dir")
            .arg(&dir)
            .env_remove("CONFAB_DATA_DIR")
            .output()
            .expect("run confab reindex")
    };
    // While the server runs the store is locked: a clear refusal.
    let out = reindex();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is a server running"),
        "{out:?}"
    );
    srv.stop();
    let out = reindex();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("indexed 30 messages"), "{err}");
    assert!(err.contains("30/30"), "progress shown: {err}");
    srv.restart();
    let api = srv.api();
    let body = wait_hits(
        &api,
        &b.token,
        &[("q", "재색인"), ("limit", "50")],
        30,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(body["total"], 30);
}

/// Security hardening (item 6): BM25 statistics come only from the caller's
/// rooms, so a word written in a private room the caller is not in changes
/// nothing in the caller's results — not which hits, not their order, not
/// their `score`, not which fragment of a long message is the snippet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words_in_other_peoples_private_rooms_change_nothing_in_my_results() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("ska").await;
    let b = api.new_user("skb").await;
    let c = api.new_user("skc").await;
    let d = api.new_user("skd").await;
    let shared = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    let private = api.direct_room(&c.token, &d.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    // Different lengths and term frequencies, so the scores differ; the last
    // one is longer than a snippet, with "wombat" at its start and "quokka7"
    // at its end: the snippet is the fragment with the rarer word.
    let filler = "we walked along the coast for hours and talked about nothing in \
                  particular: the weather, the ferry schedule, the price of coffee on \
                  the island, and whether the old bikes would last another summer";
    let ours = [
        (&a, "quokka7 sighting near the lake".to_string()),
        (&b, "another quokka7 quokka7 photo today".to_string()),
        (
            &a,
            "the quokka7 is the happiest animal, everyone says so".to_string(),
        ),
        (&b, "quokka7s everywhere".to_string()),
        (&a, format!("wombat first, {filler}, then a quokka7")),
    ];
    for (u, text) in &ours {
        let (status, body) = api.post_message(&u.token, &shared, &cid("k"), text).await;
        assert!(status.is_success(), "{body}");
    }
    wait_hits(
        &api,
        &a.token,
        &[("q", "quokka7")],
        5,
        Duration::from_secs(5),
    )
    .await;

    let queries: Vec<Vec<(&str, &str)>> = vec![
        vec![("q", "quokka7")],
        vec![("q", "quokka7 wombat")],
        vec![("q", "\"quokka7 sighting\"")],
        vec![("q", "quokka7"), ("limit", "2")],
        vec![("q", "quokka7"), ("room", &shared)],
        vec![("q", "quokka7"), ("from", &b.id)],
        vec![("q", "quokka7"), ("sort", "time")],
        vec![("q", "quokka7 wombat"), ("sort", "time")],
    ];
    let mut before = Vec::new();
    for params in &queries {
        let (status, body) = search(&api, &a.token, params).await;
        assert_eq!(status.as_u16(), 200, "{params:?}: {body}");
        before.push(body);
    }
    // Not a vacuous comparison: relevance hits carry scores that differ.
    let scores: Vec<f64> = before[0]["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h["score"].as_f64().expect("score"))
        .collect();
    assert_eq!(scores.len(), 5, "{}", before[0]);
    assert!(scores.windows(2).any(|w| w[0] != w[1]), "{scores:?}");
    let long = &before[1]["hits"][0];
    assert!(
        long["snippet"]
            .as_str()
            .is_some_and(|s| s.starts_with("wombat")),
        "the rarer word's fragment: {long}"
    );

    // C writes the words (and variants) many times in a room A is not in.
    // "wombat" in more of them than "quokka7": with index-wide weights the
    // long message's snippet would move to its "quokka7" end.
    let variants = [
        "wombat quokka7",
        "wombat wombat wombat",
        "QUOKKA7s and wombats",
        "wombat",
        "a quokka7 sighting with a wombat, another quokka7 sighting",
        "wombat quokka7 wombat quokka7 wombat quokka7 wombat quokka7",
    ];
    let n = 42;
    for i in 0..n {
        let text = format!("{} {i}", variants[i % variants.len()]);
        let (status, body) = api.post_message(&c.token, &private, &cid("o"), &text).await;
        assert!(status.is_success(), "{body}");
    }
    let (status, body) = api
        .post_message(&c.token, &private, &cid("o"), "numbat7 done")
        .await;
    assert!(status.is_success(), "{body}");
    // C's last message is searchable → all of C's are (indexed in order).
    wait_hits(
        &api,
        &c.token,
        &[("q", "numbat7")],
        1,
        Duration::from_secs(5),
    )
    .await;
    let (_, mine) = search(&api, &c.token, &[("q", "quokka7"), ("limit", "50")]).await;
    assert_eq!(mine["total"], 28, "{mine}");

    for (params, was) in queries.iter().zip(&before) {
        let (status, now) = search(&api, &a.token, params).await;
        assert_eq!(status.as_u16(), 200, "{params:?}: {now}");
        assert_eq!(
            &now, was,
            "{params:?}: A's results changed because of C's private messages"
        );
    }
}

// ---------------------------------------------------------------------------
// Faults: the index never claims what it does not have, and damage is found
// ---------------------------------------------------------------------------

/// One kept-alive HTTP/1.1 connection to the server, for `/api/v1/status`
/// and `/metrics` while the server cannot accept new connections (its
/// open-file limit lowered below what a new socket needs).
struct KeepAlive(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>);

impl KeepAlive {
    async fn open(addr: std::net::SocketAddr) -> KeepAlive {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect for keep-alive");
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP handshake");
        tokio::spawn(conn);
        KeepAlive(send)
    }

    async fn get(&mut self, path: &str) -> String {
        use http_body_util::BodyExt;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "confab")
            .body(http_body_util::Empty::new())
            .expect("request");
        let fut = async {
            self.0.ready().await.expect("connection ready");
            let resp = self.0.send_request(req).await.expect("response");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            String::from_utf8_lossy(&body).to_string()
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("GET {path} on the kept-alive connection timed out"))
    }

    async fn status(&mut self) -> Value {
        let text = self.get("/api/v1/status?history=0").await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e}: {text}"))
    }
}

/// The sum of every sample of a metric family in a Prometheus text page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics_page(api: &Api) -> String {
    let r = api.raw(hyper::Method::GET, "/metrics", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 200, "/metrics");
    String::from_utf8_lossy(&r.body).to_string()
}

/// Open file descriptors of a process.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A running process' open-file limits, (soft, hard), from `/proc/PID/limits`.
fn nofile(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// Sets a running process' soft open-file limit with util-linux `prlimit`.
/// The hard limit stays: lowering it could not be undone without
/// CAP_SYS_RESOURCE.
fn set_nofile(pid: i32, soft: u64) {
    let out = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(out.status.success(), "prlimit: {out:?}");
    assert_eq!(nofile(pid).0, soft, "prlimit did not apply");
}

/// Polls until a search for `q` counts exactly `n` hits; returns how long it took.
async fn wait_total(api: &Api, token: &str, q: &str, n: u64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = search(api, token, &[("q", q)]).await;
        if status.as_u16() == 200 && body["total"].as_u64() == Some(n) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{q:?}: expected {n} hits within {within:?}, last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Faults item 2: descriptors run out while the indexer writes a segment
/// ("An index writer was killed", then failed commits). The store keeps
/// acking; the index must not record progress it did not make, must say it
/// is failing, and must catch up by itself once descriptors are back, with
/// every message exactly once, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_loses_nothing_from_the_index() {
    let (mut srv, a, b, room) = pair("sfd").await;
    let api = srv.api();
    post_n(&api, &a, &room, "exhaust 소진", 20).await;
    wait_total(&api, &b.token, "소진", 20, Duration::from_secs(5)).await;

    // Everything the test needs while descriptors are short is opened now:
    // a WebSocket to send on, a kept-alive connection for status and metrics.
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    let mut keep = KeepAlive::open(srv.addr).await;
    assert_eq!(keep.status().await["search"]["lag_messages"], 0);
    let pid = srv.pid();
    // Let connections of the requests above finish closing, then allow two
    // descriptors more than the server holds: enough for the status
    // sampler's /proc reads, not for a new index segment's files.
    let mut fds = open_fds(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = open_fds(pid);
        if now == fds {
            break;
        }
        fds = now;
    }
    let (soft, hard) = nofile(pid);
    let limit = fds as u64 + 2;
    set_nofile(pid, limit);
    eprintln!("server holds {fds} descriptors; open-file limit {soft}:{hard}, now {limit}");

    // More messages: every one acked (the store does not need descriptors).
    for i in 0..40 {
        let cid = cid("x");
        ws.send_msg(&room, &cid, &format!("exhaust 소진 late {i}"))
            .await;
        ws.expect_ack(&cid).await;
    }
    // The indexer fails (log and status say so); the status never claims
    // the index has everything.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen_failing = false;
    loop {
        let st = keep.status().await;
        let lag = st["search"]["lag_messages"].as_u64().unwrap_or(0);
        assert!(lag > 0, "lag 0 while messages are not searchable: {st}");
        let logged = srv.log_tail().lines().any(|l| {
            let l = l.to_lowercase();
            l.contains("search index") && l.contains("fail")
        });
        if st["search"]["healthy"] == false {
            if !seen_failing {
                eprintln!("status while failing: {}", st["search"]);
            }
            seen_failing = true;
            assert!(
                st["search"]["error"]["message"].is_string(),
                "the status says why: {st}"
            );
        }
        if logged && (seen_failing || Instant::now() > deadline) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no index failure within 15 s\n--- server log ---\n{}",
            srv.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = keep.get("/metrics").await;
    assert!(
        metric(&page, "confab_search_index_failures_total") >= 1.0,
        "failures counted"
    );
    assert_eq!(metric(&page, "confab_search_index_healthy"), 0.0);
    assert!(seen_failing, "status `search.healthy` false while failing");
    // Let it fail for a while: the back-off grows, the indexer keeps trying.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = keep.status().await;
    assert!(st["search"]["lag_messages"].as_u64() > Some(0), "{st}");

    // Descriptors back: every message searchable, once, within seconds.
    set_nofile(pid, soft);
    let took = wait_total(&api, &b.token, "소진", 60, Duration::from_secs(40)).await;
    eprintln!("all 60 searchable {took:?} after the limit was restored");
    let st = api.get("/api/v1/status?history=0", "").await.1;
    assert_eq!(st["search"]["lag_messages"], 0, "{st}");
    assert_eq!(st["search"]["healthy"], true, "{st}");
    assert!(st["search"]["failures"].as_u64() >= Some(1), "{st}");
    let page = metrics_page(&api).await;
    assert_eq!(metric(&page, "confab_search_index_healthy"), 1.0);
    assert_eq!(metric(&page, "confab_search_index_lag_messages"), 0.0);
    drop(keep);
    ws.close().await;

    // And the index on disk is what it says: the same after a restart,
    // without a rebuild.
    srv.stop();
    srv.restart();
    let api = srv.api();
    wait_total(&api, &b.token, "소진", 60, Duration::from_secs(5)).await;
    let (_, sorted) = search(&api, &b.token, &[("q", "late"), ("limit", "50")]).await;
    assert_eq!(sorted["total"], 40, "{sorted}");
    let page = metrics_page(&api).await;
    assert_eq!(metric(&page, "confab_search_index_rebuilds_total"), 0.0);
}

/// Posts `n` messages with the word `damage`/`손상` whose relevance differs
/// (1–4 repetitions, 0–49 filler words) and whose `ts` differ (a couple of
/// ms apart), so that every answer has one right order.
async fn post_varied(srv: &Server, from: &User, room: &str, n: usize) {
    let mut ws = Ws::connect_auth(srv.addr, &from.token).await;
    let filler = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    ];
    for i in 0..n {
        let mut text = "damage ".repeat(1 + i % 4);
        text.push_str("손상");
        for k in 0..(i % 50) {
            text.push(' ');
            text.push_str(filler[(i + k) % filler.len()]);
        }
        text.push_str(&format!(" n{i}"));
        let cid = cid("d");
        ws.send_msg(room, &cid, &text).await;
        ws.expect_ack(&cid).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    ws.close().await;
}

/// The answers compared before damage and after the rebuild: relevance
/// pages (scores included), a time-sorted page, a two-word query.
fn damage_queries() -> Vec<Vec<(&'static str, &'static str)>> {
    vec![
        vec![("q", "damage"), ("limit", "50")],
        vec![("q", "손상"), ("limit", "50"), ("offset", "50")],
        vec![("q", "damage 손상"), ("limit", "50"), ("offset", "150")],
        vec![("q", "damage"), ("sort", "time"), ("limit", "50")],
        vec![("q", "delta echo"), ("limit", "50")],
    ]
}

async fn damage_answers(api: &Api, token: &str) -> Vec<(hyper::StatusCode, Value)> {
    let mut out = Vec::new();
    for q in damage_queries() {
        out.push(search(api, token, &q).await);
    }
    out
}

/// Flips 16 bytes in the middle of the largest index file with extension
/// `ext`; returns its name.
fn damage_index_file(data_dir: &std::path::Path, ext: &str) -> String {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = data_dir.join("search");
    let (path, len) = std::fs::read_dir(&dir)
        .expect("index dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == ext))
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .max_by_key(|(_, len)| *len)
        .unwrap_or_else(|| panic!("no .{ext} file in {}", dir.display()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open index file");
    let at = len / 2;
    let mut buf = [0u8; 16];
    f.seek(SeekFrom::Start(at)).expect("seek");
    let n = f.read(&mut buf).expect("read");
    for b in &mut buf[..n] {
        *b ^= 0xA5;
    }
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&buf[..n]).expect("write");
    f.sync_all().expect("sync");
    let name = path.file_name().map(|n| n.to_string_lossy().to_string());
    eprintln!("damaged {n} bytes at {at} of {len} in {name:?}");
    name.unwrap_or_default()
}

/// Polls until every damage query answers exactly as `before`; until then
/// each answer must be that one or a refusal (503 `busy`: the index is being
/// rebuilt), never a wrong one. Returns how long it took and the refusals.
async fn wait_answers(
    api: &Api,
    token: &str,
    before: &[(hyper::StatusCode, Value)],
    within: Duration,
) -> (Duration, usize) {
    let started = Instant::now();
    let mut refused = 0;
    loop {
        let now = damage_answers(api, token).await;
        if now == before {
            return (started.elapsed(), refused);
        }
        for (n, b) in now.iter().zip(before) {
            if n.0.as_u16() == 503 {
                assert_err(n, 503, "busy");
                refused += 1;
            } else {
                assert_eq!(n, b, "a wrong answer while the index is rebuilt");
            }
        }
        assert!(
            started.elapsed() < within,
            "answers differ from those before the damage after {within:?}:\n{}",
            now.iter()
                .zip(before)
                .filter(|(n, b)| n != b)
                .map(|(n, b)| format!(
                    "now {} total {} hits {}, was total {} hits {}",
                    n.0,
                    n.1["total"],
                    n.1["hits"].as_array().map_or(0, Vec::len),
                    b.1["total"],
                    b.1["hits"].as_array().map_or(0, Vec::len)
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Faults item 4, at start: bytes flipped inside a segment file while the
/// server is stopped are found by the checksums on open, and the index is
/// rebuilt from the store: the answers are exactly those before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_file_is_found_on_start_and_the_index_rebuilt() {
    let (mut srv, a, b, room) = pair_with("sdo", &UNLIMITED).await;
    post_varied(&srv, &a, &room, 200).await;
    let api = srv.api();
    wait_total(&api, &b.token, "damage", 200, Duration::from_secs(5)).await;
    let before = damage_answers(&api, &b.token).await;
    assert!(before.iter().all(|(s, _)| s.as_u16() == 200), "{before:?}");
    assert_eq!(before[0].1["total"], 200);

    for ext in ["fast", "idx"] {
        srv.stop();
        damage_index_file(srv.data_dir(), ext);
        srv.restart();
        let api = srv.api();
        let (took, refused) = wait_answers(&api, &b.token, &before, Duration::from_secs(15)).await;
        eprintln!(
            ".{ext} damaged: answers right again {took:?} after the start ({refused} refused before)"
        );
        let page = metrics_page(&api).await;
        assert!(
            metric(&page, "confab_search_index_damage_total") >= 1.0,
            "damage counted:\n{page}"
        );
        assert!(metric(&page, "confab_search_index_rebuilds_total") >= 1.0);
        assert!(
            srv.log_tail().contains("damaged"),
            "damage logged\n--- server log ---\n{}",
            srv.log_tail()
        );
    }
}

/// Faults item 4, while running: the periodic scrub (`index_scrub_secs`)
/// finds bytes flipped under the running server, the index is rebuilt from
/// the store while the server keeps serving, and the answers are exactly
/// those before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_file_is_found_by_the_scrub_and_the_index_rebuilt() {
    let mut settings = UNLIMITED.to_vec();
    settings.push("index_scrub_secs=1");
    let (srv, a, b, room) = pair_with("sds", &settings).await;
    let api = srv.api();
    post_varied(&srv, &a, &room, 200).await;
    wait_total(&api, &b.token, "damage", 200, Duration::from_secs(5)).await;
    let before = damage_answers(&api, &b.token).await;
    assert!(before.iter().all(|(s, _)| s.as_u16() == 200), "{before:?}");
    // A clean scrub first: nothing found in an intact index.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = metrics_page(&api).await;
        if metric(&page, "confab_search_index_scrubs_total{outcome=\"ok\"}") >= 1.0 {
            assert_eq!(metric(&page, "confab_search_index_damage_total"), 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "no scrub within 10 s:\n{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = Instant::now();
    damage_index_file(srv.data_dir(), "fast");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = metrics_page(&api).await;
        if metric(&page, "confab_search_index_damage_total") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "damage not found within 10 s\n--- server log ---\n{}",
            srv.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let found = started.elapsed();
    let (took, refused) = wait_answers(&api, &b.token, &before, Duration::from_secs(15)).await;
    eprintln!(
        "damage found {found:?} after it was made; answers right {took:?} later ({refused} refused before)"
    );
    let st = api.get("/api/v1/status?history=0", "").await.1;
    assert_eq!(st["search"]["healthy"], true, "{st}");
    assert!(st["search"]["rebuilds"].as_u64() >= Some(1), "{st}");
    assert!(srv.log_tail().contains("damaged"), "{}", srv.log_tail());
    // Still indexing after the rebuild.
    let (status, _) = api
        .post_message(&a.token, &room, &cid("d"), "damage after the rebuild")
        .await;
    assert!(status.is_success());
    wait_total(&api, &b.token, "damage", 201, Duration::from_secs(5)).await;
}
