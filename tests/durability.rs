//! Durability: a graceful restart keeps everything; SIGKILL under load loses
//! nothing that was acknowledged (no duplicate, no gap).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_everything() {
    let mut srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("pa").await;
    let b = api.new_user("pb").await;
    let c = api.new_user("pc").await;
    let rid = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let gid = api.group_room(&a.token, "persist", &[&b.id, &c.id]).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    for k in 1..=3 {
        let (st, m) = api
            .post_message(&a.token, &rid, &format!("d-{k}"), &format!("direct {k}"))
            .await;
        assert_eq!(st.as_u16(), 201, "{m}");
    }
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    wb.send_and_ack(&gid, "g-1", "group one").await;
    wb.send_json(&json!({"type": "read", "room": rid, "seq": 2}))
        .await;
    wb.ping().await;
    let (st, _) = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": c.username}),
        )
        .await;
    assert_eq!(st.as_u16(), 201);
    // A second token for A, revoked before the restart.
    let (_, login) = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": a.username, "password": PASSWORD}),
        )
        .await;
    let revoked = login["token"].as_str().expect("token").to_string();
    assert_status(&api.post("/api/v1/logout", &revoked, &json!({})).await, 204);

    let before_rooms = api.get("/api/v1/rooms", &b.token).await.1;

    // SIGTERM: open sockets are closed with 1001, the process exits cleanly.
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let status = srv.stop();
    assert_eq!(
        wa.expect_close().await,
        Some(1001),
        "close code on graceful shutdown"
    );
    assert_eq!(
        wb.expect_close().await,
        Some(1001),
        "close code on graceful shutdown"
    );
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    srv.restart();
    let api = srv.api();

    // Tokens are still valid (the secret persisted), the revoked one is not.
    let (st, me) = api.get("/api/v1/me", &a.token).await;
    assert_eq!(st.as_u16(), 200, "A's token after restart: {me}");
    assert_eq!(me["id"], a.id.as_str());
    assert_err(&api.get("/api/v1/me", &revoked).await, 401, "unauthorized");
    // Passwords too.
    let (st, _) = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": b.username, "password": PASSWORD}),
        )
        .await;
    assert_eq!(st.as_u16(), 200, "login after restart");
    // Users, contacts.
    let (_, users) = api
        .get(&format!("/api/v1/users?q={}", c.username), &a.token)
        .await;
    assert_eq!(users["users"][0]["id"], c.id.as_str(), "{users}");
    let (_, contacts) = api.get("/api/v1/contacts", &a.token).await;
    assert_eq!(contacts["contacts"][0]["id"], c.id.as_str(), "{contacts}");

    // Rooms, unread, messages.
    let after_rooms = api.get("/api/v1/rooms", &b.token).await.1;
    assert_eq!(
        after_rooms, before_rooms,
        "GET /rooms identical across the restart"
    );
    let eb = api.room_entry(&b.token, &rid).await;
    assert_eq!(eb["unread"], 1, "read position persisted: {eb}");
    let hist = api.history_all(&a.token, &rid).await;
    let texts: Vec<&str> = hist
        .iter()
        .map(|m| m["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, vec!["direct 1", "direct 2", "direct 3"]);
    let hist = api.history_all(&c.token, &gid).await;
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0]["client_id"], "g-1");

    // Sequences continue; client_id dedup survives the restart.
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let ack = wa.send_and_ack(&rid, "d-3", "direct 3").await;
    assert_eq!(ack["seq"], 3, "retry of a pre-restart client_id: {ack}");
    let ack = wa.send_and_ack(&rid, "d-4", "direct 4").await;
    assert_eq!(ack["seq"], 4, "{ack}");
    // The direct room is still the same room for the pair.
    let again = api.direct_room(&b.token, &a.id).await;
    assert_eq!(again["id"], rid.as_str());
}

#[derive(Debug, Clone)]
struct Acked {
    room: String,
    seq: u64,
    client_id: String,
    text: String,
    from: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acked_message() {
    const CLIENTS: usize = 4;
    const ROOMS: usize = 3;
    const WINDOW: usize = 16;
    let mut srv = Server::start(&UNLIMITED);
    let api = srv.api();
    let mut users = Vec::new();
    for _ in 0..CLIENTS {
        users.push(api.new_user("kl").await);
    }
    let ids: Vec<&str> = users[1..].iter().map(|u| u.id.as_str()).collect();
    let mut rooms = Vec::new();
    for r in 0..ROOMS {
        let g = api
            .group_room(&users[0].token, &format!("load {r}"), &ids)
            .await;
        rooms.push(g["id"].as_str().expect("id").to_string());
    }

    let total_acks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let mut ws = Ws::connect_auth(srv.addr, &u.token).await;
        let rooms = rooms.clone();
        let uid = u.id.clone();
        let total_acks = total_acks.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending: HashMap<String, (String, String)> = HashMap::new();
            let mut acked: Vec<Acked> = Vec::new();
            let mut delivered: Vec<(String, u64, String)> = Vec::new();
            let mut n = 0usize;
            'outer: loop {
                while pending.len() < WINDOW {
                    let room = rooms[n % rooms.len()].clone();
                    let c = format!("k{i}-{n}");
                    let text = format!("client {i} message {n}");
                    n += 1;
                    if ws
                        .sender()
                        .try_send_json(
                            &json!({"type": "send", "room": room, "client_id": c, "text": text}),
                        )
                        .await
                        .is_err()
                    {
                        break 'outer;
                    }
                    pending.insert(c, (room, text));
                }
                let Some(v) = ws.recv(Duration::from_secs(15)).await else {
                    panic!(
                        "client {i}: no frame for 15 s while {} sends pending",
                        pending.len()
                    );
                };
                match v["type"].as_str() {
                    Some("ack") => {
                        let c = v["client_id"].as_str().expect("client_id").to_string();
                        let (room, text) = pending.remove(&c).unwrap_or_else(|| {
                            panic!("client {i}: ack for unknown client_id: {v}")
                        });
                        assert_eq!(v["room"], room.as_str(), "{v}");
                        acked.push(Acked {
                            room,
                            seq: v["seq"].as_u64().expect("seq"),
                            client_id: c,
                            text,
                            from: uid.clone(),
                        });
                        total_acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("message") => delivered.push((
                        v["room"].as_str().expect("room").to_string(),
                        v["seq"].as_u64().expect("seq"),
                        v["client_id"].as_str().expect("client_id").to_string(),
                    )),
                    Some("error") => panic!("client {i}: error frame under load: {v}"),
                    Some(CLOSE) | Some(EOF) => break,
                    _ => {}
                }
            }
            (acked, delivered)
        }));
    }

    // Let the load run, then pull the plug.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acks_before_kill = total_acks.load(Ordering::Relaxed);
    srv.kill9();

    let mut acked: Vec<Acked> = Vec::new();
    let mut delivered: Vec<(String, u64, String)> = Vec::new();
    for t in tasks {
        let (a, d) = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("client task ends after SIGKILL")
            .expect("client task");
        acked.extend(a);
        delivered.extend(d);
    }
    assert!(
        acks_before_kill >= 50,
        "only {acks_before_kill} acks in 1.5 s of load: the test did not exercise much"
    );
    eprintln!(
        "sigkill test: {} acked, {} delivered frames before SIGKILL",
        acked.len(),
        delivered.len()
    );

    srv.restart();
    let api = srv.api();
    let reader = &users[1];
    let mut stored: HashMap<(String, u64), Value> = HashMap::new();
    for room in &rooms {
        let hist = api.history_all(&reader.token, room).await;
        let seqs: Vec<u64> = hist
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "room {room}: seqs must be 1..N without gaps");
        let mut seen = HashSet::new();
        for m in &hist {
            let key = (
                m["from"].as_str().expect("from").to_string(),
                m["client_id"].as_str().expect("client_id").to_string(),
            );
            assert!(
                seen.insert(key.clone()),
                "room {room}: client_id stored twice: {m}"
            );
            stored.insert((room.clone(), m["seq"].as_u64().expect("seq")), m.clone());
        }
        // The room's last_seq agrees with its history.
        let (_, r) = api
            .get(&format!("/api/v1/rooms/{room}"), &reader.token)
            .await;
        assert_eq!(
            r["last_seq"].as_u64(),
            Some(seqs.len() as u64),
            "last_seq of {room}: {r}"
        );
    }
    let mut acked_keys = HashSet::new();
    for a in &acked {
        assert!(
            acked_keys.insert(a.client_id.clone()),
            "client_id acked twice: {a:?}"
        );
        let m = stored
            .get(&(a.room.clone(), a.seq))
            .unwrap_or_else(|| panic!("acked message lost after SIGKILL: {a:?}"));
        assert_eq!(
            m["client_id"],
            a.client_id.as_str(),
            "acked {a:?} vs stored {m}"
        );
        assert_eq!(m["text"], a.text.as_str(), "acked {a:?} vs stored {m}");
        assert_eq!(m["from"], a.from.as_str(), "acked {a:?} vs stored {m}");
    }
    // Everything fanned out before the crash was committed too.
    for (room, seq, c) in &delivered {
        let m = stored
            .get(&(room.clone(), *seq))
            .unwrap_or_else(|| panic!("delivered message {room}/{seq} ({c}) lost after SIGKILL"));
        assert_eq!(m["client_id"], c.as_str(), "delivered {room}/{seq}");
    }

    // After recovery the rooms accept new messages at the next seq.
    let mut ws = Ws::connect_auth(srv.addr, &reader.token).await;
    for room in &rooms {
        let next = stored.keys().filter(|(r, _)| r == room).count() as u64 + 1;
        let ack = ws
            .send_and_ack(room, &cid("post-crash"), "after the crash")
            .await;
        assert_eq!(ack["seq"].as_u64(), Some(next), "{room}: {ack}");
    }
}
