//! The e-wallet over HTTP and WebSocket: bad input moves no money,
//! idempotency keys charge once, concurrent transfers and a SIGKILL in the
//! middle keep the ledger verified, scheduled transfers run exactly once
//! (also when due while the server was down), cancelled ones never, recurring
//! ones once per period across restarts, and payments show up in the chat.

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
