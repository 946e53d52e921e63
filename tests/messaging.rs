//! Messaging: direct chats, acks, fan-out, history, unread and receipts,
//! concurrent senders, client_id retries, resume.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn is_msg_in(room: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v: &Value| v["type"] == "message" && v["room"] == room
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_end_to_end() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("dca").await;
    let b = api.new_user("dcb").await;

    // Room creation is idempotent per pair, whoever creates it.
    let (st, room) = api
        .post(
            "/api/v1/rooms",
            &a.token,
            &json!({"kind": "direct", "user_id": b.id}),
        )
        .await;
    assert_eq!(st.as_u16(), 201, "first direct room creation: {room}");
    let rid = room["id"].as_str().expect("room id").to_string();
    assert_eq!(room["kind"], "direct");
    assert!(
        room["name"].is_null(),
        "direct room name must be null: {room}"
    );
    assert!(
        room["owner"].is_null(),
        "direct room owner must be null: {room}"
    );
    let mut members: Vec<&str> = room["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_str().expect("member id"))
        .collect();
    members.sort();
    let mut want = vec![a.id.as_str(), b.id.as_str()];
    want.sort();
    assert_eq!(members, want);
    assert_eq!(room["last_seq"], 0, "{room}");

    let (st, again) = api
        .post(
            "/api/v1/rooms",
            &b.token,
            &json!({"kind": "direct", "user_id": a.id}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "B creating the same pair's room: {again}");
    assert_eq!(again["id"], rid.as_str(), "same room whoever creates it");
    let (st, again) = api
        .post(
            "/api/v1/rooms",
            &a.token,
            &json!({"kind": "direct", "user_id": b.id}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "A creating it again: {again}");
    assert_eq!(again["id"], rid.as_str());

    // Direct room with yourself / unknown user.
    let r = api
        .post(
            "/api/v1/rooms",
            &a.token,
            &json!({"kind": "direct", "user_id": a.id}),
        )
        .await;
    assert_err(&r, 400, "bad_request");
    let r = api
        .post(
            "/api/v1/rooms",
            &a.token,
            &json!({"kind": "direct", "user_id": "0123456789abcdef"}),
        )
        .await;
    assert_err(&r, 404, "user_not_found");

    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;

    // A sends; A gets an ack, B (and A's own session) get the message.
    // A second session of A: "the sender's other sessions" get the message too.
    let mut wa2 = Ws::connect_auth(srv.addr, &a.token).await;
    wa.send_msg(&rid, "c-1", "hello, B").await;
    let ack = wa.expect_ack("c-1").await;
    let m = wb.expect("B gets the message", is_msg_in(&rid)).await;
    assert_eq!(m["seq"], 1, "{m}");
    assert_eq!(m["text"], "hello, B", "{m}");
    assert_eq!(m["from"], a.id.as_str(), "{m}");
    assert_eq!(m["client_id"], "c-1", "{m}");
    assert_eq!(m["ts"], ack["ts"], "message ts equals ack ts");
    let own = wa2
        .expect("A's other session gets the message", is_msg_in(&rid))
        .await;
    assert_eq!(own["seq"], 1, "{own}");
    assert_eq!(own["client_id"], "c-1", "{own}");

    // B's session got it: A (the sender) gets a `delivered` receipt.
    let dr = wa
        .expect("a delivered receipt from B", |v| {
            v["type"] == "receipt" && v["kind"] == "delivered" && v["user"] == b.id.as_str()
        })
        .await;
    assert_eq!(dr["room"], rid.as_str(), "{dr}");
    assert!(dr["seq"].as_u64().is_some_and(|s| s >= 1), "{dr}");

    // HTTP history.
    let (st, h) = api
        .get(&format!("/api/v1/rooms/{rid}/messages"), &b.token)
        .await;
    assert_eq!(st.as_u16(), 200, "{h}");
    let msgs = h["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 1, "{h}");
    assert_eq!(msgs[0]["seq"], 1);
    assert_eq!(msgs[0]["room"], rid.as_str());
    assert_eq!(msgs[0]["from"], a.id.as_str());
    assert_eq!(msgs[0]["text"], "hello, B");
    assert_eq!(msgs[0]["client_id"], "c-1");
    assert_eq!(msgs[0]["ts"], ack["ts"]);

    // GET /rooms: last_message + unread.
    let eb = api.room_entry(&b.token, &rid).await;
    assert_eq!(eb["unread"], 1, "B's unread: {eb}");
    assert_eq!(eb["last_message"]["seq"], 1, "{eb}");
    assert_eq!(eb["last_message"]["text"], "hello, B", "{eb}");
    assert_eq!(eb["last_seq"], 1, "{eb}");
    let ea = api.room_entry(&a.token, &rid).await;
    assert_eq!(
        ea["unread"], 0,
        "sending moves the sender's read position: {ea}"
    );

    // B reads → A gets a read receipt, B's unread drops to 0.
    wb.send_json(&json!({"type": "read", "room": rid, "seq": 1}))
        .await;
    let rc = wa
        .expect("a read receipt", |v| {
            v["type"] == "receipt" && v["kind"] == "read"
        })
        .await;
    assert_eq!(rc["room"], rid.as_str(), "{rc}");
    assert_eq!(rc["user"], b.id.as_str(), "{rc}");
    assert_eq!(rc["seq"], 1, "{rc}");
    let eb = api.room_entry(&b.token, &rid).await;
    assert_eq!(eb["unread"], 0, "B's unread after the read frame: {eb}");

    // Reading beyond the last seq is capped, never backwards.
    wb.send_json(&json!({"type": "read", "room": rid, "seq": 99}))
        .await;
    wb.send_json(&json!({"type": "read", "room": rid, "seq": 0}))
        .await;
    wb.ping().await;
    let eb = api.room_entry(&b.token, &rid).await;
    assert_eq!(eb["unread"], 0, "{eb}");
    wa.send_and_ack(&rid, "c-2", "second").await;
    let eb = api.room_entry(&b.token, &rid).await;
    assert_eq!(
        eb["unread"], 1,
        "read position capped at the last seq at the time: {eb}"
    );

    // Typing: the other member sees it, not stored.
    wb.send_json(&json!({"type": "typing", "room": rid})).await;
    let t = wa.expect_type("typing").await;
    assert_eq!(t["room"], rid.as_str(), "{t}");
    assert_eq!(t["user"], b.id.as_str(), "{t}");

    // B answers over HTTP; A sees it live.
    let (st, m) = api.post_message(&b.token, &rid, "hb-1", "hi A").await;
    assert_eq!(st.as_u16(), 201, "{m}");
    assert_eq!(m["seq"], 3, "{m}");
    assert_eq!(m["from"], b.id.as_str());
    let live = wa
        .expect("A gets B's HTTP message", |v| {
            v["type"] == "message" && v["seq"] == 3
        })
        .await;
    assert_eq!(live["text"], "hi A");

    // Pagination.
    let (_, h) = api
        .get(
            &format!("/api/v1/rooms/{rid}/messages?after=1&limit=1"),
            &a.token,
        )
        .await;
    assert_eq!(seqs(&h), vec![2], "after=1&limit=1: {h}");
    let (_, h) = api
        .get(
            &format!("/api/v1/rooms/{rid}/messages?before=3&limit=5"),
            &a.token,
        )
        .await;
    assert_eq!(seqs(&h), vec![1, 2], "before=3: {h}");
    let (_, h) = api
        .get(&format!("/api/v1/rooms/{rid}/messages?limit=2"), &a.token)
        .await;
    assert_eq!(seqs(&h), vec![2, 3], "latest 2: {h}");
    let r = api
        .get(&format!("/api/v1/rooms/{rid}/messages?after=abc"), &a.token)
        .await;
    assert_err(&r, 400, "bad_request");

    // ping → pong.
    wa.ping().await;
}

fn seqs(h: &Value) -> Vec<u64> {
    h["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_see_one_gap_free_sequence() {
    const MEMBERS: usize = 5;
    const PER: usize = 100;
    const TOTAL: usize = MEMBERS * PER;
    let srv = Server::start(&UNLIMITED);
    let api = srv.api();
    let mut users = Vec::new();
    for _ in 0..MEMBERS {
        users.push(api.new_user("cs").await);
    }
    let others: Vec<&str> = users[1..].iter().map(|u| u.id.as_str()).collect();
    let room = api.group_room(&users[0].token, "busy room", &others).await;
    let rid = room["id"].as_str().expect("room id").to_string();
    assert_eq!(room["members"].as_array().expect("members").len(), MEMBERS);

    let mut conns = Vec::new();
    for u in &users {
        conns.push(Ws::connect_auth(srv.addr, &u.token).await);
    }

    let mut tasks = Vec::new();
    for (i, mut ws) in conns.into_iter().enumerate() {
        let rid = rid.clone();
        let uid = users[i].id.clone();
        tasks.push(tokio::spawn(async move {
            let tx = ws.sender();
            let rid2 = rid.clone();
            let sender = tokio::spawn(async move {
                for k in 0..PER {
                    tx.send_msg(&rid2, &format!("u{i}-m{k}"), &format!("text {i}/{k}"))
                        .await;
                }
            });
            // The sending session gets acks for its own sends and `message`
            // frames for everybody else's.
            let mut acks: HashMap<String, u64> = HashMap::new();
            let mut msgs: Vec<(u64, String, String, String)> = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while acks.len() < PER || msgs.len() < TOTAL - PER {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let v = ws.recv(left).await.unwrap_or_else(|| {
                    panic!(
                        "member {i}: timed out with {} acks and {} messages from others",
                        acks.len(),
                        msgs.len()
                    )
                });
                match v["type"].as_str() {
                    Some("ack") => {
                        assert_eq!(v["room"], rid.as_str(), "{v}");
                        let c = v["client_id"].as_str().expect("client_id").to_string();
                        assert!(
                            c.starts_with(&format!("u{i}-")),
                            "ack for someone else's send: {v}"
                        );
                        let prev = acks.insert(c, v["seq"].as_u64().expect("seq"));
                        assert!(prev.is_none(), "duplicate ack: {v}");
                    }
                    Some("message") if v["room"] == rid.as_str() && v["from"] != uid.as_str() => {
                        msgs.push((
                            v["seq"].as_u64().expect("seq"),
                            v["client_id"].as_str().expect("client_id").to_string(),
                            v["from"].as_str().expect("from").to_string(),
                            v["text"].as_str().expect("text").to_string(),
                        ))
                    }
                    Some("error") => panic!("member {i}: error frame {v}"),
                    Some(CLOSE) | Some(EOF) => panic!("member {i}: connection ended: {v}"),
                    _ => {}
                }
            }
            sender.await.expect("sender task");
            (uid, acks, msgs)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("member task"));
    }

    // Each member's view: seq -> (client_id, from), from messages + own acks.
    let mut views: Vec<BTreeMap<u64, (String, String)>> = Vec::new();
    let mut ack_seqs = HashSet::new();
    for (i, (uid, acks, msgs)) in results.iter().enumerate() {
        let seqs: Vec<u64> = msgs.iter().map(|m| m.0).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "member {i}: message frames not in seq order: {seqs:?}"
        );
        let mut view = BTreeMap::new();
        for m in msgs {
            assert!(
                view.insert(m.0, (m.1.clone(), m.2.clone())).is_none(),
                "member {i}: seq {} delivered twice",
                m.0
            );
            let (sender_ix, k) = m.1[1..].split_once("-m").expect("client_id shape");
            assert_eq!(m.3, format!("text {sender_ix}/{k}"), "text of {}", m.1);
        }
        assert_eq!(acks.len(), PER, "member {i} acks");
        for (c, seq) in acks {
            assert!(ack_seqs.insert(*seq), "seq {seq} acked twice");
            assert!(
                view.insert(*seq, (c.clone(), uid.clone())).is_none(),
                "member {i}: seq {seq} both acked to it and delivered from someone else"
            );
        }
        let keys: Vec<u64> = view.keys().copied().collect();
        assert_eq!(
            keys,
            (1..=TOTAL as u64).collect::<Vec<u64>>(),
            "member {i}: acks + messages cover seq 1..{TOTAL} without gaps"
        );
        views.push(view);
    }
    for (i, v) in views.iter().enumerate() {
        assert_eq!(
            v, &views[0],
            "member {i} sees the same sequence as member 0"
        );
    }
    let reference = &views[0];
    // Per-sender order is preserved (one connection, in order).
    for (i, user) in users.iter().enumerate() {
        let mine: Vec<&str> = reference
            .values()
            .filter(|(c, _)| c.starts_with(&format!("u{i}-")))
            .map(|(c, _)| c.as_str())
            .collect();
        let want: Vec<String> = (0..PER).map(|k| format!("u{i}-m{k}")).collect();
        assert_eq!(mine, want, "sender {i}'s messages in send order");
        assert!(
            reference
                .values()
                .filter(|(c, _)| c.starts_with(&format!("u{i}-")))
                .all(|(_, from)| from == &user.id),
            "from of sender {i}'s messages"
        );
    }
    // History agrees.
    let hist = api.history_all(&users[1].token, &rid).await;
    let hs: Vec<(u64, String)> = hist
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["client_id"].as_str().expect("cid").to_string(),
            )
        })
        .collect();
    let rs: Vec<(u64, String)> = reference
        .iter()
        .map(|(s, (c, _))| (*s, c.clone()))
        .collect();
    assert_eq!(hs, rs, "HTTP history equals the live stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_retry_is_exactly_once() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("ra").await;
    let b = api.new_user("rb").await;
    let rid = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room id")
        .to_string();

    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let first = wa.send_and_ack(&rid, "dup-1", "once").await;
    let second = wa.send_and_ack(&rid, "dup-1", "once").await;
    assert_eq!(first["seq"], 1, "{first}");
    assert_eq!(second["seq"], first["seq"], "retry gets the original seq");
    assert_eq!(second["ts"], first["ts"], "retry gets the original ts");
    // Even from another session of the same user.
    let mut wa2 = Ws::connect_auth(srv.addr, &a.token).await;
    let third = wa2.send_and_ack(&rid, "dup-1", "once").await;
    assert_eq!(third["seq"], first["seq"]);

    // Same client_id over HTTP: 200 with the original message.
    let (st, m) = api.post_message(&a.token, &rid, "dup-1", "once").await;
    assert_eq!(st.as_u16(), 200, "HTTP retry of a WS client_id: {m}");
    assert_eq!(m["seq"], 1, "{m}");
    assert_eq!(m["ts"], first["ts"], "{m}");

    // HTTP twice: 201 then 200, same message.
    let (st, m1) = api.post_message(&a.token, &rid, "dup-2", "via http").await;
    assert_eq!(st.as_u16(), 201, "{m1}");
    assert_eq!(m1["seq"], 2, "{m1}");
    let (st, m2) = api.post_message(&a.token, &rid, "dup-2", "via http").await;
    assert_eq!(st.as_u16(), 200, "{m2}");
    assert_eq!(m2, m1, "HTTP retry returns the original message");
    // And over WS: the original ack.
    let ack = wa.send_and_ack(&rid, "dup-2", "via http").await;
    assert_eq!(ack["seq"], 2, "{ack}");

    // The same client_id from another sender is a different message.
    let (st, mb) = api.post_message(&b.token, &rid, "dup-1", "B's own").await;
    assert_eq!(st.as_u16(), 201, "same client_id, other sender: {mb}");
    assert_eq!(mb["seq"], 3, "{mb}");

    let hist = api.history_all(&a.token, &rid).await;
    let summary: Vec<(u64, &str, &str)> = hist
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().expect("seq"),
                m["client_id"].as_str().expect("client_id"),
                m["from"].as_str().expect("from"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "dup-1", a.id.as_str()),
            (2, "dup-2", a.id.as_str()),
            (3, "dup-1", b.id.as_str())
        ],
        "exactly one stored message per (sender, client_id)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_delivers_exactly_the_missed_messages() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("sa").await;
    let b = api.new_user("sb").await;
    let c = api.new_user("sc").await;
    let rid = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room id")
        .to_string();
    let gid = api.group_room(&a.token, "g", &[&b.id, &c.id]).await["id"]
        .as_str()
        .expect("room id")
        .to_string();

    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    wa.send_and_ack(&rid, "r-0", "before").await;
    let m = wb.expect("B gets seq 1", is_msg_in(&rid)).await;
    let last_seen = m["seq"].as_u64().expect("seq");
    assert_eq!(last_seen, 1);
    wb.close().await;

    let mut acked = Vec::new();
    for k in 1..=5 {
        let ack = wa
            .send_and_ack(&rid, &format!("r-{k}"), &format!("missed {k}"))
            .await;
        acked.push(ack["seq"].as_u64().expect("seq"));
    }
    assert_eq!(acked, vec![2, 3, 4, 5, 6]);
    wa.send_and_ack(&gid, "g-1", "group 1").await;
    wa.send_and_ack(&gid, "g-2", "group 2").await;

    // Reconnect with resume: ready first, then exactly seq 2..=6, in order.
    let mut wb = Ws::connect(srv.addr).await;
    wb.auth(
        &b.token,
        json!({ rid.as_str(): last_seen, gid.as_str(): 1 }),
    )
    .await;
    let mut got = Vec::new();
    let mut got_g = Vec::new();
    while got.len() < 5 || got_g.is_empty() {
        let v = wb
            .expect("catch-up messages", |v| v["type"] == "message")
            .await;
        if v["room"] == rid.as_str() {
            got.push((
                v["seq"].as_u64().expect("seq"),
                v["text"].as_str().expect("text").to_string(),
            ));
        } else if v["room"] == gid.as_str() {
            got_g.push(v["seq"].as_u64().expect("seq"));
        } else {
            panic!("message for an unexpected room: {v}");
        }
    }
    let want: Vec<(u64, String)> = (1..=5).map(|k| (k + 1, format!("missed {k}"))).collect();
    assert_eq!(got, want, "catch-up after seq {last_seen}");
    assert_eq!(got_g, vec![2], "group catch-up after seq 1");
    // Nothing else (no duplicates) arrives for these rooms.
    if let Some(v) = wb
        .recv_until(|v| v["type"] == "message", Duration::from_millis(500))
        .await
    {
        panic!("unexpected extra message after catch-up: {v}");
    }
    // Live traffic continues after catch-up.
    wa.send_and_ack(&rid, "r-live", "live").await;
    let v = wb.expect("live message", is_msg_in(&rid)).await;
    assert_eq!(v["seq"], 7, "{v}");

    // resume from 0 replays the whole room.
    let mut wb2 = Ws::connect(srv.addr).await;
    wb2.auth(&b.token, json!({ rid.as_str(): 0 })).await;
    let mut all = Vec::new();
    while all.len() < 7 {
        let v = wb2.expect("full replay", is_msg_in(&rid)).await;
        all.push(v["seq"].as_u64().expect("seq"));
    }
    assert_eq!(all, (1..=7).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_list_orders_by_activity() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("oa").await;
    let b = api.new_user("ob").await;
    let c = api.new_user("oc").await;
    let r1 = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r2 = api.direct_room(&a.token, &c.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let g = api.group_room(&a.token, "grp", &[&b.id]).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    for (i, r) in [&r2, &g, &r1].iter().enumerate() {
        let (st, m) = api
            .post_message(&a.token, r, &cid("o"), &format!("m{i}"))
            .await;
        assert_eq!(st.as_u16(), 201, "{m}");
        // Distinct ms timestamps make "most recent" unambiguous.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (st, rooms) = api.get("/api/v1/rooms", &a.token).await;
    assert_eq!(st.as_u16(), 200);
    let ids: Vec<&str> = rooms["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids,
        vec![r1.as_str(), g.as_str(), r2.as_str()],
        "most recent activity first"
    );
    // B sees only its two rooms, each with unread 1.
    let (_, rooms) = api.get("/api/v1/rooms", &b.token).await;
    let rb = rooms["rooms"].as_array().expect("rooms");
    assert_eq!(rb.len(), 2, "{rooms}");
    for r in rb {
        assert_eq!(r["unread"], 1, "{r}");
        assert!(r["last_message"].is_object(), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_direct_chat_peers() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("pra").await;
    let b = api.new_user("prb").await;
    let c = api.new_user("prc").await;
    api.direct_room(&a.token, &b.id).await;
    // C shares only a group with A: no presence for C.
    api.group_room(&a.token, "no presence", &[&c.id]).await;

    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    let _wc = Ws::connect_auth(srv.addr, &c.token).await;
    // A connects: after ready, one presence frame for B (online).
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let p = wa.expect_type("presence").await;
    assert_eq!(
        p["user"],
        b.id.as_str(),
        "presence only for direct-chat peers: {p}"
    );
    assert_eq!(p["online"], true, "{p}");
    // B sees A come online.
    let p = wb
        .expect("A online", |v| {
            v["type"] == "presence" && v["user"] == a.id.as_str() && v["online"] == true
        })
        .await;
    assert_eq!(p["online"], true);
    wa.ping().await;
    assert!(
        wa.skipped
            .iter()
            .all(|v| v["type"] != "presence" || v["user"] == b.id.as_str()),
        "presence for a non-direct peer: {:?}",
        wa.skipped
    );

    // B goes away: A sees B offline with last_seen.
    wb.close().await;
    let p = wa
        .expect("B offline", |v| {
            v["type"] == "presence" && v["user"] == b.id.as_str() && v["online"] == false
        })
        .await;
    assert!(
        p["last_seen"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "last_seen in ms once offline: {p}"
    );
}
