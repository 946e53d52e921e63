//! The wallet of the PostgreSQL backend against the embedded one. One script of
//! credits, transfers, idempotent replays, scheduled and recurring
//! transfers, cancels, runs of the scheduler (with catch-up and failures),
//! history pages and `verify` runs on each backend; the two transcripts
//! (answers, error codes and messages, views, payment messages, counts)
//! must be equal. Then PostgreSQL only: two nodes on one database run the
//! same due transfers and take the same idempotency keys at once.

use std::collections::HashMap;
use std::sync::Arc;

use confab::ids::{RoomId, UserId};
use confab::storage::Storage;
use confab::storage::embedded::Embedded;
use confab::storage::postgres::{PgOptions, Postgres};
use confab::wallet::{TransferView, parse_request};
use confab::writes::{GroupCommitWriter, Op, WalletOp, WalletWiring};
use serde_json::{Value, json};

use crate::pg;

const DAY: i64 = 86_400_000;

fn wiring() -> WalletWiring {
    wiring_with_bonus(0)
}

fn wiring_with_bonus(signup_bonus: u64) -> WalletWiring {
    WalletWiring {
        settings: confab::wallet::WalletSettings {
            currency: "KRW".into(),
            signup_bonus,
            max_scheduled: 3,
        },
        ..Default::default()
    }
}

/// An open store and how to close it.
pub(crate) struct Opened {
    pub(crate) s: Arc<dyn Storage>,
    join: std::thread::JoinHandle<()>,
}

impl Opened {
    pub(crate) async fn close(self) {
        let _ = self.s.submit(Op::Stop).await;
        drop(self.s);
        let join = self.join;
        tokio::task::spawn_blocking(move || join.join())
            .await
            .expect("join")
            .expect("writer ended cleanly");
    }
}

pub(crate) fn open_pg(url: &str) -> Opened {
    open_pg_with(url, wiring())
}

fn open_pg_with(url: &str, wallet: WalletWiring) -> Opened {
    let config = confab::config::Config::load(&Default::default()).expect("config");
    let (storage, join) = Postgres::open(PgOptions {
        url: url.to_string(),
        hub: Arc::new(confab::hub::Hub::default()),
        live: Default::default(),
        store: config.store.clone(),
        max_group_members: config.limits.max_group_members,
        wallet,
        transfer_ids: Default::default(),
        pool_size: 4,
    })
    .expect("open postgres");
    Opened {
        s: Arc::new(storage),
        join,
    }
}

fn open_embedded(dir: &std::path::Path) -> Opened {
    let store = confab::store::Store::open(dir).expect("open store");
    let config = confab::config::Config::load(&Default::default()).expect("config");
    let (writer, join) = GroupCommitWriter::spawn_with(
        store.clone(),
        Arc::new(confab::hub::Hub::default()),
        Default::default(),
        config.store.clone(),
        config.limits.max_group_members,
        wiring(),
    )
    .expect("writer");
    store.health.set(confab::store::db::StorageState::Ok, "");
    Opened {
        s: Arc::new(Embedded::new(store, writer)),
        join,
    }
}

pub(crate) async fn new_user(s: &dyn Storage, name: &str) -> UserId {
    s.call(|reply| Op::CreateUser {
        username: name.to_string(),
        display_name: name.to_uppercase(),
        password_hash: "x".to_string(),
        reply,
    })
    .await
    .expect("create user")
    .id
}

/// Records answers with what differs between runs taken out: user ids
/// (random) become names, transfer ids become stored ids (both backends
/// number transfers 1, 2, …), times become offsets from `base`.
struct Transcript<'a> {
    s: &'a dyn Storage,
    base: i64,
    names: HashMap<u64, String>,
    lines: Vec<String>,
}

impl Transcript<'_> {
    fn id(&self, public: &str) -> u64 {
        self.s.transfer_ids().parse(public).expect("a public id")
    }

    fn norm_view(&self, v: &TransferView) -> Value {
        json!({
            "id": self.id(&v.id),
            "direction": v.direction,
            "counterparty": v.counterparty.as_ref().map(|u| u.username.clone()),
            "amount": v.amount,
            "currency": v.currency,
            "note": v.note,
            "state": v.state,
            "execute_at_is_created_at": v.execute_at == v.created_at,
            "executed": v.executed_at.is_some(),
            "repeat": v.repeat,
            "recurring": v.recurring.as_deref().map(|r| self.id(r)),
            "failure": v.failure,
        })
    }

    fn err(e: &confab::error::ApiError) -> Value {
        json!({"status": e.status.as_u16(), "code": e.code, "message": e.message})
    }

    fn log(&mut self, what: &str, v: Value) {
        self.lines.push(format!("{what}: {v}"));
    }

    async fn credit(&mut self, user: UserId, amount: u64, key: Option<&str>) {
        let key = key.map(str::to_string);
        let r = self
            .s
            .call(|reply| {
                Op::Wallet(WalletOp::Credit {
                    user,
                    amount,
                    key,
                    reply,
                })
            })
            .await;
        let v = match r {
            Ok(b) => json!({"balance": b}),
            Err(e) => Self::err(&e),
        };
        self.log("credit", v);
    }

    async fn pay(&mut self, from: UserId, body: Value) -> Option<u64> {
        let req =
            parse_request(&body, from, "KRW", confab::store::now_ms()).expect("valid request");
        let r = self
            .s
            .call(|reply| Op::Wallet(WalletOp::Transfer { from, req, reply }))
            .await;
        let (v, id) = match r {
            Ok((view, replay)) => (
                json!({"view": self.norm_view(&view), "replay": replay}),
                Some(self.id(&view.id)),
            ),
            Err(e) => (Self::err(&e), None),
        };
        self.log("pay", v);
        id
    }

    async fn cancel(&mut self, by: UserId, id: u64) -> Option<TransferView> {
        let r = self
            .s
            .call(|reply| Op::Wallet(WalletOp::Cancel { by, id, reply }))
            .await;
        let v = match &r {
            Ok(view) => self.norm_view(view),
            Err(e) => Self::err(e),
        };
        self.log("cancel", v);
        r.ok()
    }

    async fn run_due(&mut self, now: i64) -> Option<i64> {
        let next = self
            .s
            .call(|reply| Op::Wallet(WalletOp::RunDue { now, reply }))
            .await
            .expect("run due");
        let rel = next.map(|n| n - self.base);
        self.log("run_due", json!({"next": rel}));
        rel
    }

    async fn balances(&mut self, users: &[UserId]) {
        let mut out = Vec::new();
        for &u in users {
            out.push(self.s.balance(u).await.expect("balance"));
        }
        self.log("balances", json!(out));
    }

    /// Every page of `user`'s history (`limit` a page), and the cursors.
    async fn history(&mut self, user: UserId, limit: usize) -> Vec<u64> {
        let mut before = None;
        let mut all = Vec::new();
        loop {
            let (page, next) = self
                .s
                .transactions(user, before, limit, "KRW")
                .await
                .expect("transactions");
            let views: Vec<Value> = page.iter().map(|v| self.norm_view(v)).collect();
            all.extend(page.iter().map(|v| self.id(&v.id)));
            let cursor = next.as_deref().map(|c| self.id(c));
            self.log("page", json!({"views": views, "next": cursor}));
            match cursor {
                Some(c) => before = Some(c),
                None => break,
            }
        }
        all
    }

    async fn transfer(&mut self, id: u64, viewer: UserId) {
        let v = self
            .s
            .transfer(id, viewer, "KRW")
            .await
            .expect("transfer")
            .map(|v| self.norm_view(&v));
        self.log("transfer", json!(v));
    }

    async fn messages(&mut self, a: UserId, b: UserId) {
        let room = RoomId::direct(a, b);
        let msgs = self
            .s
            .history(room, a, None, None, 100)
            .await
            .unwrap_or_default();
        let out: Vec<Value> = msgs
            .iter()
            .map(|m| {
                json!({
                    "seq": m.seq,
                    "from": self.names[&m.from.0],
                    "text": m.text,
                    "kind": m.kind,
                    "client_id_is_pay": m.client_id.starts_with("pay-"),
                    "payment": m.payment.as_ref().map(|p| json!({
                        "transfer": self.id(&p.transfer),
                        "client_id": m.client_id == format!("pay-{}", p.transfer),
                        "amount": p.amount, "to": self.names[&p.to.0], "note": p.note,
                    })),
                })
            })
            .collect();
        self.log("messages", json!(out));
    }
}

/// The script: the same on every backend; returns the transcript.
async fn script(s: &dyn Storage) -> Vec<String> {
    let base = confab::store::now_ms();
    let mut t = Transcript {
        s,
        base,
        names: HashMap::new(),
        lines: Vec::new(),
    };
    let mut ids = Vec::new();
    for name in ["ann", "bob", "cat", "dan"] {
        let id = new_user(s, name).await;
        t.names.insert(id.0, name.to_string());
        ids.push(id);
    }
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    let nobody = UserId(0x1234_5678_9abc_def0);
    t.names.insert(nobody.0, "nobody".into());

    // Credits: plain, keyed (and its replay), refused.
    t.credit(a, 10_000, None).await;
    t.credit(b, 100, None).await;
    t.credit(c, 50, Some("bonus-c")).await;
    t.credit(c, 50, Some("bonus-c")).await;
    t.credit(nobody, 5, None).await;
    t.credit(d, 0, None).await;
    t.credit(d, confab::wallet::MAX_AMOUNT, None).await;
    t.credit(d, 1, None).await;

    // Transfers now: executed, replayed, conflicting, refused.
    let to = |u: UserId| u.to_string();
    let t1 = t
        .pay(
            a,
            json!({"to_user_id": to(b), "amount": 1000, "idempotency_key": "t1", "note": "lunch"}),
        )
        .await
        .expect("t1");
    t.pay(
        a,
        json!({"to_user_id": to(b), "amount": 1000, "idempotency_key": "t1", "note": "lunch"}),
    )
    .await;
    t.pay(
        a,
        json!({"to_user_id": to(b), "amount": 999, "idempotency_key": "t1", "note": "lunch"}),
    )
    .await;
    t.pay(
        b,
        json!({"to_user_id": to(c), "amount": 5000, "idempotency_key": "t2"}),
    )
    .await;
    // The refused key is free again.
    t.pay(
        b,
        json!({"to_user_id": to(c), "amount": 50, "idempotency_key": "t2"}),
    )
    .await;
    t.pay(
        a,
        json!({"to_user_id": to(nobody), "amount": 1, "idempotency_key": "t3"}),
    )
    .await;
    t.pay(
        b,
        json!({"to_user_id": to(d), "amount": 1, "idempotency_key": "t4"}),
    )
    .await;
    t.pay(a, json!({"to_user_id": to(c), "amount": 1, "idempotency_key": "old", "execute_at": base - 60_000}))
        .await;

    // Scheduled, recurring, one that will fail, one cancelled.
    let s1 = t
        .pay(a, json!({"to_user_id": to(c), "amount": 300, "idempotency_key": "s1", "execute_at": base + 60_000}))
        .await
        .expect("s1");
    let first = base + 1_000;
    let r1 = t
        .pay(a, json!({"to_user_id": to(b), "amount": 200, "idempotency_key": "r1", "execute_at": first, "repeat": "weekly", "note": "rent"}))
        .await
        .expect("r1");
    // A replay of a scheduled one, even after its time, is a replay.
    t.pay(a, json!({"to_user_id": to(b), "amount": 200, "idempotency_key": "r1", "execute_at": first, "repeat": "weekly", "note": "rent"}))
        .await;
    let s2 = t
        .pay(b, json!({"to_user_id": to(c), "amount": 50000, "idempotency_key": "s2", "execute_at": base + 60_000}))
        .await
        .expect("s2");
    let s3 = t
        .pay(a, json!({"to_user_id": to(c), "amount": 1, "idempotency_key": "s3", "execute_at": base + 60_000}))
        .await
        .expect("s3");
    // Three waiting already: the fourth of ann's is refused.
    t.pay(a, json!({"to_user_id": to(c), "amount": 1, "idempotency_key": "s4", "execute_at": base + 60_000}))
        .await;
    // Not visible to the recipient yet.
    t.transfer(s1, c).await;
    t.transfer(s1, a).await;
    t.transfer(r1, b).await;
    t.cancel(c, s3).await;
    t.cancel(b, t1).await;
    t.cancel(a, t1).await;
    t.cancel(a, 999_999).await;
    t.cancel(a, s3).await;
    t.cancel(a, s3).await;
    // Room again after the cancel.
    t.pay(a, json!({"to_user_id": to(c), "amount": 1, "idempotency_key": "s4", "execute_at": base + 120_000}))
        .await;

    // Nothing due yet; then the first round.
    t.run_due(base).await;
    t.run_due(base + 61_000).await;
    t.balances(&[a, b, c, d]).await;
    t.transfer(s1, c).await;
    t.transfer(s2, b).await;
    t.transfer(s2, c).await;
    // Three weeks later: runs 1..3 caught up (and s4 runs).
    t.run_due(first + 21 * DAY).await;
    t.run_due(first + 21 * DAY).await;
    t.balances(&[a, b, c, d]).await;
    // Recurring runs that fail: ann's money gone.
    t.pay(
        a,
        json!({"to_user_id": to(c), "amount": 7800, "idempotency_key": "drain"}),
    )
    .await;
    t.run_due(first + 28 * DAY).await;
    t.cancel(a, r1).await;
    t.run_due(first + 100 * DAY).await;
    t.cancel(a, r1).await;
    t.balances(&[a, b, c, d]).await;

    // Histories, page by page; a foreign cursor is refused.
    let hist_a = t.history(a, 3).await;
    t.history(b, 2).await;
    t.history(c, 100).await;
    t.history(d, 1).await;
    t.history(c, 0).await;
    let foreign = hist_a
        .iter()
        .copied()
        .find(|id| *id == s3)
        .expect("s3 in ann's history");
    let r = s.transactions(c, Some(foreign), 10, "KRW").await;
    t.log(
        "foreign cursor",
        match r {
            Ok(_) => json!("accepted"),
            Err(e) => Transcript::err(&e),
        },
    );
    let r = s.transactions(c, Some(u64::MAX), 10, "KRW").await;
    t.log(
        "huge cursor",
        match r {
            Ok(_) => json!("accepted"),
            Err(e) => Transcript::err(&e),
        },
    );
    t.messages(a, b).await;
    t.messages(a, c).await;
    t.messages(b, c).await;
    let v = s.verify_ledger().await.expect("verify");
    t.log(
        "verify",
        json!({
            "accounts": v.accounts, "transfers": v.transfers, "entries": v.entries,
            "issued": v.issued, "total": v.total_balances, "scheduled": v.scheduled,
            "breaches": v.breaches,
        }),
    );
    t.lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_answers_as_embedded() {
    let dir = tempfile::tempdir().expect("dir");
    let emb = open_embedded(dir.path());
    let want = script(&*emb.s).await;
    emb.close().await;

    let url = pg::server().fresh_database("wallet_scratch");
    let p = open_pg(&url);
    let got = script(&*p.s).await;
    p.close().await;

    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "line {i} differs (left: postgres, right: embedded)");
    }
    assert_eq!(got.len(), want.len());
    let v = want.last().expect("verify line");
    assert!(v.contains("\"breaches\":[]"), "{v}");
    for line in &want {
        println!("{line}");
    }
}

/// Two nodes on one database: the scheduler's runs claim disjoint due
/// transfers (each runs once), and the same idempotency key sent to both
/// nodes at once makes one transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_run_each_transfer_once() {
    let url = pg::server().fresh_database("wallet_two_nodes");
    let n1 = open_pg(&url);
    let n2 = open_pg(&url);
    let (s1, s2) = (n1.s.clone(), n2.s.clone());
    let mut users = Vec::new();
    for i in 0..6 {
        let u = new_user(&*s1, &format!("node{i}")).await;
        s1.call(|reply| {
            Op::Wallet(WalletOp::Credit {
                user: u,
                amount: 1_000_000,
                key: None,
                reply,
            })
        })
        .await
        .expect("credit");
        users.push(u);
    }
    let now = confab::store::now_ms();
    // 3 scheduled transfers per sender (the limit), 18 in all, on both nodes.
    let mut n = 0;
    for (i, &from) in users.iter().enumerate() {
        for k in 0..3 {
            let to = users[(i + k + 1) % users.len()];
            let body = json!({"to_user_id": to.to_string(), "amount": 10 + k, "idempotency_key": format!("sch{k}"), "execute_at": now + 5_000});
            let req = parse_request(&body, from, "KRW", now).expect("req");
            let s = if n % 2 == 0 { &s1 } else { &s2 };
            s.call(|reply| Op::Wallet(WalletOp::Transfer { from, req, reply }))
                .await
                .expect("schedule");
            n += 1;
        }
    }
    // Both nodes run everything due, many times, at once.
    let mut tasks = Vec::new();
    for round in 0..8 {
        for s in [s1.clone(), s2.clone()] {
            tasks.push(tokio::spawn(async move {
                s.call(|reply| {
                    Op::Wallet(WalletOp::RunDue {
                        now: now + 10_000 + round,
                        reply,
                    })
                })
                .await
            }));
        }
    }
    for t in tasks {
        t.await.expect("task").expect("run due");
    }
    let v = s1.verify_ledger().await.expect("verify");
    assert!(v.breaches.is_empty(), "{:?}", v.breaches);
    assert_eq!(v.scheduled, 0);
    // 6 credits + 18 runs, each with two entries.
    assert_eq!(v.transfers, 24);
    assert_eq!(v.entries, 48);
    for &u in &users {
        let (page, _) = s1.transactions(u, None, 100, "KRW").await.expect("tx");
        let executed = page.iter().filter(|t| t.state == "executed").count();
        // Its credit, its 3 sent, 3 received.
        assert_eq!(executed, 7, "{page:?}");
    }

    // The same new key on both nodes at once: one transfer, one replay.
    for k in 0..10 {
        let from = users[k % users.len()];
        let to = users[(k + 1) % users.len()];
        let body = json!({"to_user_id": to.to_string(), "amount": 1, "idempotency_key": format!("race{k}")});
        let mut tasks = Vec::new();
        for s in [s1.clone(), s2.clone()] {
            let req = parse_request(&body, from, "KRW", confab::store::now_ms()).expect("req");
            tasks.push(tokio::spawn(async move {
                s.call(|reply| Op::Wallet(WalletOp::Transfer { from, req, reply }))
                    .await
            }));
        }
        let mut replays = Vec::new();
        for t in tasks {
            let (_, replay) = t.await.expect("task").expect("transfer");
            replays.push(replay);
        }
        replays.sort();
        assert_eq!(replays, vec![false, true], "key race{k}");
    }
    let v = s2.verify_ledger().await.expect("verify");
    assert!(v.breaches.is_empty(), "{:?}", v.breaches);
    assert_eq!(v.transfers, 34);
    drop((s1, s2));
    n1.close().await;
    n2.close().await;
}

/// `verify` finds what is broken (edited behind confab's back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_breaches() {
    let url = pg::server().fresh_database("wallet_breaches");
    let dbname = url
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .expect("dbname")
        .to_string();
    let p = open_pg(&url);
    let s = p.s.clone();
    let a = new_user(&*s, "ann").await;
    let b = new_user(&*s, "bob").await;
    s.call(|reply| {
        Op::Wallet(WalletOp::Credit {
            user: a,
            amount: 500,
            key: None,
            reply,
        })
    })
    .await
    .expect("credit");
    let now = confab::store::now_ms();
    let body = json!({"to_user_id": b.to_string(), "amount": 5, "idempotency_key": "r", "execute_at": now + 1_000, "repeat": "weekly"});
    let req = parse_request(&body, a, "KRW", now).expect("req");
    s.call(|reply| {
        Op::Wallet(WalletOp::Transfer {
            from: a,
            req,
            reply,
        })
    })
    .await
    .expect("recurring");
    s.call(|reply| {
        Op::Wallet(WalletOp::RunDue {
            now: now + 15 * DAY,
            reply,
        })
    })
    .await
    .expect("run due");
    let v = s.verify_ledger().await.expect("verify");
    assert!(v.breaches.is_empty(), "{:?}", v.breaches);
    assert_eq!(v.scheduled, 1);
    pg::server().psql(
        &dbname,
        "UPDATE wallet_accounts SET balance = balance + 1 WHERE account <> 0;
         DELETE FROM wallet_transfers WHERE parent_run = 1;
         UPDATE wallet_transfers SET state = 7 WHERE id = 1;",
    );
    let v = s.verify_ledger().await.expect("verify");
    let all = v.breaches.join("\n");
    println!("{all}");
    assert!(all.contains("but its entries sum to"), "{all}");
    assert!(all.contains("was issued"), "{all}");
    assert!(all.contains("belong to a missing transfer"), "{all}");
    assert!(all.contains("runs recorded, run numbers [0, 2]"), "{all}");
    assert!(all.contains("unknown state 7"), "{all}");
    drop(s);
    p.close().await;
}

/// A signup bonus is a credit in the signup's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_bonus_is_credited() {
    let url = pg::server().fresh_database("wallet_bonus");
    let p = open_pg_with(&url, wiring_with_bonus(3_000));
    let s = p.s.clone();
    let a = new_user(&*s, "ann").await;
    let b = new_user(&*s, "bob").await;
    assert_eq!(s.balance(a).await.expect("balance"), 3_000);
    assert_eq!(s.balance(b).await.expect("balance"), 3_000);
    let (page, next) = s.transactions(a, None, 10, "KRW").await.expect("tx");
    assert_eq!((page.len(), next), (1, None));
    assert_eq!(
        (page[0].note.as_deref(), page[0].direction),
        (Some("credit"), "in")
    );
    let v = s.verify_ledger().await.expect("verify");
    assert!(v.breaches.is_empty(), "{:?}", v.breaches);
    assert_eq!((v.issued, v.accounts, v.transfers), (6_000, 3, 2));
    drop(s);
    p.close().await;
}
