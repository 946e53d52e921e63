//! `confab migrate`: a real single node (embedded store) with users,
//! contacts, privacy settings, direct and group rooms, read positions, a
//! payment, a logout and a ledger with a scheduled, a cancelled and a
//! recurring transfer is stopped and moved into a real PostgreSQL
//! database; then `confab serve` on that database shows every user what
//! they saw before (the same rooms, histories, balances, transactions,
//! contacts), old passwords and tokens work, the next message gets the
//! next seq, search finds old messages, and the scheduled transfer runs
//! once. A re-run changes nothing; a backup file migrates to the same
//! rows; a run killed midway resumes; a non-empty database, bad input and
//! a running node are refused with a clear error and nothing changed.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Api, PASSWORD, Server, User, Ws, cid, confab_command, pg};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const BONUS: u64 = 100_000;

/// A single node on the embedded store (whatever `CONFAB_TEST_STORAGE`
/// says: an empty `database_url` keeps it embedded).
fn embedded_node() -> Server {
    let bonus = format!("signup_bonus={BONUS}");
    let mut settings = vec!["database_url=", bonus.as_str()];
    settings.extend(common::UNLIMITED);
    Server::start(&settings)
}

/// A fresh database: its libpq connection string and its name.
struct Db {
    conn: String,
    name: String,
}

impl Db {
    fn fresh(hint: &str) -> Db {
        let conn = pg::server().fresh_database(hint);
        let name = conn
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("dbname="))
            .expect("dbname")
            .to_string();
        Db { conn, name }
    }

    /// As a URL, the form `database_url` is usually given in.
    fn url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{}",
            pg::server().port(),
            self.name
        )
    }

    fn psql(&self, sql: &str) -> String {
        pg::server().psql(&self.name, sql).trim().to_string()
    }

    /// A digest of every row of every table (and of the transfer id
    /// sequence); `meta` with or without the migration's own records.
    fn fingerprint(&self, with_migration_records: bool) -> String {
        let tables = [
            "users",
            "contacts",
            "revoked",
            "rooms",
            "members",
            "messages",
            "wallet_accounts",
            "wallet_entries",
            "wallet_transfers",
            "writer_marks",
        ];
        let mut parts: Vec<String> = tables
            .iter()
            .map(|t| {
                format!(
                    "SELECT '{t}' AS t, md5(COALESCE(string_agg(x::text, '|' ORDER BY x::text), '')) AS h FROM {t} x"
                )
            })
            .collect();
        let meta_filter = if with_migration_records {
            "true"
        } else {
            "key NOT LIKE 'migrat%'"
        };
        parts.push(format!(
            "SELECT 'meta', md5(COALESCE(string_agg(x::text, '|' ORDER BY x::text), '')) FROM meta x WHERE {meta_filter}"
        ));
        parts.push(
            "SELECT 'ids', md5(x::text) FROM (SELECT last_value, is_called FROM wallet_transfer_ids) x"
                .into(),
        );
        self.psql(&format!(
            "SELECT string_agg(t || '=' || h, ' ' ORDER BY t) FROM ({}) s",
            parts.join(" UNION ALL ")
        ))
    }
}

/// `confab migrate ARGS --json`: exit code, the report (Null when none),
/// stderr.
fn migrate(args: &[&str]) -> (i32, Value, String) {
    let dir = tempfile::tempdir().expect("cwd");
    let out = confab_command(&["migrate", "--json"], dir.path())
        .args(args)
        .output()
        .expect("run confab migrate");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `confab migrate ARGS` is refused: exit 2, and stderr says each of `says`.
fn refused(args: &[&str], says: &[&str]) {
    let (code, report, stderr) = migrate(args);
    assert_eq!(code, 2, "{stderr}\n{report:#}");
    for s in says {
        assert!(stderr.contains(s), "{s:?} is not in:\n{stderr}");
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `confab backup` (with `extra` options) of a stopped node's directory
/// into a new temporary directory: that directory and the file.
fn backup_of(dir: &str, extra: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let files = tempfile::tempdir().expect("dir");
    let file = files.path().join("node.cfbk");
    let out = confab_command(
        &["backup", "--to", path(&file), "--data-dir", dir],
        files.path(),
    )
    .args(extra)
    .output()
    .expect("confab backup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (files, file)
}

/// Asserts a migration was verified, with nothing left out.
fn assert_verified(code: i32, report: &Value, stderr: &str) {
    assert_eq!(code, 0, "migrate failed:\n{stderr}\n{report:#}");
    assert_eq!(report["verified"], true, "{report:#}");
    assert_eq!(report["mismatches"], json!([]), "{report:#}");
    assert_eq!(report["damaged_total"], 0, "{report:#}");
    assert_eq!(report["ledger"]["breaches"], json!([]), "{report:#}");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

async fn pay(api: &Api, from: &User, body: Value) -> Value {
    let (status, t) = api
        .post("/api/v1/wallet/transfers", &from.token, &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{t}");
    t
}

async fn balance(api: &Api, u: &User) -> u64 {
    let (status, body) = api.get("/api/v1/wallet", &u.token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["balance"].as_u64().expect("balance")
}

async fn transfer(api: &Api, u: &User, id: &str) -> Value {
    let (status, t) = api
        .get(&format!("/api/v1/wallet/transfers/{id}"), &u.token)
        .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    t
}

/// Everything a user sees of their account through the API.
async fn what_they_see(api: &Api, u: &User, rooms: &[&str]) -> Value {
    let mut seen = serde_json::Map::new();
    for path in [
        "/api/v1/me",
        "/api/v1/rooms",
        "/api/v1/contacts",
        "/api/v1/me/privacy",
        "/api/v1/wallet",
        "/api/v1/wallet/transactions?limit=100",
    ] {
        let (status, body) = api.get(path, &u.token).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        seen.insert(path.into(), body);
    }
    for room in rooms {
        seen.insert(
            format!("history {room}"),
            Value::Array(api.history_all(&u.token, room).await),
        );
    }
    Value::Object(seen)
}

/// Waits until `check` holds (polling), or fails with `what`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the node of the big test held, to compare with later.
struct Before {
    a: User,
    b: User,
    c: User,
    /// c's token that was logged out.
    revoked: String,
    direct: String,
    group: String,
    scheduled: String,
    cancelled: String,
    recurring: String,
    seen: Vec<Value>,
    messages: u64,
}

/// Fills a node with one of everything a migration must carry.
async fn fill(api: &Api, addr: std::net::SocketAddr) -> Before {
    let a = api.new_user("mig_a").await;
    let b = api.new_user("mig_b").await;
    let c = api.new_user("mig_c").await;
    let (status, _) = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": b.username}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, p) = api
        .call(
            Method::PUT,
            "/api/v1/me/privacy",
            &c.token,
            Some(&json!({"presence": "nobody", "group_adds": "contacts"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    // c lets a add them to groups: a is in c's contacts.
    let (status, _) = api
        .post("/api/v1/contacts", &c.token, &json!({"user_id": a.id}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let direct = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let group = api.group_room(&a.token, "movers", &[&b.id, &c.id]).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut messages = 0;
    for (who, room, text) in [
        (&a, &direct, "hello b, we are moving house"),
        (&b, &direct, "to a bigger machine?"),
        (&a, &direct, "to a whole cluster"),
        (&a, &group, "welcome to the movers"),
        (&c, &group, "안녕하세요 이사 준비 중"),
        (&b, &group, "boxes are packed"),
        (&c, &group, "see you on the other side"),
    ] {
        let (status, m) = api.post_message(&who.token, room, &cid("m"), text).await;
        assert_eq!(status, StatusCode::CREATED, "{m}");
        messages += 1;
    }
    // A payment: money moves now, with its message in the direct room.
    let paid = pay(
        api,
        &a,
        json!({"to_user_id": b.id, "amount": 1234, "idempotency_key": cid("p"), "note": "rent"}),
    )
    .await;
    assert_eq!(paid["state"], "executed");
    messages += 1;
    // Scheduled for in an hour; another cancelled; a weekly one whose
    // first run happens now.
    let now = now_ms();
    let scheduled = pay(
        api,
        &a,
        json!({"to_user_id": c.id, "amount": 500, "idempotency_key": cid("s"), "execute_at": now + 3_600_000, "note": "later"}),
    )
    .await;
    assert_eq!(scheduled["state"], "scheduled");
    let cancelled = pay(
        api,
        &a,
        json!({"to_user_id": c.id, "amount": 700, "idempotency_key": cid("s"), "execute_at": now + 3_600_000}),
    )
    .await;
    let cancelled = cancelled["id"].as_str().expect("id").to_string();
    let (status, _) = api
        .delete(&format!("/api/v1/wallet/transfers/{cancelled}"), &a.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    let recurring = pay(
        api,
        &a,
        json!({"to_user_id": b.id, "amount": 100, "idempotency_key": cid("r"), "execute_at": now + 300, "repeat": "weekly"}),
    )
    .await;
    eventually(
        "the recurring transfer's first run",
        Duration::from_secs(10),
        || async { balance(api, &b).await == BONUS + 1234 + 100 },
    )
    .await;
    messages += 1;
    // b reads the direct room up to seq 2.
    let wb = Ws::connect_auth(addr, &b.token).await;
    wb.send_json(&json!({"type": "read", "room": direct, "seq": 2}))
        .await;
    eventually("b's read position", Duration::from_secs(10), || async {
        api.room_entry(&b.token, &direct).await["reads"][&b.id] == 2
    })
    .await;
    wb.close().await;
    // c logs a second session out: that token stays revoked.
    let (status, login) = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": c.username, "password": PASSWORD}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let revoked = login["token"].as_str().expect("token").to_string();
    let r = api
        .raw(Method::POST, "/api/v1/logout", &revoked, None, &[])
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let rooms = [direct.as_str(), group.as_str()];
    let mut seen = Vec::new();
    for u in [&a, &b, &c] {
        let visible: Vec<&str> = if u.id == c.id {
            vec![&group]
        } else {
            rooms.to_vec()
        };
        seen.push(what_they_see(api, u, &visible).await);
    }
    Before {
        a,
        b,
        c,
        revoked,
        direct,
        group,
        scheduled: scheduled["id"].as_str().expect("id").to_string(),
        cancelled,
        recurring: recurring["id"].as_str().expect("id").to_string(),
        seen,
        messages,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_moves_to_postgres_whole_and_a_rerun_changes_nothing() {
    let mut node = embedded_node();
    let api = node.api();
    let before = fill(&api, node.addr).await;
    node.stop();
    let dir = path(node.data_dir()).to_string();

    // The migration: copied and verified.
    let db = Db::fresh("moved");
    let (code, report, stderr) = migrate(&["--data-dir", &dir, "--database-url", &db.url()]);
    assert_verified(code, &report, &stderr);
    assert_eq!(report["resumed"], false);
    assert_eq!(report["changed"], true);
    assert_eq!(report["source_id_from"], "token secret");
    assert_eq!(report["inserted"]["users"], 3);
    assert_eq!(report["inserted"]["rooms"], 2);
    assert_eq!(report["inserted"]["messages"], before.messages);
    assert_eq!(report["compared"]["messages"]["source"], before.messages);
    assert_eq!(report["compared"]["revoked"]["database"], 1);
    assert_eq!(report["compared"]["privacy"]["database"], 1);
    assert_eq!(
        report["compared"]["scheduled"]["database"], 2,
        "the scheduled one and the recurring one"
    );
    assert_eq!(report["rooms_checked"], 2);
    assert_eq!(
        db.psql("SELECT value FROM meta WHERE key = 'log_pos'"),
        before.messages.to_string()
    );

    // Run again: nothing changes, and it verifies again.
    let fingerprint = db.fingerprint(true);
    let (code, again, stderr) = migrate(&["--data-dir", &dir, "--database-url", &db.url()]);
    assert_verified(code, &again, &stderr);
    assert_eq!(again["resumed"], true);
    assert_eq!(again["changed"], false, "{again:#}");
    assert!(
        again["inserted"]
            .as_object()
            .expect("inserted")
            .values()
            .all(|n| n == 0),
        "{again:#}"
    );
    assert_eq!(db.fingerprint(true), fingerprint);

    // Another node's data into it: refused, nothing changed.
    let mut other = embedded_node();
    other.api().new_user("other").await;
    other.stop();
    refused(
        &[
            "--data-dir",
            path(other.data_dir()),
            "--database-url",
            &db.url(),
        ],
        &["the migration of another node", "nothing was changed"],
    );
    assert_eq!(db.fingerprint(true), fingerprint);

    // The same node from a backup file gives the same rows.
    let (_files, file) = backup_of(&dir, &[]);
    let from_backup = Db::fresh("from_backup");
    let (code, report, stderr) = migrate(&[
        "--from-backup",
        path(&file),
        "--database-url",
        &from_backup.url(),
    ]);
    assert_verified(code, &report, &stderr);
    assert_eq!(
        report["source_id"], again["source_id"],
        "the backup carries the secret"
    );
    assert_eq!(from_backup.fingerprint(false), db.fingerprint(false));

    // The node on PostgreSQL: every user sees what they saw.
    let secret = std::fs::read_to_string(node.data_dir().join("jwt_secret")).expect("secret");
    let on_pg = [
        format!("database_url={}", db.url()),
        format!("jwt_secret={}", secret.trim()),
        format!("signup_bonus={BONUS}"),
    ];
    let settings: Vec<&str> = on_pg.iter().map(String::as_str).collect();
    let mut srv = Server::start(&settings);
    let api = srv.api();
    let (_, status) = api.get("/api/v1/status", "").await;
    assert_eq!(status["storage"]["backend"], "postgres", "{status}");
    sees_as_before(&api, &before, "on PostgreSQL").await;
    for u in [&before.a, &before.b, &before.c] {
        // The old password logs in.
        let (status, body) = api
            .post(
                "/api/v1/login",
                "",
                &json!({"username": u.username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // The logged-out token stays refused.
    let (status, _) = api.get("/api/v1/me", &before.revoked).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The next message gets the next seq.
    let last = api.room_entry(&before.a.token, &before.group).await["last_seq"]
        .as_u64()
        .expect("last_seq");
    // A new transfer gets an id of its own (the id sequence is past the
    // node's), and its payment message the next position of the stream.
    writes_go_on(&api, &before, &before.b.token, &before.group, last + 1).await;
    // Search finds the old messages (indexed from the database).
    eventually(
        "search finds a migrated message",
        Duration::from_secs(15),
        || async {
            let (status, found) = api.get("/api/v1/search?q=이사", &before.c.token).await;
            status == StatusCode::OK
                && found["hits"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|x| x["text"] == "안녕하세요 이사 준비 중"))
        },
    )
    .await;
    // The scheduled transfer waits; the cancelled one stays cancelled.
    assert_eq!(
        transfer(&api, &before.a, &before.scheduled).await["state"],
        "scheduled"
    );
    assert_eq!(
        transfer(&api, &before.a, &before.cancelled).await["state"],
        "cancelled"
    );
    let c_balance = balance(&api, &before.c).await;
    srv.stop();

    // Two hours later (the scheduler's clock moved on): the scheduled one
    // runs, once; the weekly one has no run due yet.
    let mut later: Vec<&str> = settings.clone();
    later.push("scheduler_clock_offset_ms=7200000");
    srv.restart_with(&later);
    let api = srv.api();
    eventually(
        "the scheduled transfer runs",
        Duration::from_secs(10),
        || async { balance(&api, &before.c).await == c_balance + 500 },
    )
    .await;
    srv.stop();
    srv.restart_with(&later);
    let api = srv.api();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        balance(&api, &before.c).await,
        c_balance + 500,
        "it ran once"
    );
    assert_eq!(
        transfer(&api, &before.a, &before.scheduled).await["state"],
        "executed"
    );
    let (_, hist) = api
        .get("/api/v1/wallet/transactions?limit=100", &before.b.token)
        .await;
    let runs = hist["transactions"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|t| t["recurring"] == before.recurring.as_str())
        .count();
    assert_eq!(
        runs, 1,
        "the weekly transfer ran once, before the move: {hist}"
    );
    srv.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_holding_data_is_refused_and_left_as_it_was() {
    let mut node = embedded_node();
    node.api().new_user("mine").await;
    node.stop();
    // A database a node on PostgreSQL has used.
    let db = Db::fresh("used");
    let mut used = Server::start(&[&format!("database_url={}", db.url())]);
    used.api().new_user("theirs").await;
    used.stop();
    let fingerprint = db.fingerprint(true);
    refused(
        &[
            "--data-dir",
            path(node.data_dir()),
            "--database-url",
            &db.url(),
        ],
        &[
            "the database already holds data (1 users",
            "only fills an empty database, or resumes its own migration of the same source",
            "nothing was changed",
        ],
    );
    assert_eq!(db.fingerprint(true), fingerprint);
    // A database of another application.
    let foreign = Db::fresh("foreign");
    foreign.psql("CREATE TABLE orders (id int); INSERT INTO orders VALUES (1)");
    refused(
        &[
            "--data-dir",
            path(node.data_dir()),
            "--database-url",
            &foreign.url(),
        ],
        &["tables that are not confab's (orders)"],
    );
    assert_eq!(
        foreign
            .psql("SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'"),
        "orders"
    );
}

/// Two new users and their direct room's id.
async fn two_in_a_room(api: &Api, prefix: &str) -> (User, User, String) {
    let a = api.new_user(&format!("{prefix}_a")).await;
    let b = api.new_user(&format!("{prefix}_b")).await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    (a, b, room)
}

/// Runs `confab migrate` (JSON report) without waiting.
fn spawn_migrate(args: &[&str], cwd: &Path) -> std::process::Child {
    confab_command(&["migrate", "--json"], cwd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn confab migrate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_killed_midway_resumes_and_ends_as_a_whole_one() {
    let mut node = embedded_node();
    let api = node.api();
    let (a, b, room) = two_in_a_room(&api, "kill").await;
    let mut ws = Ws::connect_auth(node.addr, &a.token).await;
    for i in 0..300 {
        ws.send_and_ack(&room, &cid("k"), &format!("message {i}"))
            .await;
    }
    ws.close().await;
    pay(
        &api,
        &a,
        json!({"to_user_id": b.id, "amount": 10, "idempotency_key": cid("p")}),
    )
    .await;
    node.stop();
    let dir = path(node.data_dir()).to_string();

    // The schema is there (an empty database, as a node leaves it), and a
    // session holds `wallet_transfers` against inserts: the migration
    // copies everything before it, then waits — and is killed.
    let db = Db::fresh("killed");
    let (mut client, connection) = tokio_postgres::connect(&db.conn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    confab::storage::postgres::schema::migrate(&mut client)
        .await
        .expect("schema");
    client
        .batch_execute("BEGIN; LOCK TABLE wallet_transfers IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let cwd = tempfile::tempdir().expect("cwd");
    let mut child = spawn_migrate(
        &["--data-dir", &dir, "--database-url", &db.url()],
        cwd.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    // Two signup bonuses and the payment: six ledger entries.
    while db.psql("SELECT count(*) FROM wallet_entries") != "6" {
        assert!(
            Instant::now() < deadline,
            "the copy did not reach the ledger: {} messages",
            db.psql("SELECT count(*) FROM messages")
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "migrate ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "migrate is waiting for the lock"
    );
    assert_eq!(db.psql("SELECT count(*) FROM messages"), "301");
    assert_eq!(db.psql("SELECT count(*) FROM wallet_transfers"), "0");
    child.kill().expect("kill -9");
    let _ = child.wait();
    client.batch_execute("ROLLBACK").await.expect("unlock");
    // The killed run's session ends once its insert has run (the database
    // notices the client is gone only then).
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'confab-migrate'",
            &[],
        )
        .await
        .expect("sessions")
        .get::<_, i64>(0)
        > 0
    {
        assert!(Instant::now() < deadline, "the killed run's session stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);

    // Run again: it resumes and ends where an uninterrupted one does.
    let (code, report, stderr) = migrate(&["--data-dir", &dir, "--database-url", &db.url()]);
    assert_verified(code, &report, &stderr);
    assert_eq!(report["resumed"], true);
    assert_eq!(
        report["inserted"]["messages"], 0,
        "the messages were all there"
    );
    let whole = Db::fresh("whole");
    let (code, report, stderr) = migrate(&["--data-dir", &dir, "--database-url", &whole.url()]);
    assert_verified(code, &report, &stderr);
    assert_eq!(db.fingerprint(false), whole.fingerprint(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let mut node = embedded_node();
    node.api().new_user("bad").await;
    let dir = path(node.data_dir()).to_string();
    let db = Db::fresh("bad");

    // A node still running on its data directory.
    refused(
        &["--data-dir", &dir, "--database-url", &db.url()],
        &["a confab server is running on", "stop it first"],
    );
    node.stop();

    // No database given.
    refused(&["--data-dir", &dir], &["--database-url"]);
    // Missing or unusable sources.
    refused(
        &[
            "--data-dir",
            "/nonexistent/confab",
            "--database-url",
            &db.url(),
        ],
        &["the data directory /nonexistent/confab does not exist"],
    );
    let empty = tempfile::tempdir().expect("dir");
    refused(
        &[
            "--data-dir",
            path(empty.path()),
            "--database-url",
            &db.url(),
        ],
        &["no confab store at"],
    );
    refused(
        &[
            "--from-backup",
            "/nonexistent/x.cfbk",
            "--database-url",
            &db.url(),
        ],
        &["the backup file /nonexistent/x.cfbk does not exist"],
    );
    let junk = empty.path().join("junk.cfbk");
    std::fs::write(&junk, b"not a backup at all").expect("write");
    refused(
        &["--from-backup", path(&junk), "--database-url", &db.url()],
        &["is not a confab backup"],
    );
    // None of that touched the database.
    assert_eq!(
        db.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        "0"
    );

    // An unreachable database: named.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    refused(
        &[
            "--data-dir",
            &dir,
            "--database-url",
            &format!("postgresql://postgres@127.0.0.1:{closed}/confab"),
        ],
        &[&format!(
            "cannot reach the database at 127.0.0.1:{closed} (database confab)"
        )],
    );
    // Wrong credentials: the database's reason.
    refused(
        &[
            "--data-dir",
            &dir,
            "--database-url",
            &format!(
                "postgresql://nobody@127.0.0.1:{}/{}",
                pg::server().port(),
                db.name
            ),
        ],
        &["refused the connection", "\"nobody\""],
    );
    // Another migration running on the database (it holds the advisory
    // lock `migrate/target.rs` names).
    let (locker, connection) = tokio_postgres::connect(&db.conn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    locker
        .batch_execute("SELECT pg_advisory_lock(x'636f6e6661620002'::bigint)")
        .await
        .expect("lock");
    refused(
        &["--data-dir", &dir, "--database-url", &db.url()],
        &[
            "another `confab migrate` is running on this database",
            "nothing was changed",
        ],
    );
    locker
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .expect("unlock");
    // A schema newer than this confab's: both versions named, unchanged.
    db.psql(
        "CREATE TABLE meta (key text PRIMARY KEY, value bigint NOT NULL);
         INSERT INTO meta VALUES ('schema_version', 99), ('log_pos', 0)",
    );
    let newer = format!(
        "schema version 99, newer than this confab knows ({})",
        confab::storage::postgres::schema::SCHEMA_VERSION
    );
    refused(
        &["--data-dir", &dir, "--database-url", &db.url()],
        &[&newer, "nothing was changed"],
    );
    assert_eq!(
        db.psql("SELECT string_agg(key || '=' || value, ',' ORDER BY key) FROM meta"),
        "log_pos=0,schema_version=99"
    );
    assert_eq!(
        db.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        "1"
    );
}

/// Flips the case of the first letter of the one copy of `needle` in a
/// stopped node's store file: that record no longer matches its checksum.
fn damage_record(dir: &Path, needle: &str) {
    let file = dir.join("confab.redb");
    let mut bytes = std::fs::read(&file).expect("read store");
    let at: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{needle} is stored once");
    bytes[at[0]] ^= 0x20;
    std::fs::write(&file, &bytes).expect("write store");
}

/// Overwrites the 4 KiB page holding `needle` with the same garbage every
/// run.
fn damage_page(dir: &Path, needle: &str) {
    let file = dir.join("confab.redb");
    let mut bytes = std::fs::read(&file).expect("read store");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("needle");
    let page = at / 4096 * 4096;
    for (i, b) in bytes[page..page + 4096].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(167).wrapping_add(13);
    }
    std::fs::write(&file, &bytes).expect("write store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_message_is_named_and_left_out_and_its_seq_never_given_again() {
    let mut node = embedded_node();
    let api = node.api();
    let (a, _, room) = two_in_a_room(&api, "dmg").await;
    for text in [
        "before the damage",
        "Xdamaged in the store",
        "after the damage",
    ] {
        let (status, m) = api.post_message(&a.token, &room, &cid("d"), text).await;
        assert_eq!(status, StatusCode::CREATED, "{m}");
    }
    node.stop();
    damage_record(node.data_dir(), "Xdamaged in the store");
    let db = Db::fresh("damaged");
    let (code, report, stderr) = migrate(&[
        "--data-dir",
        path(node.data_dir()),
        "--database-url",
        &db.url(),
    ]);
    assert_eq!(code, 0, "{stderr}\n{report:#}");
    assert_eq!(report["verified"], true, "{report:#}");
    assert_eq!(report["damaged_total"], 1, "{report:#}");
    let found = &report["damaged"][0];
    assert_eq!(found["table"], "messages", "{report:#}");
    assert_eq!(found["room"], room.as_str());
    assert_eq!(found["seq"], 2);
    assert!(
        stderr.contains("1 damaged record(s), which are NOT in the database"),
        "{stderr}"
    );
    let rid = u64::from_str_radix(&room, 16).expect("hex id") as i64;
    assert_eq!(
        db.psql(&format!("SELECT string_agg(seq::text || ':' || text, ',' ORDER BY seq) FROM messages WHERE room = {rid}")),
        "1:before the damage,3:after the damage"
    );
    assert_eq!(
        db.psql(&format!("SELECT last_seq FROM rooms WHERE id = {rid}")),
        "3",
        "the next message gets seq 4, not the damaged one's"
    );
    // A re-run names the same damage and changes nothing.
    let (code, again, stderr) = migrate(&[
        "--data-dir",
        path(node.data_dir()),
        "--database-url",
        &db.url(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again["changed"], false, "{again:#}");
    assert_eq!(again["damaged"], report["damaged"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_page_stops_the_migration_with_the_way_round_it() {
    let mut node = embedded_node();
    let api = node.api();
    let (a, _, room) = two_in_a_room(&api, "page").await;
    let mut ws = Ws::connect_auth(node.addr, &a.token).await;
    for i in 0..400 {
        let text = if i == 200 {
            "the page with THISNEEDLE on it".to_string()
        } else {
            format!("filler message number {i} to spread the messages over pages")
        };
        ws.send_and_ack(&room, &cid("p"), &text).await;
    }
    ws.close().await;
    node.stop();
    let dir = path(node.data_dir()).to_string();
    damage_page(node.data_dir(), "THISNEEDLE");
    let db = Db::fresh("page");
    refused(
        &["--data-dir", &dir, "--database-url", &db.url()],
        &[
            "a page of it is damaged",
            "confab backup --skip-damaged",
            "--from-backup",
            "nothing was changed",
        ],
    );
    assert_eq!(
        db.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        "0",
        "the source is read whole before anything is written"
    );
    // The way round it: a backup of what can be read, migrated.
    let (_files, file) = backup_of(&dir, &["--skip-damaged"]);
    let saved = Db::fresh("saved");
    let (code, report, stderr) =
        migrate(&["--from-backup", path(&file), "--database-url", &saved.url()]);
    assert_eq!(code, 0, "{stderr}\n{report:#}");
    assert_eq!(report["verified"], true, "{report:#}");
    let lost = report["lost_messages"].as_u64().expect("lost");
    assert!(lost >= 1, "{report:#}");
    assert_eq!(
        saved.psql("SELECT count(*) FROM messages"),
        (400 - lost).to_string(),
        "every readable message is there"
    );
    assert_eq!(saved.psql("SELECT max(last_seq) FROM rooms"), "400");
}

/// `confab ARGS` in a scratch directory: exit code, stdout, stderr.
fn confab(args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("cwd");
    let out = confab_command(args, dir.path())
        .output()
        .expect("run confab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `confab restore --from FILE --database-url` (db's).
fn restore_into(file: &Path, db: &Db) -> (i32, String, String) {
    confab(&["restore", "--from", path(file), "--database-url", &db.url()])
}

/// The backup test's token secret (configured: not in the backup).
const SECRET: &str = "backup-test-secret-0123456789abcdef";

/// A node on `db`, signing with [`SECRET`].
fn node_on(db: &Db) -> Server {
    let on_pg = [
        format!("database_url={}", db.url()),
        format!("jwt_secret={SECRET}"),
        format!("signup_bonus={BONUS}"),
    ];
    let mut settings: Vec<&str> = on_pg.iter().map(String::as_str).collect();
    settings.extend(common::UNLIMITED);
    Server::start(&settings)
}

/// A message sent to `room` takes seq `next`, and a payment from b to a
/// is made.
async fn writes_go_on(api: &Api, before: &Before, token: &str, room: &str, next: u64) {
    let (status, m) = api
        .post_message(token, room, &cid("n"), "after the move")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{m}");
    assert_eq!(m["seq"], next);
    let paid = pay(
        api,
        &before.b,
        json!({"to_user_id": before.a.id, "amount": 1, "idempotency_key": cid("n")}),
    )
    .await;
    assert_eq!(paid["state"], "executed", "{paid}");
}

/// Every user of [`fill`] sees on `api` what they saw then (`on`: where,
/// for the message).
async fn sees_as_before(api: &Api, before: &Before, on: &str) {
    let rooms = [before.direct.as_str(), before.group.as_str()];
    for (u, was) in [&before.a, &before.b, &before.c]
        .into_iter()
        .zip(&before.seen)
    {
        let visible: Vec<&str> = if u.id == before.c.id {
            vec![&before.group]
        } else {
            rooms.to_vec()
        };
        assert_eq!(
            &what_they_see(api, u, &visible).await,
            was,
            "what {} sees {on}",
            u.username
        );
    }
}

/// A cluster's database is backed up from one snapshot while a node keeps
/// writing to it, and the file restores both ways: into a single node's
/// data directory and into another (empty) database — where every user
/// sees exactly what they saw, and the writes after the snapshot are in
/// neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_database_backs_up_while_written_and_restores_into_a_node_or_a_database() {
    let db = Db::fresh("backed_up");
    let mut srv = node_on(&db);
    let api = srv.api();
    let before = fill(&api, srv.addr).await;

    // Two other users write on while the backup is taken.
    let d = api.new_user("bk_d").await;
    let e = api.new_user("bk_e").await;
    let busy = api.direct_room(&d.token, &e.id).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, token, room) = (stop.clone(), d.token.clone(), busy.clone());
        tokio::spawn(async move {
            let mut acked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, m) = api
                    .post_message(&token, &room, &cid("w"), "written during the backup")
                    .await;
                assert_eq!(status, StatusCode::CREATED, "{m}");
                acked += 1;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let files = tempfile::tempdir().expect("dir");
    let file = files.path().join("cluster.cfbk");
    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let (file, url) = (file.clone(), db.url());
        move || confab(&["backup", "--to", path(&file), "--database-url", &url])
    })
    .await
    .expect("backup");
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("from the database"), "{stderr}");
    let summary: Value = serde_json::from_str(&stdout).expect("the summary");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    srv.stop();

    // The snapshot: every message up to its stream position, none after,
    // while the writer went on before and after it.
    let snap = summary["snapshot_pos"].as_u64().expect("snapshot_pos");
    let in_snapshot: u64 = db
        .psql(&format!(
            "SELECT count(*) FROM messages WHERE pos <= {snap}"
        ))
        .parse()
        .expect("count");
    assert_eq!(summary["messages"], in_snapshot, "{summary:#}");
    let busy_in_snapshot: u64 = db
        .psql(&format!(
            "SELECT count(*) FROM messages m JOIN rooms r ON r.id = m.room \
              WHERE m.pos <= {snap} AND m.room = (SELECT room FROM messages WHERE text = 'written during the backup' LIMIT 1)"
        ))
        .parse()
        .expect("count");
    assert!(
        busy_in_snapshot > 0 && busy_in_snapshot < acked,
        "taken while writing: {busy_in_snapshot} of {acked} acked messages are in it"
    );
    assert_eq!(summary["users"], 5);
    assert_eq!(
        summary["with_secret"], false,
        "a configured secret stays in the config"
    );

    // Into a single node: verified, and every user sees what they saw.
    let node_dir = tempfile::Builder::new()
        .prefix("confab-test-")
        .tempdir()
        .expect("dir");
    let (code, _, stderr) = confab(&[
        "restore",
        "--from",
        path(&file),
        "--data-dir",
        path(node_dir.path()),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("ledger verified"), "{stderr}");
    let mut embedded: Vec<&str> = vec!["database_url="];
    let secret_setting = format!("jwt_secret={SECRET}");
    embedded.push(&secret_setting);
    embedded.extend(common::UNLIMITED);
    let mut node = Server::start_in(node_dir, &embedded);
    let rapi = node.api();
    let (_, status) = rapi.get("/api/v1/status", "").await;
    assert_eq!(status["storage"]["backend"], "embedded", "{status}");
    sees_as_before(&rapi, &before, "on the restored node").await;
    let (status, _) = rapi.get("/api/v1/me", &before.revoked).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the logout holds");
    // The busy room: exactly the snapshot's messages, seqs 1..n.
    let hist = rapi.history_all(&d.token, &busy).await;
    let seqs: Vec<u64> = hist.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=busy_in_snapshot).collect::<Vec<_>>());
    // The next message takes the next seq; a transfer the next id.
    writes_go_on(&rapi, &before, &d.token, &busy, busy_in_snapshot + 1).await;
    node.stop();

    // Into another database: verified against the file; the messages are
    // the snapshot's rows, positions and all.
    let copy = Db::fresh("restored");
    let (code, report, stderr) = restore_into(&file, &copy);
    assert_eq!(code, 0, "{stderr}");
    assert!(report.contains("result: verified"), "{report}");
    let rows = |d: &Db, filter: &str| {
        d.psql(&format!(
            "SELECT md5(string_agg(x::text, '|' ORDER BY x.pos)) FROM \
             (SELECT room, seq, pos, sender, ts, client_id, text, pay_transfer, pay_amount, pay_to, pay_note \
                FROM messages {filter}) x"
        ))
    };
    assert_eq!(rows(&copy, ""), rows(&db, &format!("WHERE pos <= {snap}")));
    let ledger = |d: &Db| {
        d.psql(
            "SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM \
             (SELECT 'a', account, balance, 0, 0 FROM wallet_accounts \
              UNION ALL SELECT 'e', account, n, transfer, delta FROM wallet_entries \
              UNION ALL SELECT 't', id, amount, state, runs FROM wallet_transfers) x",
        )
    };
    assert_eq!(ledger(&copy), ledger(&db));
    let mut srv = node_on(&copy);
    let api = srv.api();
    sees_as_before(&api, &before, "on the restored database").await;
    srv.stop();

    // Again: nothing changes. Into a database holding other data: refused.
    let (code, again, stderr) = restore_into(&file, &copy);
    assert_eq!(code, 0, "{stderr}");
    assert!(again.contains("nothing changed"), "{again}");
    let (code, _, stderr) = restore_into(&file, &db);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    // A database without confab's tables has nothing to back up.
    let empty = Db::fresh("empty");
    let (code, _, stderr) = confab(&[
        "backup",
        "--to",
        path(&files.path().join("empty.cfbk")),
        "--database-url",
        &empty.url(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("holds no confab data"), "{stderr}");
    assert!(!files.path().join("empty.cfbk").exists());
}
