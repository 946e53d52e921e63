//! Monitoring: `/metrics` follows Prometheus' rules and moves with what
//! clients do; `/api/v1/status` tells the same story; `/status` draws live
//! charts in headless Chromium using nothing but the server; access is
//! limited to allowed addresses or the status token; the Grafana dashboard
//! and alert rules only query metrics that exist; logs can be JSON.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Family name → (type, help present), plus every sample line's labels.
struct Exposition {
    types: BTreeMap<String, String>,
    helps: BTreeSet<String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn parse(text: &str) -> Exposition {
    let mut e = Exposition {
        types: BTreeMap::new(),
        helps: BTreeSet::new(),
        samples: Vec::new(),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().expect("HELP name");
            assert!(rest.len() > name.len() + 1, "empty HELP for {name}");
            e.helps.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, ty) = (it.next().expect("TYPE name"), it.next().expect("TYPE type"));
            assert!(
                e.types.insert(name.to_string(), ty.to_string()).is_none(),
                "two TYPE lines for {name}"
            );
        } else if line.starts_with('#') {
            continue;
        } else {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => {
                    let l = l
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                    let mut map = BTreeMap::new();
                    for pair in l.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                        map.insert(k.to_string(), v.trim_end_matches('"').to_string());
                    }
                    (n.to_string(), map)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            e.samples.push((name, labels, value));
        }
    }
    e
}

fn family(e: &Exposition, sample: &str) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix)
            && matches!(
                e.types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
        {
            return base.to_string();
        }
    }
    sample.to_string()
}

fn value(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    e.samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

async fn metrics(api: &Api) -> Exposition {
    let r = api.raw(hyper::Method::GET, "/metrics", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    parse(&String::from_utf8_lossy(&r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_rules_and_move_with_traffic() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let fresh = metrics(&api).await;
    let a = api.new_user("moa").await;
    let b = api.new_user("mob").await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    // One good login, one bad.
    let ok = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": a.username, "password": PASSWORD}),
        )
        .await;
    assert_eq!(ok.0.as_u16(), 200);
    let bad = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": a.username, "password": "wrong password"}),
        )
        .await;
    assert_eq!(bad.0.as_u16(), 401);
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let mut wb = Ws::connect_auth(srv.addr, &b.token).await;
    for i in 0..25 {
        wa.send_and_ack(&room, &cid("m"), &format!("metric {i}"))
            .await;
    }
    for _ in 0..25 {
        wb.expect_type("message").await;
    }
    wa.send_msg(&room, &cid("m"), "").await;
    wa.expect_error("message_too_long").await;

    let e = metrics(&api).await;
    // Every family has HELP and TYPE; names and labels follow the rules.
    let allowed_labels: BTreeSet<&str> = [
        "route", "method", "status", "outcome", "reason", "version", "git", "le", "quantile",
        "file", "stage", "table", "kind",
    ]
    .into();
    for (name, labels, _) in &e.samples {
        let fam = family(&e, name);
        assert!(fam.starts_with("confab_"), "{fam} lacks the confab_ prefix");
        assert!(e.types.contains_key(&fam), "{fam} has no TYPE");
        assert!(e.helps.contains(&fam), "{fam} has no HELP");
        for k in labels.keys() {
            assert!(
                allowed_labels.contains(k.as_str()),
                "{fam} has a high-cardinality label {k}"
            );
        }
    }
    for (name, ty) in &e.types {
        match ty.as_str() {
            "counter" => assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            ),
            "histogram" => assert!(
                name.ends_with("_seconds")
                    || ["confab_commit_batch_size", "confab_outbox_depth_frames"]
                        .contains(&name.as_str()),
                "histogram {name} is neither _seconds nor a count"
            ),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name} ends in _total"),
            other => panic!("{name}: unexpected type {other}"),
        }
    }
    for needed in [
        "confab_connections_open",
        "confab_sessions_online",
        "confab_send_deliver_seconds",
        "confab_send_ack_seconds",
        "confab_commit_batch_size",
        "confab_commit_duration_seconds",
        "confab_outbox_depth_frames",
        "confab_slow_client_disconnects_total",
        "confab_http_requests_total",
        "confab_http_request_duration_seconds",
        "confab_logins_total",
        "confab_search_duration_seconds",
        "confab_search_index_lag_messages",
        "confab_search_index_lag_seconds",
        "confab_search_index_bytes",
        "confab_wallet_transfers_total",
        "confab_process_cpu_seconds_total",
        "confab_process_resident_memory_bytes",
        "confab_process_open_fds",
        "confab_process_threads",
        "confab_data_bytes",
        "confab_build_info",
        "confab_process_start_time_seconds",
    ] {
        assert!(e.types.contains_key(needed), "{needed} is missing");
    }
    // The counters moved by exactly what this test did.
    let moved =
        |name: &str, labels: &[(&str, &str)]| value(&e, name, labels) - value(&fresh, name, labels);
    assert_eq!(moved("confab_messages_received_total", &[]), 25.0);
    assert_eq!(moved("confab_messages_stored_total", &[]), 25.0);
    assert_eq!(moved("confab_messages_delivered_total", &[]), 25.0);
    assert_eq!(
        moved(
            "confab_messages_rejected_total",
            &[("reason", "message_too_long")]
        ),
        1.0
    );
    assert_eq!(moved("confab_logins_total", &[("outcome", "ok")]), 1.0);
    assert_eq!(
        moved("confab_logins_total", &[("outcome", "invalid_credentials")]),
        1.0
    );
    assert_eq!(moved("confab_send_deliver_seconds_count", &[]), 25.0);
    assert_eq!(value(&e, "confab_sessions_online", &[]), 2.0);
    assert!(value(&e, "confab_data_bytes", &[("file", "store")]) > 0.0);
    let build = e
        .samples
        .iter()
        .find(|(n, _, _)| n == "confab_build_info")
        .expect("build info");
    assert_eq!(
        build.1.get("version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(build.1.get("git").is_some_and(|g| !g.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_what_happened() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("msa").await;
    let b = api.new_user("msb").await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    let bad = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": b.username, "password": "nope nope"}),
        )
        .await;
    assert_eq!(bad.0.as_u16(), 401);
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let _wb = Ws::connect_auth(srv.addr, &b.token).await;
    for i in 0..12 {
        wa.send_and_ack(&room, &cid("s"), &format!("status {i}"))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (status, s) = api.get("/api/v1/status", "").await;
    assert_eq!(status.as_u16(), 200, "{s}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["totals"]["messages_stored"], 12);
    assert_eq!(s["totals"]["messages_received"], 12);
    assert_eq!(s["totals"]["messages_delivered"], 12);
    assert_eq!(s["totals"]["logins_failed"], 1);
    assert_eq!(s["totals"]["logins_ok"], 0);
    assert_eq!(s["sessions"], 2);
    assert!(s["connections"].as_u64() >= Some(2));
    let history = s["history"].as_array().expect("history");
    assert!(history.len() >= 2, "{s}");
    let stored: u64 = history
        .iter()
        .map(|x| x["msgs_stored"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(stored, 12, "the per-second samples add up to the total");
    assert!(history.iter().any(|x| x["p99_ms"].as_f64().is_some()));
    assert!(s["uptime_secs"].as_u64().is_some());
    assert_eq!(s["search"]["lag_messages"], 0);
}

/// A GET from a chosen loopback source address; returns the status code.
async fn get_from(source: &str, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse().expect("source"))
        .expect("bind source address");
    let mut stream = sock.connect(addr).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_refused_to_other_addresses_and_without_the_token() {
    // Only 127.0.0.2 is allowed: 127.0.0.1 stands for "another address".
    let srv = Server::start(&["status_allowed_ips=127.0.0.2/32"]);
    for path in ["/api/v1/status", "/status"] {
        assert_eq!(
            get_from("127.0.0.1", srv.addr, path, &[]).await,
            403,
            "{path}"
        );
        assert_eq!(
            get_from("127.0.0.2", srv.addr, path, &[]).await,
            200,
            "{path}"
        );
    }
    // The chat and the API stay open to everyone.
    assert_eq!(get_from("127.0.0.1", srv.addr, "/healthz", &[]).await, 200);
    drop(srv);
    // With a token: anyone who presents it.
    let srv = Server::start(&[
        "status_allowed_ips=127.0.0.2/32",
        "status_token=s3cret-token",
    ]);
    assert_eq!(
        get_from("127.0.0.1", srv.addr, "/api/v1/status", &[]).await,
        403
    );
    assert_eq!(
        get_from(
            "127.0.0.1",
            srv.addr,
            "/api/v1/status",
            &[("Authorization", "Bearer wrong")]
        )
        .await,
        403
    );
    assert_eq!(
        get_from(
            "127.0.0.1",
            srv.addr,
            "/api/v1/status",
            &[("Authorization", "Bearer s3cret-token")]
        )
        .await,
        200
    );
    // The page itself loads (it asks for the token); its data does not without it.
    assert_eq!(get_from("127.0.0.1", srv.addr, "/status", &[]).await, 200);
    assert_eq!(
        get_from(
            "127.0.0.1",
            srv.addr,
            "/api/v1/status/ws",
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13")
            ]
        )
        .await,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_live_charts_from_the_server_alone() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("mpa").await;
    let b = api.new_user("mpb").await;
    let room = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room")
        .to_string();
    let browser = Browser::launch().await;
    let page = browser.new_page().await;
    page.set_viewport(1280, 900, false).await;
    page.goto(&format!("http://{}/status", srv.addr)).await;
    page.wait_for(
        "document.querySelector('#state')?.dataset.state === 'live'",
        WAIT,
    )
    .await;
    page.wait_for("window.confabStatusSamples >= 1", WAIT).await;
    let before = page
        .eval("document.querySelector('#chart-0').toDataURL()")
        .await;
    // Traffic for a few seconds; the "messages in" figure and chart follow.
    let mut wa = Ws::connect_auth(srv.addr, &a.token).await;
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) {
        wa.send_and_ack(&room, &cid("p"), &format!("chart {i}"))
            .await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    page.wait_for(
        "Number(document.querySelectorAll('.figure .value')[0].textContent) > 0 || window.confabStatusSamples > 3",
        WAIT,
    )
    .await;
    let after = page
        .eval("document.querySelector('#chart-0').toDataURL()")
        .await;
    assert_ne!(before, after, "the messages chart did not redraw");
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    page.screenshot(shots.join("status-light-desktop.png"))
        .await;
    page.set_dark(true).await;
    page.set_viewport(390, 844, true).await;
    page.screenshot(shots.join("status-dark-phone.png")).await;
    // Nothing but the server: every resource from its own origin, no errors.
    let foreign = page
        .eval("performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(location.origin))")
        .await;
    assert_eq!(foreign, json!([]), "requests outside the server");
    assert!(page.exceptions().is_empty(), "{:?}", page.exceptions());
    assert!(
        page.console_errors().is_empty(),
        "{:?}",
        page.console_errors()
    );
    assert!(page.log_errors().is_empty(), "{:?}", page.log_errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_and_alert_queries_name_exported_metrics_and_logs_can_be_json() {
    let srv = Server::start(&["log_format=json", "log=debug"]);
    let api = srv.api();
    let _ = api.get("/api/v1/me", "").await;
    let e = metrics(&api).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana-dashboard.json")).expect("dashboard"),
    )
    .expect("the dashboard is valid JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8));
    fn exprs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "expr" {
                        out.push(v.as_str().unwrap_or("").to_string());
                    } else {
                        exprs(v, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    let alerts = std::fs::read_to_string(root.join("alerts.yml")).expect("alerts");
    queries.extend(
        alerts
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_string),
    );
    assert!(queries.len() >= 20, "{queries:?}");
    let mut checked = 0;
    for q in &queries {
        for (i, _) in q.match_indices("confab_") {
            let name: String = q[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let fam = family(&e, &name);
            assert!(
                e.types.contains_key(&fam),
                "query {q:?} names {name}, which /metrics does not export"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20);
    // JSON logs: every line the server wrote is one JSON object.
    let _ = api.get("/api/v1/me", "").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = srv.log_tail();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!lines.is_empty(), "{log}");
    for l in &lines {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
}
