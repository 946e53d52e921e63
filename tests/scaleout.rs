//! Scale-out (docs/SCALEOUT.md): three `confab serve --node` processes on
//! one PostgreSQL database and two `confab proxy` processes on loopback
//! ports. Clients talk only to the proxies, exactly as to a single server,
//! while the rooms are served by all three nodes, and by the others when
//! one is killed or stopped.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::pg;
use common::*;
use serde_json::{Value, json};

/// Every `message` frame a client received, per room: seq → client_id.
#[derive(Default)]
struct Seen(HashMap<String, BTreeMap<u64, String>>);

impl Seen {
    fn note(&mut self, v: &Value) {
        if v["type"] == "message" {
            let room = v["room"].as_str().expect("room").to_string();
            let seq = v["seq"].as_u64().expect("seq");
            let prev = self
                .0
                .entry(room)
                .or_default()
                .insert(seq, v["client_id"].as_str().unwrap_or("").to_string());
            assert!(prev.is_none(), "message seq {seq} delivered twice: {v}");
        }
    }
}

/// Users signed up through the proxies in the first test.
const SIGNUPS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_behind_two_proxies_work_as_one_server() {
    let c = Cluster::start(2).await;

    // Sign up through alternating proxies; log in through the other one.
    let mut users = Vec::new();
    for i in 0..SIGNUPS {
        let u = c.api(i % 2).signup(&uname("so")).await;
        let (status, body) = c
            .api((i + 1) % 2)
            .post(
                "/api/v1/login",
                "",
                &json!({"username": u.username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(
            status.as_u16(),
            200,
            "login through the other proxy: {body}"
        );
        let (status, me) = c.api((i + 1) % 2).get("/api/v1/me", &u.token).await;
        assert_eq!(status.as_u16(), 200);
        assert_eq!(me["id"], u.id.as_str());
        users.push(u);
    }

    // Direct chats, served by all three nodes.
    let mut rooms_per_node = [0usize; 3];
    let mut directs: Vec<(User, User, String)> = Vec::new();
    let mut extra = 0;
    while directs.len() < 9 || rooms_per_node.contains(&0) {
        let i = directs.len();
        let (a, b) = if i < 9 {
            (users[2 * i].clone(), users[2 * i + 1].clone())
        } else {
            // More pairs until every node holds a room.
            extra += 1;
            assert!(
                extra < 30,
                "rooms never reached every node: {rooms_per_node:?}"
            );
            (
                c.api(0).signup(&uname("sx")).await,
                c.api(1).signup(&uname("sx")).await,
            )
        };
        let room = c.api(i % 2).direct_room(&a.token, &b.id).await;
        let id = room["id"].as_str().expect("room id").to_string();
        rooms_per_node[c.room_node(&id)] += 1;
        // The same pair through the other proxy is the same room.
        let again = c.api((i + 1) % 2).direct_room(&b.token, &a.id).await;
        assert_eq!(again["id"], id.as_str());
        directs.push((a, b, id));
    }
    // An unknown peer: 404, nothing created.
    let (status, body) = c
        .api(0)
        .post(
            "/api/v1/rooms",
            &users[0].token,
            &json!({"kind": "direct", "user_id": "00000000000000aa"}),
        )
        .await;
    assert_err(&(status, body), 404, "user_not_found");

    // Messaging in every direct room: A on proxy 0, B on proxy 1.
    for (i, (a, b, room)) in directs.iter().enumerate() {
        let mut wa = Ws::connect_auth(c.proxies[0].addr, &a.token).await;
        let mut wb = Ws::connect_auth(c.proxies[1].addr, &b.token).await;
        let text = format!("hello zebracorn {i}");
        let ack = wa.send_and_ack(room, &cid("d"), &text).await;
        assert_eq!(ack["seq"], 1);
        let got = wb.expect_type("message").await;
        assert_eq!(got["text"], text.as_str());
        assert_eq!(got["from"], a.id.as_str());
        let reply = wb.send_and_ack(room, &cid("r"), "right back message").await;
        assert_eq!(reply["seq"], 2);
        let got = wa.expect_type("message").await;
        assert_eq!(got["seq"], 2, "{got}");
        // Receipts, typing and presence cross proxies as on one server.
        let receipt = wb
            .expect("a delivered receipt", |v| v["type"] == "receipt")
            .await;
        assert_eq!(receipt["kind"], "delivered", "{receipt}");
        wa.send_and_ack(room, &cid("d"), "third").await;
        wb.expect_type("message").await;
        wb.send_json(&json!({"type": "read", "room": room, "seq": 3}))
            .await;
        let read = wa
            .expect("a read receipt", |v| {
                v["type"] == "receipt" && v["kind"] == "read"
            })
            .await;
        assert_eq!(
            (read["user"].as_str(), read["seq"].as_u64()),
            (Some(b.id.as_str()), Some(3))
        );
        wb.send_json(&json!({"type": "typing", "room": room})).await;
        let typing = wa.expect_type("typing").await;
        assert_eq!(typing["user"], b.id.as_str());
        drop(wb);
        let gone = wa
            .expect("b offline", |v| {
                v["type"] == "presence" && v["online"] == false
            })
            .await;
        assert_eq!(gone["user"], b.id.as_str());
        assert!(gone["last_seen"].is_i64(), "{gone}");
    }

    // Contacts on other nodes, by name and by id, through either proxy.
    let other_node = |u: &User| c.user_node(&u.id) != c.user_node(&users[0].id);
    let far: Vec<&User> = users.iter().filter(|u| other_node(u)).take(2).collect();
    let (status, added) = c
        .api(0)
        .post(
            "/api/v1/contacts",
            &users[0].token,
            &json!({"username": far[0].username.to_uppercase()}),
        )
        .await;
    assert_eq!(status.as_u16(), 201, "{added}");
    assert_eq!(added["id"], far[0].id.as_str());
    let (status, added) = c
        .api(1)
        .post(
            "/api/v1/contacts",
            &users[0].token,
            &json!({"user_id": far[1].id}),
        )
        .await;
    assert_eq!(status.as_u16(), 201, "{added}");
    let (_, list) = c.api(1).get("/api/v1/contacts", &users[0].token).await;
    let names: Vec<&str> = list["contacts"]
        .as_array()
        .expect("contacts")
        .iter()
        .filter_map(|u| u["username"].as_str())
        .collect();
    assert!(
        names.contains(&far[0].username.as_str()) && names.contains(&far[1].username.as_str()),
        "{list}"
    );
    let (status, body) = c
        .api(0)
        .post(
            "/api/v1/contacts",
            &users[0].token,
            &json!({"username": "nobody_here_at_all"}),
        )
        .await;
    assert_err(&(status, body), 404, "user_not_found");

    // A group whose members connect through different proxies: every member
    // sees every message once, gap-free, in the same order.
    let owner = &users[0];
    let member_ids: Vec<&str> = users[1..8].iter().map(|u| u.id.as_str()).collect();
    let group = c
        .api(1)
        .group_room(&owner.token, "spread", &member_ids)
        .await;
    let gid = group["id"].as_str().expect("group id").to_string();
    let members: Vec<&User> = users[..8].iter().collect();
    let mut sockets = Vec::new();
    for (k, u) in members.iter().enumerate() {
        sockets.push(Ws::connect_auth(c.proxies[k % 2].addr, &u.token).await);
    }
    let senders = 4;
    let per = 15;
    let mut tasks = Vec::new();
    for (k, ws) in sockets.drain(..).enumerate() {
        let gid = gid.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut seen = Seen::default();
            let mut acked = BTreeMap::new();
            if k < senders {
                for j in 0..per {
                    let id = format!("g{k}-{j}");
                    ws.send_msg(&gid, &id, &format!("group message {k} {j}"))
                        .await;
                }
            }
            let mine = if k < senders { per } else { 0 };
            let total = senders * per;
            let deadline = Instant::now() + Duration::from_secs(20);
            while seen.0.get(&gid).map_or(0, BTreeMap::len) + acked.len() < total
                || acked.len() < mine
            {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some(v) = ws.recv(left).await else { break };
                if v["type"] == "ack" {
                    acked.insert(
                        v["seq"].as_u64().expect("seq"),
                        v["client_id"].as_str().unwrap_or("").to_string(),
                    );
                }
                assert!(v["type"] != "error", "member {k}: {v}");
                seen.note(&v);
            }
            let mut all = seen.0.remove(&gid).unwrap_or_default();
            for (seq, id) in acked {
                assert!(
                    all.insert(seq, id).is_none(),
                    "member {k}: own message also delivered"
                );
            }
            all
        }));
    }
    let mut views = Vec::new();
    for t in tasks {
        views.push(t.await.expect("member task"));
    }
    let total = (senders * per) as u64;
    for (k, v) in views.iter().enumerate() {
        let seqs: Vec<u64> = v.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "member {k} saw every seq once, no gaps"
        );
        assert_eq!(v, &views[0], "member {k} saw the same order");
    }

    // My rooms through either proxy: one node's answer, every room.
    let a = &users[0];
    for p in 0..2 {
        let (status, body) = c.api(p).get("/api/v1/rooms", &a.token).await;
        assert_eq!(status.as_u16(), 200, "{body}");
        let ids: Vec<&str> = body["rooms"]
            .as_array()
            .expect("rooms")
            .iter()
            .filter_map(|r| r["id"].as_str())
            .collect();
        assert!(
            ids.contains(&gid.as_str()) && ids.contains(&directs[0].2.as_str()),
            "{body}"
        );
        assert!(body.get("partial").is_none(), "{body}");
    }

    // Search: every node indexes the whole message stream; only the
    // searcher's rooms are searched.
    let searcher = &users[1];
    let body = search_until(c.api(1), "q=zebracorn", &searcher.token, 1).await;
    assert_eq!(body["total"], 1, "only the searcher's own room: {body}");
    assert_eq!(body["hits"][0]["room"], directs[0].2.as_str(), "{body}");
    // The group's messages and a direct chat's, from two rooms (written
    // through two nodes, usually), by time and paged.
    let total = senders * per + 1;
    let body = search_until(
        c.api(0),
        "q=message&sort=time&limit=50",
        &users[1].token,
        total,
    )
    .await;
    assert_eq!(body["total"].as_u64(), Some(total as u64), "{body}");
    let ts: Vec<i64> = body["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h["ts"].as_i64().unwrap_or(0))
        .collect();
    assert!(ts.windows(2).all(|w| w[0] >= w[1]), "newest first: {ts:?}");
    let page = c
        .api(0)
        .get(
            "/api/v1/search?q=message&sort=time&limit=20&offset=40",
            &users[1].token,
        )
        .await
        .1;
    assert_eq!(page["hits"].as_array().map(Vec::len), Some(20), "{page}");
    assert_eq!(page["next_offset"], 60, "{page}");
    assert_eq!(page["hits"][0]["ts"], body["hits"][40]["ts"], "{page}");
    let last = c
        .api(1)
        .get(
            "/api/v1/search?q=message&sort=time&limit=20&offset=60",
            &users[1].token,
        )
        .await
        .1;
    assert_eq!(
        last["hits"].as_array().map(Vec::len),
        Some(total - 60),
        "{last}"
    );
    assert!(last.get("next_offset").is_none(), "{last}");
    let rooms: std::collections::HashSet<&str> = body["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .chain(last["hits"].as_array().expect("hits"))
        .filter_map(|h| h["room"].as_str())
        .collect();
    assert_eq!(
        rooms.len(),
        2,
        "hits from the group and the direct chat: {rooms:?}"
    );

    // User lookup by name through the proxy: every user.
    let (status, body) = c.api(0).get("/api/v1/users?q=so_&limit=50", &a.token).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(
        body["users"].as_array().map(Vec::len),
        Some(SIGNUPS),
        "{body}"
    );

    // The proxy's own status and metrics show every node.
    let (_, st) = c.api(0).get("/api/v1/status", "").await;
    assert_eq!(st["role"], "proxy");
    assert_eq!(st["nodes"].as_array().map(Vec::len), Some(3), "{st}");
    let r = c
        .api(0)
        .raw(hyper::Method::GET, "/metrics", "", None, &[])
        .await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    for id in IDS {
        assert!(
            text.contains(&format!("confab_proxy_node_link_up{{node=\"{id}\"}} 1")),
            "{text}"
        );
    }
    // Logging out through one proxy closes the token's sessions on the other
    // and makes the other refuse it.
    let u = &users[17];
    let mut ws = Ws::connect_auth(c.proxies[1].addr, &u.token).await;
    let (status, _) = c.api(0).post("/api/v1/logout", &u.token, &json!({})).await;
    assert_eq!(status.as_u16(), 204);
    let closed = ws.expect("the close", is_end).await;
    assert_eq!(closed["code"], 4001, "{closed}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = c.api(1).get("/api/v1/rooms", &u.token).await;
        if status.as_u16() == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other proxy refuses a revoked token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The UI is served by the proxy too.
    let r = c.api(1).raw(hyper::Method::GET, "/", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(String::from_utf8_lossy(&r.body).contains("<html"));
    drop(c.dir);
}

/// What one sender saw of its sends: client_id → Ok(seq) or Err(code).
type Outcomes = Vec<(String, Result<u64, String>, Instant)>;

/// Sends to `room` one message at a time until `stop`, waiting for each
/// answer (ack or error) before the next.
async fn send_loop(mut ws: Ws, room: String, tag: String, stop: Instant) -> (Ws, Outcomes) {
    let mut out = Vec::new();
    let mut n = 0;
    while Instant::now() < stop {
        let id = format!("{tag}-{n}");
        n += 1;
        ws.send_msg(&room, &id, &format!("load {tag} {n}")).await;
        let v = ws
            .recv_until(
                |v| {
                    (v["client_id"] == id.as_str() && (v["type"] == "ack" || v["type"] == "error"))
                        || is_end(v)
                },
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|| json!({"type": "error", "code": "no answer"}));
        assert!(!is_end(&v), "{tag}: the connection ended: {v}");
        let r = if v["type"] == "ack" {
            Ok(v["seq"].as_u64().expect("seq"))
        } else {
            Err(v["code"].as_str().unwrap_or("?").to_string())
        };
        out.push((id, r, Instant::now()));
        // 40 a second: under the default rate limit (50/s).
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (ws, out)
}

/// Reads frames until nothing arrives for `quiet`, noting every message.
async fn collect(ws: &mut Ws, seen: &mut Seen, quiet: Duration) {
    while let Some(v) = ws.recv(quiet).await {
        if is_end(&v) {
            break;
        }
        seen.note(&v);
    }
}

/// Every acked client_id is stored exactly once, and the room's seqs run
/// from 1 without a gap.
fn check_history(history: &[Value], acked: &[(String, u64)], what: &str) -> u64 {
    let seqs: Vec<u64> = history
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{what}: gap-free history"
    );
    let mut by_id: HashMap<&str, Vec<u64>> = HashMap::new();
    for m in history {
        by_id
            .entry(m["client_id"].as_str().unwrap_or(""))
            .or_default()
            .push(m["seq"].as_u64().unwrap_or(0));
    }
    for (id, seq) in acked {
        assert_eq!(
            by_id.get(id.as_str()),
            Some(&vec![*seq]),
            "{what}: acked {id} stored once at its seq"
        );
    }
    seqs.len() as u64
}

/// Direct rooms of new pairs, until every node serves at least one and
/// there are at least `min`.
async fn pairs_on_every_node(c: &Cluster, min: usize) -> Vec<(User, User, String)> {
    let api = c.api(0);
    let mut pairs = Vec::new();
    let mut per_node = [0usize; 3];
    while per_node.contains(&0) || pairs.len() < min {
        assert!(
            pairs.len() < 40,
            "rooms never reached every node: {per_node:?}"
        );
        let (a, b) = (
            api.signup(&uname("ka")).await,
            api.signup(&uname("kb")).await,
        );
        let room = api.direct_room(&a.token, &b.id).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        per_node[c.room_node(&room)] += 1;
        pairs.push((a, b, room));
    }
    pairs
}

/// Senders (one per pair, on proxy 0) and receivers (on proxy 1) at work.
struct Load {
    senders: Vec<tokio::task::JoinHandle<(Ws, Outcomes)>>,
    receivers: Vec<Ws>,
}

/// Starts a sender per pair, each sending until `run` is over, and gives
/// them 1.2 s to get going.
async fn start_load(c: &Cluster, pairs: &[(User, User, String)], run: Duration) -> Load {
    let stop = Instant::now() + run;
    let mut load = Load {
        senders: Vec::new(),
        receivers: Vec::new(),
    };
    for (i, (a, b, room)) in pairs.iter().enumerate() {
        let wa = Ws::connect_auth(c.proxies[0].addr, &a.token).await;
        load.receivers
            .push(Ws::connect_auth(c.proxies[1].addr, &b.token).await);
        load.senders.push(tokio::spawn(send_loop(
            wa,
            room.clone(),
            format!("s{i}"),
            stop,
        )));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    load
}

/// Waits for the senders, then checks that nothing acked is lost or
/// doubled, every history is gap-free and every receiver saw every seq
/// once; returns the senders' outcomes.
async fn finish_load(c: &Cluster, pairs: &[(User, User, String)], load: Load) -> Vec<Outcomes> {
    let Load {
        senders,
        mut receivers,
    } = load;
    let mut outcomes = Vec::new();
    for s in senders {
        outcomes.push(s.await.expect("sender").1);
    }
    let api = c.api(1);
    for (i, ((_, b, room), out)) in pairs.iter().zip(&outcomes).enumerate() {
        let acked: Vec<(String, u64)> = out
            .iter()
            .filter_map(|(id, r, _)| r.as_ref().ok().map(|s| (id.clone(), *s)))
            .collect();
        // Nothing acked is lost, nothing is stored twice, no seq twice.
        let history = api.history_all(&b.token, room).await;
        let n = check_history(&history, &acked, &format!("room {i}"));
        // The receiver's session saw every message once, in order.
        let mut seen = Seen::default();
        collect(&mut receivers[i], &mut seen, Duration::from_millis(2500)).await;
        let got: Vec<u64> = seen
            .0
            .get(room.as_str())
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        assert_eq!(
            got,
            (1..=n).collect::<Vec<_>>(),
            "room {i}: the receiver saw every seq once"
        );
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_rooms_move_to_the_others_within_2_s_and_nothing_is_lost() {
    let mut c = Cluster::start(2).await;
    let pairs = pairs_on_every_node(&c, 6).await;
    let victim = c.room_node(&pairs[0].2);
    let load = start_load(&c, &pairs, Duration::from_secs(6)).await;
    let killed = Instant::now();
    c.nodes[victim].kill9();
    // Over HTTP too: the victim's rooms answer from another node at once,
    // and lists are whole.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a0, _, room0) = &pairs[0];
    let api = c.api(0);
    let (status, body) = api
        .get(&format!("/api/v1/rooms/{room0}/messages"), &a0.token)
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let (status, body) = api.get("/api/v1/rooms", &a0.token).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert!(
        body["rooms"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["id"] == room0.as_str())),
        "{body}"
    );
    let outcomes = finish_load(&c, &pairs, load).await;
    for (i, ((_, _, room), out)) in pairs.iter().zip(&outcomes).enumerate() {
        let errors: Vec<(&String, Duration)> = out
            .iter()
            .filter_map(|(_, r, t)| r.as_ref().err().map(|e| (e, t.duration_since(killed))))
            .collect();
        if c.room_node(room) != victim {
            assert!(errors.is_empty(), "room {i} on another node: {errors:?}");
            continue;
        }
        assert!(
            errors
                .iter()
                .all(|(e, t)| *e == "node_unavailable" && *t < Duration::from_secs(2)),
            "room {i}: only the sends under way when the node died failed: {errors:?}"
        );
        let first_ok = out
            .iter()
            .find(|(_, r, t)| r.is_ok() && *t > killed)
            .map(|(_, _, t)| t.duration_since(killed));
        assert!(
            first_ok.is_some_and(|d| d < Duration::from_secs(2)),
            "room {i}: served by {} within 2 s of the kill: {first_ok:?}",
            IDS[c.room_node_without(room, victim)]
        );
    }
    // The victim comes back and serves its rooms again.
    c.nodes[victim].spawn();
    c.wait_links(0, 3).await;
    c.wait_links(1, 3).await;
    let (a, b, room) = &pairs[0];
    let mut wa = Ws::connect_auth(c.proxies[0].addr, &a.token).await;
    let mut wb = Ws::connect_auth(c.proxies[1].addr, &b.token).await;
    let ack = wa
        .send_and_ack(room, &cid("back"), "after the restart")
        .await;
    let got = wb
        .expect("the message", |v| {
            v["type"] == "message" && v["seq"] == ack["seq"]
        })
        .await;
    assert_eq!(got["text"], "after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_loses_its_rooms_and_writes_no_conflicting_seq_when_it_wakes() {
    let c = Cluster::start(2).await;
    let pairs = pairs_on_every_node(&c, 6).await;
    let victim = c.room_node(&pairs[0].2);
    let load = start_load(&c, &pairs, Duration::from_secs(9)).await;
    // Frozen with its sockets open: the proxies notice the silence and move
    // its rooms; a transaction it left open is ended by the database. Then
    // it wakes with whatever it had queued, while its rooms are written
    // through other nodes.
    let stopped = Instant::now();
    pause(c.nodes[victim].pid(), true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    pause(c.nodes[victim].pid(), false);
    // Gap-free histories, every ack once, every receiver every seq once.
    let outcomes = finish_load(&c, &pairs, load).await;
    for (i, ((_, _, room), out)) in pairs.iter().zip(&outcomes).enumerate() {
        let flowing = out
            .iter()
            .filter(|(_, r, t)| {
                let d = t.duration_since(stopped);
                r.is_ok() && d > Duration::from_secs(4) && d < Duration::from_secs(5)
            })
            .count();
        assert!(
            flowing > 5,
            "room {i} (served by {} before) flowed while that node was frozen",
            IDS[c.room_node(room)]
        );
        let late: Vec<_> = out
            .iter()
            .filter(|(_, r, t)| r.is_err() && t.duration_since(stopped) > Duration::from_secs(6))
            .collect();
        assert!(late.is_empty(), "room {i}: errors after the wake: {late:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_leave_while_serving_and_nothing_is_lost() {
    let mut c = Cluster::start(2).await;
    let mut pairs = pairs_on_every_node(&c, 8).await;
    // Some rooms that n4 will serve.
    let ids: Vec<String> = ["n1", "n2", "n3", "n4"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let four = confab::cluster::Ring::new(&ids);
    let to_n4 = |p: &(User, User, String)| four.room_owner(p.2.parse().expect("room id")) == "n4";
    while pairs.iter().filter(|p| to_n4(p)).count() < 2 {
        let api = c.api(0);
        let (a, b) = (
            api.signup(&uname("ja")).await,
            api.signup(&uname("jb")).await,
        );
        let room = api.direct_room(&a.token, &b.id).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        pairs.push((a, b, room));
    }
    let load = start_load(&c, &pairs, Duration::from_secs(8)).await;
    // A fourth node joins: started, listed, the proxies told.
    let n4 = c.add_node("n4");
    c.reload_proxies();
    c.wait_links(0, 4).await;
    c.wait_links(1, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // n2 leaves the list (it keeps running until its answers are in).
    c.remove_from_list("n2");
    c.reload_proxies();
    c.wait_links(0, 3).await;
    let outcomes = finish_load(&c, &pairs, load).await;
    for (i, out) in outcomes.iter().enumerate() {
        let errors: Vec<_> = out.iter().filter(|(_, r, _)| r.is_err()).collect();
        assert!(errors.is_empty(), "room {i}: {errors:?}");
    }
    // n4 served its share: it stored messages.
    let r = Api(c.nodes[n4].addr)
        .raw(hyper::Method::GET, "/metrics", "", None, &[])
        .await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    let stored: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("confab_messages_stored_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(stored > 10.0, "n4 stored messages: {stored}");
    // The proxies list n1, n3, n4.
    let (_, st) = c.api(1).get("/api/v1/status", "").await;
    let listed: Vec<&str> = st["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(listed, ["n1", "n3", "n4"], "{st}");
}

/// A node's `/api/v1/status` storage.database, once `ok` says it is.
async fn database_until(node: Api, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, st) = node.get("/api/v1/status?history=0", "").await;
        let db = st["storage"]["database"].clone();
        if ok(&db) {
            return db;
        }
        assert!(Instant::now() < deadline, "{db}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_dies_and_the_promoted_standby_takes_over_losing_nothing_acked() {
    let pair = pg::start_pair();
    let url = pair.primary.fresh_database("failover");
    let dbname = url
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .expect("a dbname")
        .to_string();
    // Both hosts; the nodes write to whichever takes writes.
    let both = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname={dbname}",
        pair.primary.port(),
        pair.standby.port()
    );
    let c = Cluster::start_on(2, "", both).await;
    // The nodes see the synchronous standby and its lag.
    let node = Api(c.nodes[0].addr);
    let primary_addr = format!("127.0.0.1:{}", pair.primary.port());
    let db = database_until(node, |db| db["standbys"][0]["sync_state"] == "sync").await;
    assert_eq!(db["server"]["addr"], primary_addr.as_str(), "{db}");
    assert_eq!(db["standbys"][0]["name"], "standby1", "{db}");
    let r = node
        .raw(hyper::Method::GET, "/metrics", "", None, &[])
        .await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(
        text.contains("confab_db_replication_lag_bytes{standby=\"standby1\"}")
            && text.contains("confab_db_sync_standbys 1"),
        "{text}"
    );

    let pairs = pairs_on_every_node(&c, 6).await;
    let load = start_load(&c, &pairs, Duration::from_secs(9)).await;
    // The primary's machine dies; a second later the standby is promoted
    // (what Patroni does after its TTL).
    pair.primary.crash();
    tokio::time::sleep(Duration::from_secs(1)).await;
    pair.standby.promote();
    let promoted = Instant::now();
    // Every acked message is there once (an outcome-unknown commit was
    // resolved on the promoted standby), histories gap-free, every receiver
    // saw every seq.
    let outcomes = finish_load(&c, &pairs, load).await;
    for (i, out) in outcomes.iter().enumerate() {
        let errors: Vec<(&String, i128)> = out
            .iter()
            .filter_map(|(_, r, t)| {
                r.as_ref().err().map(|e| {
                    let ms = if *t > promoted {
                        t.duration_since(promoted).as_millis() as i128
                    } else {
                        -(promoted.duration_since(*t).as_millis() as i128)
                    };
                    (e, ms)
                })
            })
            .collect();
        assert!(
            errors
                .iter()
                .all(|(e, ms)| *e == "storage_error" && *ms < 2000),
            "room {i}: only retryable storage errors, none 2 s after the promotion: {errors:?}"
        );
        let first_ok = out
            .iter()
            .find(|(_, r, t)| r.is_ok() && *t > promoted)
            .map(|(_, _, t)| t.duration_since(promoted));
        assert!(
            first_ok.is_some_and(|d| d < Duration::from_secs(2)),
            "room {i}: written again within 2 s of the promotion: {first_ok:?}"
        );
    }
    let standby_addr = format!("127.0.0.1:{}", pair.standby.port());
    let db = database_until(node, |db| db["server"]["addr"] == standby_addr.as_str()).await;
    assert_eq!(db["server"]["standby"], false, "{db}");
}

/// How long after its ack a message is found by a search through the other
/// proxy (polled every 20 ms, for at most 10 s).
async fn searchable_after(c: &Cluster, a: &User, b: &User, room: &str, word: &str) -> Duration {
    let mut ws = Ws::connect_auth(c.proxies[0].addr, &a.token).await;
    ws.send_and_ack(room, &cid("f"), &format!("fresh {word} news"))
        .await;
    let acked = Instant::now();
    loop {
        let (status, body) = c
            .api(1)
            .get(&format!("/api/v1/search?q={word}"), &b.token)
            .await;
        if status.as_u16() == 200 && body["total"] == 1 {
            return acked.elapsed();
        }
        assert!(acked.elapsed() < Duration::from_secs(10), "{word}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_from_any_proxy_stays_fresh_while_nodes_die_and_come_back() {
    let mut c = Cluster::start(2).await;
    let api = c.api(0);
    let (a, b) = (
        api.signup(&uname("sa")).await,
        api.signup(&uname("sb")).await,
    );
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut words = (0..).map(|i| format!("frisch{i}wort"));
    let phase = |label: &str, times: Vec<Duration>| {
        let m = median(times.clone());
        eprintln!("search freshness, {label}: median {m:?}, all {times:?}");
        assert!(
            times.iter().all(|t| *t < Duration::from_secs(3)),
            "{label}: {times:?}"
        );
    };
    let mut times = Vec::new();
    for _ in 0..5 {
        let w = words.next().expect("word");
        times.push(searchable_after(&c, &a, &b, &room, &w).await);
    }
    phase("all nodes up", times);
    // The node that answers b's searches dies: another node answers, from
    // its own index of the whole stream, at once.
    let searcher_node = c.user_node(&b.id);
    c.nodes[searcher_node].kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let w = words.next().expect("word");
        times.push(searchable_after(&c, &a, &b, &room, &w).await);
    }
    phase("the searcher's node dead", times);
    // It comes back (its index catches up on what it missed) and answers
    // again: everything, old and new.
    c.nodes[searcher_node].spawn();
    c.wait_links(1, 3).await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let w = words.next().expect("word");
        times.push(searchable_after(&c, &a, &b, &room, &w).await);
    }
    phase("the node back", times);
    let body = search_until(c.api(1), "q=news&limit=50", &b.token, 15).await;
    assert_eq!(body["total"], 15, "{body}");
}

/// The proxy's view of node `id`: its entry in `/api/v1/status`.
async fn link_of(c: &Cluster, id: &str) -> Value {
    let (_, st) = c.api(0).get("/api/v1/status", "").await;
    st["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == id).cloned())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_secret_or_a_misplaced_id_is_refused_clearly() {
    let mut c = Cluster::start(1).await;
    // Rogue nodes on the same database, each with a config of its own.
    let rogue = |name: &str, secret: &str, id: &str, port: u16| {
        let path = c.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[store]\ndatabase_url = \"{}\"\n[cluster]\ncluster_secret = \"{secret}\"\ncluster_nodes = [\"{id}=127.0.0.1:{port}\"]\n",
                c.database_url
            ),
        )
        .expect("write config");
        let data = c.dir.path().join(name);
        let args = [
            "serve",
            "--config",
            path.to_str().expect("path"),
            "--node",
            id,
            "--data-dir",
            data.to_str().expect("path"),
        ];
        Proc::start(c.dir.path(), args.iter().map(|s| s.to_string()).collect())
    };
    let (p5, p6) = (free_port(), free_port());
    let _n5 = rogue(
        "other-secret",
        "another-secret-0123456789abcdefghij",
        "n5",
        p5,
    );
    // Started as n1, but listed as n6 (a copy-pasted config).
    let _n6 = rogue("misplaced", SECRET, "n1", p6);
    c.list.push(("n5".into(), format!("127.0.0.1:{p5}")));
    c.list.push(("n6".into(), format!("127.0.0.1:{p6}")));
    c.write_config();
    c.reload_proxies();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (n5, n6) = (link_of(&c, "n5").await, link_of(&c, "n6").await);
        let e5 = n5["last_error"].as_str().unwrap_or("");
        let e6 = n6["last_error"].as_str().unwrap_or("");
        if e5.contains("another cluster_secret") && e6.contains("says it is \"n1\", not n6") {
            assert_eq!(
                (n5["up"].as_bool(), n6["up"].as_bool()),
                (Some(false), Some(false))
            );
            break;
        }
        assert!(Instant::now() < deadline, "refused clearly: {n5} {n6}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not ready while they are listed, and nothing is placed on them.
    let body = readyz_until(&c, 503, Duration::from_secs(1)).await;
    assert_eq!(body["down"], json!(["n5", "n6"]), "{body}");
    let u = c.api(0).signup(&uname("rg")).await;
    let (status, _) = c.api(0).get("/api/v1/rooms", &u.token).await;
    assert_eq!(status.as_u16(), 200);
    let log = c.proxies[0].log_tail();
    assert!(log.contains("duplicate or misplaced node id"), "{log}");
}

/// Polls the proxy's `/readyz` until it answers `want`, within `within`.
async fn readyz_until(c: &Cluster, want: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = c.api(0).get("/readyz", "").await;
        if status.as_u16() == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status} {body}, not {want}, for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_ready_only_while_every_node_link_is_up() {
    let mut c = Cluster::start(1).await;
    // Every link is up once the cluster has started.
    let body = readyz_until(&c, 200, Duration::from_secs(1)).await;
    assert_eq!(
        body,
        json!({"status": "ready", "role": "proxy", "nodes": 3})
    );
    c.nodes[1].kill9();
    let body = readyz_until(&c, 503, Duration::from_secs(10)).await;
    assert_eq!(
        body,
        json!({"status": "not_ready", "role": "proxy", "down": [IDS[1]]})
    );
    // Liveness is another question: the proxy itself still answers.
    let (status, _) = c.api(0).get("/healthz", "").await;
    assert_eq!(status.as_u16(), 200);
    c.nodes[1].spawn();
    readyz_until(&c, 200, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_drops_only_its_clients_who_resume_through_the_other() {
    let mut c = Cluster::start(2).await;
    let api = c.api(1);
    let mut pairs = Vec::new();
    for _ in 0..4 {
        let (a, b) = (
            api.signup(&uname("pa")).await,
            api.signup(&uname("pb")).await,
        );
        let room = api.direct_room(&a.token, &b.id).await["id"]
            .as_str()
            .expect("id")
            .to_string();
        pairs.push((a, b, room));
    }
    let stop = Instant::now() + Duration::from_secs(4);
    // A on proxy 0 (to be killed), B on proxy 1; both send.
    let mut a_tasks = Vec::new();
    let mut b_tasks = Vec::new();
    for (i, (a, b, room)) in pairs.iter().enumerate() {
        let wa = Ws::connect_auth(c.proxies[0].addr, &a.token).await;
        let wb = Ws::connect_auth(c.proxies[1].addr, &b.token).await;
        b_tasks.push(tokio::spawn(send_loop(
            wb,
            room.clone(),
            format!("b{i}"),
            stop,
        )));
        let (room, token, other) = (room.clone(), a.token.clone(), c.proxies[1].addr);
        a_tasks.push(tokio::spawn(async move {
            // A's view of the room: seq → client_id, from messages and acks.
            let mut view: BTreeMap<u64, String> = BTreeMap::new();
            let mut acked = Vec::new();
            let mut ws = wa;
            let mut n = 0;
            let mut unacked: Option<String> = None;
            let mut reconnected = false;
            while Instant::now() < stop {
                let id = unacked.clone().unwrap_or_else(|| {
                    n += 1;
                    format!("a{i}-{n}")
                });
                ws.send_msg(&room, &id, &format!("from a {n}")).await;
                unacked = Some(id.clone());
                loop {
                    let v = ws.recv(Duration::from_secs(10)).await.expect("a frame");
                    if is_end(&v) {
                        // The proxy died: reconnect through the other one and
                        // resume from the last seq seen.
                        assert!(!reconnected, "only one proxy dies");
                        reconnected = true;
                        let last = view.keys().next_back().copied().unwrap_or(0);
                        ws = Ws::connect(other).await;
                        ws.auth(&token, json!({ room.clone(): last })).await;
                        break;
                    }
                    if v["type"] == "message" {
                        let seq = v["seq"].as_u64().expect("seq");
                        let prev =
                            view.insert(seq, v["client_id"].as_str().unwrap_or("").to_string());
                        assert!(prev.is_none(), "a{i}: seq {seq} twice");
                    }
                    if v["type"] == "ack" && v["client_id"] == id.as_str() {
                        let seq = v["seq"].as_u64().expect("seq");
                        // A resent message that was committed before the
                        // crash comes back with its original seq.
                        if let Some(prev) = view.insert(seq, id.clone()) {
                            assert_eq!(prev, id, "a{i}: seq {seq} is another message");
                        }
                        acked.push((id.clone(), seq));
                        unacked = None;
                        break;
                    }
                    assert!(v["type"] != "error", "a{i}: {v}");
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let mut seen = Seen::default();
            collect(&mut ws, &mut seen, Duration::from_millis(1000)).await;
            for (seq, id) in seen.0.remove(&room).unwrap_or_default() {
                assert!(view.insert(seq, id).is_none(), "a{i}: seq {seq} twice");
            }
            assert!(reconnected, "a{i} was on the killed proxy");
            (view, acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.proxies[0].kill9();
    for (i, (t, tb)) in a_tasks.into_iter().zip(b_tasks).enumerate() {
        let (a_view, a_acked) = t.await.expect("a task");
        let (mut wb, b_out) = tb.await.expect("b task");
        assert!(
            b_out.iter().all(|(_, r, _)| r.is_ok()),
            "b{i} on the live proxy never failed"
        );
        let b_acked: Vec<(String, u64)> = b_out
            .iter()
            .filter_map(|(id, r, _)| r.as_ref().ok().map(|s| (id.clone(), *s)))
            .collect();
        let (a, _, room) = &pairs[i];
        let history = c.api(1).history_all(&a.token, room).await;
        let all_acked: Vec<(String, u64)> = a_acked.iter().chain(&b_acked).cloned().collect();
        let n = check_history(&history, &all_acked, &format!("room {i}"));
        // A saw the whole room once: its own (acks) and B's (messages).
        assert_eq!(
            a_view.keys().copied().collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "a{i} resumed without loss or duplicates"
        );
        for m in &history {
            assert_eq!(
                a_view
                    .get(&m["seq"].as_u64().unwrap_or(0))
                    .map(String::as_str),
                m["client_id"].as_str(),
                "a{i}"
            );
        }
        // B (never disconnected) saw all of A's messages once.
        let mut seen = Seen::default();
        collect(&mut wb, &mut seen, Duration::from_millis(500)).await;
        let _ = &mut seen;
    }
}

/// `confab wallet verify` on a node's data directory; its report.
fn wallet_verify(c: &Cluster, node: usize) -> Value {
    let data = c.dir.path().join(IDS[node]);
    let out = confab_command(&["wallet", "verify", "--data-dir"], c.dir.path())
        .arg(&data)
        .output()
        .expect("run confab wallet verify");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "wallet verify on {}: {report}\n{}",
        IDS[node],
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["breaches"], json!([]), "{}", IDS[node]);
    report
}

async fn balance(api: Api, u: &User) -> u64 {
    let (status, body) = api.get("/api/v1/wallet", &u.token).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    body["balance"].as_u64().unwrap_or(0)
}

async fn payments_in(api: Api, u: &User, room: &str) -> Vec<Value> {
    let (status, body) = api
        .get(
            &format!("/api/v1/rooms/{room}/messages?limit=200"),
            &u.token,
        )
        .await;
    if status.as_u16() != 200 {
        return Vec::new();
    }
    body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["kind"] == "payment")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// A transfer, retried with its idempotency key (as a client would) while
/// the answer is a retryable 503: the status and body of the last answer.
async fn pay(api: Api, from: &User, body: &Value) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = api
            .post("/api/v1/wallet/transfers", &from.token, body)
            .await;
        if status.as_u16() != 503 || Instant::now() > deadline {
            return (status.as_u16(), v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_moves_once_across_nodes_also_while_one_is_killed() {
    const BONUS: u64 = 10_000;
    let mut c = Cluster::start_with(2, "[wallet]\nsignup_bonus = 10000\n").await;
    let api = c.api(0);
    let mut users: Vec<User> = Vec::new();
    for i in 0..52 {
        users.push(c.api(i % 2).signup(&uname("wl")).await);
    }
    // The bonus is credited in the signup's own transaction.
    for u in &users[..3] {
        assert_eq!(balance(c.api(1), u).await, BONUS);
    }
    let (a, b) = (users[0].clone(), users[1].clone());
    let mut wb = Ws::connect_auth(c.proxies[1].addr, &b.token).await;
    let req =
        json!({"to_user_id": b.id, "amount": 2500, "idempotency_key": cid("pay"), "note": "lunch"});
    let (status, t1) = api.post("/api/v1/wallet/transfers", &a.token, &req).await;
    assert_eq!(status.as_u16(), 201, "{t1}");
    // A retry with the same key through the other proxy is the same
    // transfer, not a second one.
    let (status, again) = c
        .api(1)
        .post("/api/v1/wallet/transfers", &a.token, &req)
        .await;
    assert_eq!(status.as_u16(), 200, "{again}");
    assert_eq!(again["id"], t1["id"]);
    assert_eq!(balance(api, &a).await, BONUS - 2500);
    assert_eq!(balance(api, &b).await, BONUS + 2500);
    // The payment message is in the same transaction: b sees it at once.
    let live = wb
        .expect("the payment message", |v| {
            v["type"] == "message" && v["kind"] == "payment"
        })
        .await;
    assert_eq!(live["from"], a.id.as_str());
    let room = live["room"].as_str().expect("room").to_string();
    let pays = payments_in(api, &a, &room).await;
    assert_eq!(pays.len(), 1, "{pays:?}");
    assert_eq!(
        pays[0]["client_id"],
        format!("pay-{}", t1["id"].as_str().unwrap_or("")).as_str()
    );
    assert_eq!(pays[0]["payment"]["transfer"], t1["id"]);

    // Scheduled transfers due in 2.5 s, made through both proxies; the node
    // that serves the wallet (and so scheduled them) is killed before they
    // are due: the others run each exactly once.
    let due = confab::store::now_ms() + 2500;
    let mut scheduled = Vec::new();
    for i in 0..10 {
        let (from, to) = (&users[10 + i], &users[20 + i]);
        let body = json!({"to_user_id": to.id, "amount": 100, "idempotency_key": cid("s"), "execute_at": due});
        let (status, t) = pay(c.api(i % 2), from, &body).await;
        assert_eq!(status, 201, "{t}");
        assert_eq!(t["state"], "scheduled", "{t}");
        scheduled.push((from.clone(), t["id"].as_str().expect("id").to_string()));
    }

    // 50 clients (all but a and b) pay each other at once through both proxies for 4 s; a
    // node is killed after 1.5 s. Every transfer answered 201/200 happened
    // once; a 503 is retried with the same key.
    let wallet_node = node_index(c.ring.wallet_owner());
    let stop = Instant::now() + Duration::from_secs(4);
    let mut clients = Vec::new();
    for i in 2..52 {
        let (me, peers, api) = (users[i].clone(), users.clone(), c.api(i % 2));
        clients.push(tokio::spawn(async move {
            let mut done: Vec<(String, Value)> = Vec::new();
            let mut n = 0u64;
            while Instant::now() < stop {
                n += 1;
                let to = &peers[2 + ((i as u64 * 7 + n * 13) % 50) as usize];
                if to.id == me.id {
                    continue;
                }
                let key = format!("k-{}-{n}", me.id);
                let body =
                    json!({"to_user_id": to.id, "amount": 1 + n % 50, "idempotency_key": key});
                let (status, t) = pay(api, &me, &body).await;
                assert!(status == 201 || status == 409, "{status} {t}");
                if status == 201 {
                    done.push((key, body));
                }
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.nodes[wallet_node].kill9();
    let mut made = Vec::new();
    for t in clients {
        made.extend(t.await.expect("client"));
    }
    assert!(made.len() > 100, "transfers went on: {}", made.len());
    // Each one is stored once: its key answers 200 with the same transfer.
    for (key, body) in made.iter().step_by(7) {
        let from = users
            .iter()
            .find(|u| key.starts_with(&format!("k-{}-", u.id)))
            .expect("payer");
        let (status, t) = pay(c.api(0), from, body).await;
        assert_eq!(status, 200, "{key}: {t}");
    }
    // The scheduled ones ran, each once, on the surviving nodes.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (from, id) in &scheduled {
        loop {
            let (status, t) = api
                .get(&format!("/api/v1/wallet/transfers/{id}"), &from.token)
                .await;
            assert_eq!(status.as_u16(), 200, "{t}");
            if t["state"] == "executed" {
                break;
            }
            assert!(Instant::now() < deadline, "{id} ran: {t}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The chat's node killed: a transfer and its message still go through.
    let chat_node = c.room_node(&room);
    if chat_node != wallet_node {
        c.nodes[chat_node].kill9();
    }
    let req2 = json!({"to_user_id": b.id, "amount": 1000, "idempotency_key": cid("pay")});
    let (status, t2) = pay(api, &a, &req2).await;
    assert_eq!(status, 201, "{t2}");
    let pays = payments_in(api, &a, &room).await;
    assert_eq!(pays.len(), 2, "{pays:?}");
    assert_eq!(
        pays[1]["client_id"],
        format!("pay-{}", t2["id"].as_str().unwrap_or("")).as_str()
    );
    // Nothing was created or lost: the balances add up to the bonuses.
    let mut total = 0;
    for u in &users {
        total += balance(api, u).await;
    }
    assert_eq!(total, 52 * BONUS, "money is conserved");
    // The one ledger verifies (asked of a node that is up).
    c.nodes[wallet_node].spawn();
    c.wait_links(0, 2 + usize::from(chat_node == wallet_node))
        .await;
    let report = wallet_verify(&c, wallet_node);
    assert_eq!(
        report["total_balances"].as_u64(),
        Some(52 * BONUS),
        "{report}"
    );
    assert_eq!(report["issued"].as_u64(), Some(52 * BONUS), "{report}");
}
