//! The e-wallet over HTTP and WebSocket: bad input moves no money,
//! idempotency keys charge once, concurrent transfers and a SIGKILL in the
//! middle keep the ledger verified, scheduled transfers run exactly once
//! (also when due while the server was down), cancelled ones never, recurring
//! ones once per period across restarts, and payments show up in the chat.
//! Hardening: scheduled transfers are limited per sender and invisible to
//! the recipient until they run, transfer ids are not sequential and tell a
//! stranger nothing, and a late retry of a scheduled transfer answers the
//! original.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const BONUS: u64 = 100_000;

fn start() -> Server {
    Server::start(&[&format!("signup_bonus={BONUS}")])
}

async fn balance(api: &Api, u: &User) -> u64 {
    let (status, body) = api.get("/api/v1/wallet", &u.token).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["currency"], "KRW");
    body["balance"].as_u64().expect("balance")
}

async fn pay(api: &Api, from: &User, body: Value) -> (hyper::StatusCode, Value) {
    api.post("/api/v1/wallet/transfers", &from.token, &body)
        .await
}

/// `confab wallet verify` on the server's data directory (through the admin
/// socket while it runs, directly when it does not).
fn verify(srv: &Server) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["wallet", "verify", "--data-dir"])
        .arg(srv.data_dir())
        .env_remove("CONFAB_DATA_DIR")
        .output()
        .expect("run confab wallet verify");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "wallet verify failed: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["breaches"], json!([]));
    report
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Status and exact body bytes of a request: what tells two answers apart.
async fn answer(api: &Api, method: hyper::Method, path: &str, u: &User) -> (u16, Vec<u8>) {
    let r = api.raw(method, path, &u.token, None, &[]).await;
    (r.status.as_u16(), r.body.to_vec())
}

/// A transfer id nobody has (ids are 64-bit: a collision is not a concern).
fn made_up_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn history_ids(api: &Api, u: &User) -> Vec<String> {
    let (status, hist) = api.get("/api/v1/wallet/transactions", &u.token).await;
    assert_eq!(status.as_u16(), 200, "{hist}");
    hist["transactions"]
        .as_array()
        .expect("transactions")
        .iter()
        .map(|t| t["id"].as_str().expect("id").to_string())
        .collect()
}

async fn state_of(api: &Api, u: &User, id: &str) -> String {
    let (status, body) = api
        .get(&format!("/api/v1/wallet/transfers/{id}"), &u.token)
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    body["state"].as_str().unwrap_or("").to_string()
}

async fn wait_state(api: &Api, u: &User, id: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = state_of(api, u, id).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "transfer {id} is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_clearly_and_move_no_money() {
    let srv = start();
    let api = srv.api();
    let a = api.new_user("wba").await;
    let b = api.new_user("wbb").await;
    let now = now_secs() as i64 * 1000;
    let base = |extra: Value| {
        let mut body = json!({"to_user_id": b.id, "amount": 1000, "idempotency_key": cid("w")});
        for (k, v) in extra.as_object().expect("object") {
            if v.is_null() {
                body.as_object_mut().expect("object").remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        body
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"amount": 0}), 400, "invalid_amount"),
        (json!({"amount": -5}), 400, "invalid_amount"),
        (json!({"amount": 10.5}), 400, "invalid_amount"),
        (json!({"amount": "1000"}), 400, "invalid_amount"),
        (json!({"amount": 1e30}), 400, "invalid_amount"),
        (json!({"amount": u64::MAX}), 400, "invalid_amount"),
        (
            json!({"amount": 1_000_000_000_000_001u64}),
            400,
            "invalid_amount",
        ),
        (json!({"amount": null}), 400, "invalid_amount"),
        (
            json!({"to_user_id": "00000000000000ff"}),
            404,
            "user_not_found",
        ),
        (json!({"to_user_id": "nobody"}), 400, "bad_id"),
        (json!({"to_user_id": a.id}), 400, "invalid_recipient"),
        (json!({"to_user_id": null}), 400, "invalid_recipient"),
        (json!({"currency": "USD"}), 400, "invalid_currency"),
        (
            json!({"idempotency_key": null}),
            400,
            "invalid_idempotency_key",
        ),
        (
            json!({"idempotency_key": ""}),
            400,
            "invalid_idempotency_key",
        ),
        (
            json!({"execute_at": now - 60_000}),
            400,
            "invalid_execute_at",
        ),
        (json!({"execute_at": "tomorrow"}), 400, "invalid_execute_at"),
        (json!({"repeat": "weekly"}), 400, "invalid_execute_at"),
        (
            json!({"repeat": "daily", "execute_at": now + 60_000}),
            400,
            "invalid_repeat",
        ),
        (json!({"amount": BONUS + 1}), 409, "insufficient_funds"),
    ];
    for (extra, status, code) in cases {
        let got = pay(&api, &a, base(extra.clone())).await;
        assert_err(&got, status, code);
    }
    let r = api
        .raw(
            hyper::Method::POST,
            "/api/v1/wallet/transfers",
            &a.token,
            Some(b"{not json".to_vec()),
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(r.status.as_u16(), 400);
    // The same key with other fields is a conflict; nothing moved by it.
    let key = cid("same");
    let first = pay(
        &api,
        &a,
        json!({"to_user_id": b.id, "amount": 700, "idempotency_key": key}),
    )
    .await;
    assert_eq!(first.0.as_u16(), 201, "{}", first.1);
    let again = pay(
        &api,
        &a,
        json!({"to_user_id": b.id, "amount": 700, "idempotency_key": key}),
    )
    .await;
    assert_eq!(again.0.as_u16(), 200, "a replay answers the original");
    assert_eq!(again.1["id"], first.1["id"]);
    let other = pay(
        &api,
        &a,
        json!({"to_user_id": b.id, "amount": 701, "idempotency_key": key}),
    )
    .await;
    assert_err(&other, 409, "idempotency_conflict");
    // Exactly one transfer of 700 happened.
    assert_eq!(balance(&api, &a).await, BONUS - 700);
    assert_eq!(balance(&api, &b).await, BONUS + 700);
    let (_, hist) = api.get("/api/v1/wallet/transactions", &a.token).await;
    let list = hist["transactions"].as_array().expect("transactions");
    assert_eq!(list.len(), 2, "the bonus credit and one transfer: {hist}");
    assert_eq!(list[0]["amount"], 700);
    assert_eq!(list[0]["direction"], "out");
    assert_eq!(list[0]["counterparty"]["id"], b.id.as_str());
    assert_eq!(list[0]["state"], "executed");
    // Cancelling: unknown, someone else's, or an executed transfer.
    let id = first.1["id"].as_str().expect("id");
    assert_err(
        &api.delete(&format!("/api/v1/wallet/transfers/{id}"), &a.token)
            .await,
        409,
        "not_cancellable",
    );
    assert_err(
        &api.delete(&format!("/api/v1/wallet/transfers/{id}"), &b.token)
            .await,
        403,
        "forbidden",
    );
    assert_err(
        &api.delete("/api/v1/wallet/transfers/00000000000fffff", &a.token)
            .await,
        404,
        "transfer_not_found",
    );
    let report = verify(&srv);
    assert_eq!(report["issued"], 2 * BONUS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_appear_live_in_the_direct_chat_on_both_sides() {
    let srv = start();
    let api = srv.api();
    let a = api.new_user("wpa").await;
    let b = api.new_user("wpb").await;
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    let (status, t) = pay(&api, &a, json!({"to_user_id": b.id, "amount": 12_000, "idempotency_key": cid("p"), "note": "점심값"})).await;
    assert_eq!(status.as_u16(), 201, "{t}");
    for ws in [&mut wa, &mut wb] {
        let room = ws.expect_type("room").await;
        assert_eq!(
            room["room"]["kind"], "direct",
            "the pair's chat is created for the payment"
        );
        let m = ws.expect_type("message").await;
        assert_eq!(m["kind"], "payment");
        assert_eq!(m["from"], a.id.as_str());
        assert_eq!(m["payment"]["amount"], 12_000);
        assert_eq!(m["payment"]["currency"], "KRW");
        assert_eq!(m["payment"]["note"], "점심값");
        assert_eq!(m["payment"]["to"], b.id.as_str());
        assert_eq!(m["payment"]["transfer"], t["id"]);
        assert_eq!(m["text"], "💸 12,000 KRW · 점심값");
        let w = ws.expect_type("wallet").await;
        assert_eq!(w["transfer"]["id"], t["id"]);
    }
    // Also in the history, after a chat already exists.
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    let (status, _) = pay(
        &api,
        &b,
        json!({"to_user_id": a.id, "amount": 500, "idempotency_key": cid("p")}),
    )
    .await;
    assert_eq!(status.as_u16(), 201);
    let history = api.history_all(&a.token, &room).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["kind"], "payment");
    assert_eq!(history[1]["from"], b.id.as_str());
    assert_eq!(history[1]["payment"]["amount"], 500);
    let m = wa
        .expect("the second payment", |v| is_type(v, "message"))
        .await;
    assert_eq!(m["payment"]["amount"], 500);
    assert_eq!(balance(&api, &a).await, BONUS - 12_000 + 500);
    let metrics = api.raw(hyper::Method::GET, "/metrics", "", None, &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics.contains("confab_wallet_transfers_total{outcome=\"executed\"} 2"),
        "{metrics}"
    );
}

/// 50 clients send random transfers for `secs`, each retried with its key;
/// returns key → transfer id for every transfer answered 200/201.
async fn random_load(api: Api, users: Arc<Vec<User>>, secs: u64) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..users.len() {
        let users = users.clone();

        tasks.push(tokio::spawn(async move {
            let mut done = HashMap::new();
            let mut n = 0u32;
            while Instant::now() < deadline {
                n += 1;
                let to = (i + 1 + rand::random_range(0..users.len() - 1)) % users.len();
                let key = format!("{}-{n}", users[i].username);
                let body = json!({"to_user_id": users[to].id, "amount": rand::random_range(1..4000u64), "idempotency_key": key});
                // Send, and sometimes send the same request again at once (a retry).
                let tries = if n.is_multiple_of(3) { 2 } else { 1 };
                for _ in 0..tries {
                    let bytes = serde_json::to_vec(&body).expect("json");
                    match try_http(api.0, hyper::Method::POST, "/api/v1/wallet/transfers", &users[i].token, Some(bytes), &[]).await {
                        Ok(r) if r.status.is_success() => {
                            let id = r.json["id"].as_str().unwrap_or("").to_string();
                            let prev = done.insert(key.clone(), id.clone());
                            assert!(prev.is_none() || prev == Some(id), "one key, two transfers");
                        }
                        Ok(r) => assert!(
                            r.status.as_u16() == 409 && r.json["error"]["code"] == "insufficient_funds",
                            "unexpected answer {} {}",
                            r.status,
                            r.json
                        ),
                        Err(_) => return done, // the server went away
                    }
                }
            }
            done
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

async fn users(api: &Api, n: usize, prefix: &str) -> Arc<Vec<User>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(api.new_user(prefix).await);
    }
    Arc::new(out)
}

async fn total(api: &Api, users: &[User]) -> u64 {
    let mut sum = 0;
    for u in users {
        sum += balance(api, u).await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_keep_the_ledger_balanced() {
    let srv = start();
    let api = srv.api();
    let users = users(&api, 50, "wc").await;
    let done = random_load(api, users.clone(), 3).await;
    assert!(done.len() > 100, "only {} transfers", done.len());
    assert_eq!(
        total(&api, &users).await,
        50 * BONUS,
        "money was created or destroyed"
    );
    let report = verify(&srv);
    assert_eq!(report["issued"], 50 * BONUS);
    // Every accepted key is one executed transfer.
    assert_eq!(
        report["transfers"].as_u64(),
        Some(50 + done.len() as u64),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_transfers_applies_none_twice() {
    let mut srv = start();
    let api = srv.api();
    let users = users(&api, 50, "wk").await;
    let load = tokio::spawn(random_load(api, users.clone(), 30));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    srv.kill9();
    let before = load.await.expect("load");
    srv.restart();
    let api = srv.api();
    verify(&srv);
    assert_eq!(total(&api, &users).await, 50 * BONUS);
    // Retrying every acknowledged key after the crash finds the same transfer.
    for (key, id) in &before {
        let owner = users
            .iter()
            .find(|u| key.starts_with(&format!("{}-", u.username)))
            .expect("owner");
        let (status, t) = api
            .get(&format!("/api/v1/wallet/transfers/{id}"), &owner.token)
            .await;
        assert_eq!(
            status.as_u16(),
            200,
            "acknowledged transfer {id} ({key}) was lost: {t}"
        );
        assert_eq!(t["state"], "executed");
        // The same key again: the same transfer, not a second one.
        let (status, again) = pay(
            &api,
            owner,
            json!({"to_user_id": t["counterparty"]["id"], "amount": t["amount"], "idempotency_key": key}),
        )
        .await;
        assert_eq!(status.as_u16(), 200, "{again}");
        assert_eq!(again["id"], id.as_str());
    }
    let report = verify(&srv);
    assert!(
        report["transfers"].as_u64() >= Some(50 + before.len() as u64),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_transfers_run_once_even_when_due_during_downtime() {
    let mut srv = start();
    let api = srv.api();
    let a = api.new_user("wsa").await;
    let b = api.new_user("wsb").await;
    let now = now_secs() as i64 * 1000;
    // Due in 3 s; the server is stopped before that and started after.
    let (status, late) = pay(&api, &a, json!({"to_user_id": b.id, "amount": 1000, "idempotency_key": cid("s"), "execute_at": now + 3000})).await;
    assert_eq!(status.as_u16(), 201, "{late}");
    assert_eq!(late["state"], "scheduled");
    // Another, cancelled before it is due.
    let (_, cancelled) = pay(&api, &a, json!({"to_user_id": b.id, "amount": 2000, "idempotency_key": cid("s"), "execute_at": now + 2500})).await;
    let cid_ = cancelled["id"].as_str().expect("id").to_string();
    let (status, c) = api
        .delete(&format!("/api/v1/wallet/transfers/{cid_}"), &a.token)
        .await;
    assert_eq!(status.as_u16(), 200);
    assert_eq!(c["state"], "cancelled");
    // Cancelling twice is harmless.
    assert_eq!(
        api.delete(&format!("/api/v1/wallet/transfers/{cid_}"), &a.token)
            .await
            .0
            .as_u16(),
        200
    );
    // A third, insufficient at its time → failed, and the sender is told.
    let (_, poor) = pay(&api, &a, json!({"to_user_id": b.id, "amount": 5 * BONUS, "idempotency_key": cid("s"), "execute_at": now + 2000})).await;
    srv.stop();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    srv.restart();
    let api = srv.api();
    let id = late["id"].as_str().expect("id");
    wait_state(&api, &a, id, "executed", Duration::from_secs(10)).await;
    wait_state(
        &api,
        &a,
        poor["id"].as_str().expect("id"),
        "failed",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(state_of(&api, &a, &cid_).await, "cancelled");
    assert_eq!(
        balance(&api, &b).await,
        BONUS + 1000,
        "ran exactly once, the cancelled one never"
    );
    assert_eq!(balance(&api, &a).await, BONUS - 1000);
    let (_, t) = api
        .get(&format!("/api/v1/wallet/transfers/{id}"), &b.token)
        .await;
    assert_eq!(t["direction"], "in");
    // Restarting again runs nothing more.
    srv.stop();
    srv.restart();
    let api = srv.api();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(balance(&api, &b).await, BONUS + 1000);
    // A scheduled transfer that comes due while running, with the sender told live.
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let now = now_secs() as i64 * 1000;
    let (_, soon) = pay(&api, &a, json!({"to_user_id": b.id, "amount": 10, "idempotency_key": cid("s"), "execute_at": now + 1500})).await;
    let w = wa
        .expect("the executed scheduled transfer", |v| {
            is_type(v, "wallet") && v["transfer"]["state"] == "executed"
        })
        .await;
    assert_eq!(w["transfer"]["id"], soon["id"]);
    verify(&srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_transfers_run_once_per_period_across_restarts() {
    let mut srv = start();
    let api = srv.api();
    let a = api.new_user("wra").await;
    let b = api.new_user("wrb").await;
    let now = now_secs() as i64 * 1000;
    let (status, rec) = pay(&api, &a, json!({"to_user_id": b.id, "amount": 100, "idempotency_key": cid("r"), "execute_at": now + 1000, "repeat": "weekly", "note": "용돈"})).await;
    assert_eq!(status.as_u16(), 201, "{rec}");
    assert_eq!(rec["repeat"], "weekly");
    let id = rec["id"].as_str().expect("id").to_string();
    // Run 0 at its time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while balance(&api, &b).await != BONUS + 100 {
        assert!(Instant::now() < deadline, "first run did not happen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A restart does not run it again within the period.
    srv.stop();
    srv.restart();
    let api = srv.api();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(balance(&api, &b).await, BONUS + 100);
    // The server comes back 15 days later (scheduler clock shifted): runs 1
    // and 2 are made up, once each; another restart adds nothing.
    srv.stop();
    srv.restart_with(&[
        &format!("signup_bonus={BONUS}"),
        "scheduler_clock_offset_ms=1296000000",
    ]);
    let api = srv.api();
    let deadline = Instant::now() + Duration::from_secs(10);
    while balance(&api, &b).await != BONUS + 300 {
        assert!(Instant::now() < deadline, "missed runs were not made up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.stop();
    srv.restart();
    let api = srv.api();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(balance(&api, &b).await, BONUS + 300);
    let (_, hist) = api.get("/api/v1/wallet/transactions", &b.token).await;
    let runs: Vec<&Value> = hist["transactions"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|t| t["recurring"] == id.as_str())
        .collect();
    assert_eq!(runs.len(), 3, "{hist}");
    assert!(
        runs.iter()
            .all(|r| r["state"] == "executed" && r["note"] == "용돈")
    );
    // Cancelling the recurring transfer stops future runs.
    let (status, c) = api
        .delete(&format!("/api/v1/wallet/transfers/{id}"), &a.token)
        .await;
    assert_eq!(status.as_u16(), 200, "{c}");
    assert_eq!(c["state"], "cancelled");
    verify(&srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_transfers_are_limited_per_sender_and_spam_no_recipient() {
    // No signup bonus: the sender has nothing, which used to be no obstacle.
    let srv = Server::start(&["max_scheduled_transfers=3"]);
    let api = srv.api();
    let a = api.new_user("wla").await;
    let b = api.new_user("wlb").await;
    let c = api.new_user("wlc").await;
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    let now = now_ms();
    let far = now + 30 * 86_400_000;
    let most = 1_000_000_000_000_000u64;
    let to_b = |extra: Value| {
        let mut body = json!({"to_user_id": b.id, "amount": most, "idempotency_key": cid("lim")});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    // Three fit: one due in 1.5 s (it will fail), a recurring one, a far one.
    let bodies = [
        to_b(json!({"execute_at": now + 1500})),
        to_b(json!({"execute_at": far, "repeat": "weekly"})),
        to_b(json!({"execute_at": far})),
    ];
    let mut ids = Vec::new();
    for body in &bodies {
        let (status, t) = pay(&api, &a, body.clone()).await;
        assert_eq!(status.as_u16(), 201, "{t}");
        assert_eq!(t["state"], "scheduled");
        ids.push(t["id"].as_str().expect("id").to_string());
    }
    // The fourth is refused; nothing is stored, so its key stays usable.
    let fourth = to_b(json!({"execute_at": far}));
    assert_err(
        &pay(&api, &a, fourth.clone()).await,
        409,
        "too_many_scheduled",
    );
    // An immediate transfer is not limited by it (here: no money).
    assert_err(
        &pay(&api, &a, to_b(json!({"amount": 1}))).await,
        409,
        "insufficient_funds",
    );
    // A repeated request is not a new transfer: answered as before.
    let (status, again) = pay(&api, &a, bodies[2].clone()).await;
    assert_eq!(status.as_u16(), 200, "{again}");
    assert_eq!(again["id"], ids[2].as_str());
    // Every sender has their own places.
    let (status, t) = pay(
        &api,
        &c,
        json!({"to_user_id": b.id, "amount": 1, "idempotency_key": cid("lim"), "execute_at": far}),
    )
    .await;
    assert_eq!(status.as_u16(), 201, "{t}");
    // The one that comes due fails (a has nothing): it stops counting.
    wait_state(&api, &a, &ids[0], "failed", Duration::from_secs(10)).await;
    let (status, t) = pay(&api, &a, fourth.clone()).await;
    assert_eq!(
        status.as_u16(),
        201,
        "a failed transfer frees its place: {t}"
    );
    assert_err(
        &pay(&api, &a, to_b(json!({"execute_at": far}))).await,
        409,
        "too_many_scheduled",
    );
    // Cancelling one frees its place too.
    let (status, cancelled) = api
        .delete(&format!("/api/v1/wallet/transfers/{}", ids[2]), &a.token)
        .await;
    assert_eq!(status.as_u16(), 200, "{cancelled}");
    let (status, t) = pay(&api, &a, to_b(json!({"execute_at": far}))).await;
    assert_eq!(
        status.as_u16(),
        201,
        "a cancelled transfer frees its place: {t}"
    );
    assert_err(
        &pay(&api, &a, to_b(json!({"execute_at": far}))).await,
        409,
        "too_many_scheduled",
    );
    // The recipient saw nothing of any of it: not in the history, not by
    // id, not a single frame.
    assert_eq!(history_ids(&api, &b).await, Vec::<String>::new());
    for id in &ids {
        assert_err(
            &api.get(&format!("/api/v1/wallet/transfers/{id}"), &b.token)
                .await,
            404,
            "transfer_not_found",
        );
    }
    let frame = wb
        .recv_until(
            |v| is_type(v, "wallet") || is_type(v, "message"),
            Duration::from_millis(300),
        )
        .await;
    assert!(frame.is_none(), "the recipient was told: {frame:?}");
    let report = verify(&srv);
    assert_eq!(report["scheduled"], 4, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipient_sees_a_scheduled_transfer_only_once_it_ran() {
    let srv = start();
    let api = srv.api();
    let a = api.new_user("wva").await;
    let b = api.new_user("wvb").await;
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    let at = now_ms() + 1500;
    let (status, t) = pay(
        &api,
        &a,
        json!({"to_user_id": b.id, "amount": 1234, "idempotency_key": cid("v"), "execute_at": at}),
    )
    .await;
    assert_eq!(status.as_u16(), 201, "{t}");
    let id = t["id"].as_str().expect("id").to_string();
    // Before it runs: the sender has it, the recipient knows nothing — GET
    // and DELETE answer byte for byte as for an id that does not exist.
    assert!(history_ids(&api, &a).await.contains(&id));
    assert!(!history_ids(&api, &b).await.contains(&id));
    let path = format!("/api/v1/wallet/transfers/{id}");
    let missing = format!("/api/v1/wallet/transfers/{}", made_up_id());
    for method in [hyper::Method::GET, hyper::Method::DELETE] {
        let got = answer(&api, method.clone(), &path, &b).await;
        assert_eq!(got.0, 404, "{}", String::from_utf8_lossy(&got.1));
        assert_eq!(got, answer(&api, method, &missing, &b).await);
    }
    assert_eq!(state_of(&api, &a, &id).await, "scheduled");
    // It runs: the first wallet frame the recipient ever gets is the
    // executed transfer, with its payment message.
    let w = wb
        .expect("the recipient's first wallet frame", |v| {
            is_type(v, "wallet")
        })
        .await;
    assert_eq!(w["transfer"]["id"], id.as_str());
    assert_eq!(w["transfer"]["state"], "executed");
    assert_eq!(w["transfer"]["direction"], "in");
    assert!(now_ms() >= at, "it ran at its time, not before");
    // From now on it is the recipient's to see (not to cancel).
    assert!(history_ids(&api, &b).await.contains(&id));
    let (status, seen) = api.get(&path, &b.token).await;
    assert_eq!(status.as_u16(), 200, "{seen}");
    assert_eq!(seen["state"], "executed");
    assert_eq!(seen["amount"], 1234);
    assert_err(&api.delete(&path, &b.token).await, 403, "forbidden");
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    let pays: Vec<Value> = api
        .history_all(&b.token, &room)
        .await
        .into_iter()
        .filter(|m| m["kind"] == "payment")
        .collect();
    assert_eq!(pays.len(), 1, "{pays:?}");
    assert_eq!(pays[0]["payment"]["transfer"], id.as_str());
    assert_eq!(balance(&api, &b).await, BONUS + 1234);
    verify(&srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_ids_are_not_sequential_and_tell_a_stranger_nothing() {
    let srv = start();
    let api = srv.api();
    let a = api.new_user("wia").await;
    let b = api.new_user("wib").await;
    let stranger = api.new_user("wis").await;
    let mut ids = Vec::new();
    for amount in [10, 20] {
        let (status, t) = pay(
            &api,
            &a,
            json!({"to_user_id": b.id, "amount": amount, "idempotency_key": cid("i")}),
        )
        .await;
        assert_eq!(status.as_u16(), 201, "{t}");
        ids.push(t["id"].as_str().expect("id").to_string());
    }
    // Stored one after the other, shown far apart (the signup credits too).
    let mut all = history_ids(&api, &a).await;
    all.extend(history_ids(&api, &b).await);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "two credits and two transfers: {all:?}");
    let numbers: Vec<u64> = all
        .iter()
        .map(|id| {
            assert_eq!(id.len(), 16, "{id}");
            u64::from_str_radix(id, 16).expect("16 hex digits")
        })
        .collect();
    for (i, x) in numbers.iter().enumerate() {
        for y in &numbers[i + 1..] {
            assert!(x.abs_diff(*y) > 1_000_000, "guessable ids: {all:?}");
        }
    }
    // Pages follow the public ids back (newest first).
    let mut paged = Vec::new();
    let mut path = "/api/v1/wallet/transactions?limit=1".to_string();
    loop {
        let (status, page) = api.get(&path, &a.token).await;
        assert_eq!(status.as_u16(), 200, "{page}");
        for t in page["transactions"].as_array().expect("list") {
            paged.push(t["id"].as_str().expect("id").to_string());
        }
        match page["next_before"].as_str() {
            Some(next) => path = format!("/api/v1/wallet/transactions?limit=1&before={next}"),
            None => break,
        }
    }
    assert_eq!(paged.len(), 3, "{paged:?}");
    assert_eq!(paged[..2], [ids[1].clone(), ids[0].clone()]);
    // Someone else's id is no cursor (it would place that transfer): the
    // same 400 as for an id that does not exist.
    let mut cursors = Vec::new();
    for before in [ids[0].clone(), made_up_id()] {
        let path = format!("/api/v1/wallet/transactions?before={before}");
        cursors.push(answer(&api, hyper::Method::GET, &path, &stranger).await);
    }
    assert_eq!(
        cursors[0].0,
        400,
        "{}",
        String::from_utf8_lossy(&cursors[0].1)
    );
    assert_eq!(cursors[0], cursors[1]);
    // The payment message names the same id, and nothing else.
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    let history = api.history_all(&a.token, &room).await;
    assert_eq!(history.len(), 2);
    for (m, id) in history.iter().zip(&ids) {
        assert_eq!(m["payment"]["transfer"], id.as_str());
        assert_eq!(m["client_id"], format!("pay-{id}").as_str());
    }
    // A stranger's GET and DELETE of someone else's transfer answer exactly
    // as for an id that does not exist.
    let missing = format!("/api/v1/wallet/transfers/{}", made_up_id());
    for method in [hyper::Method::GET, hyper::Method::DELETE] {
        let nobody = answer(&api, method.clone(), &missing, &stranger).await;
        assert_eq!(nobody.0, 404);
        for id in &ids {
            let path = format!("/api/v1/wallet/transfers/{id}");
            assert_eq!(answer(&api, method.clone(), &path, &stranger).await, nobody);
        }
    }
    // The parties themselves still find them.
    assert_eq!(state_of(&api, &a, &ids[0]).await, "executed");
    assert_eq!(state_of(&api, &b, &ids[1]).await, "executed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_transfer_repeated_after_its_time_answers_the_original() {
    let srv = start();
    let api = srv.api();
    let a = api.new_user("wpa").await;
    let b = api.new_user("wpb").await;
    let at = now_ms() + 1000;
    let body = json!({"to_user_id": b.id, "amount": 300, "idempotency_key": cid("late"), "execute_at": at});
    let (status, t) = pay(&api, &a, body.clone()).await;
    assert_eq!(status.as_u16(), 201, "{t}");
    let id = t["id"].as_str().expect("id").to_string();
    wait_state(&api, &a, &id, "executed", Duration::from_secs(10)).await;
    // Until execute_at is well past the tolerance for clock skew (5 s)...
    let past = at + 5_000 + 500;
    tokio::time::sleep(Duration::from_millis((past - now_ms()).max(0) as u64)).await;
    // ...the same request (a client retrying after a lost answer) is the
    // original transfer, charged once.
    let (status, again) = pay(&api, &a, body.clone()).await;
    assert_eq!(status.as_u16(), 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["state"], "executed");
    // The same key with other fields is still a conflict...
    let mut other = body.clone();
    other["amount"] = json!(301);
    assert_err(&pay(&api, &a, other).await, 409, "idempotency_conflict");
    // ...and that execute_at for a new transfer is in the past.
    let mut new = body.clone();
    new["idempotency_key"] = json!(cid("late"));
    assert_err(&pay(&api, &a, new).await, 400, "invalid_execute_at");
    assert_eq!(balance(&api, &b).await, BONUS + 300);
    assert_eq!(balance(&api, &a).await, BONUS - 300);
    verify(&srv);
}
