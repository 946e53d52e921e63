//! `confab bench` keeps working: a few seconds of load against a real
//! server, a direct-chat step and a group step, an idle-connection run, and
//! the JSON and HTML reports it writes.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn bench(server: &Server, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("bench")
        .arg("--url")
        .arg(format!("http://{}", server.addr))
        .args(["--quiet", "--source-ips", "4"])
        .args(args)
        .output()
        .expect("run confab bench");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

#[test]
fn a_short_bench_loses_nothing_and_writes_its_reports() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let html = dir.path().join("bench.html");
    let (status, out) = bench(
        &server,
        &[
            "--users",
            "12",
            "--rate",
            "120",
            "--duration",
            "2",
            "--json",
            json.to_str().expect("utf-8 path"),
            "--html",
            html.to_str().expect("utf-8 path"),
        ],
    );
    assert!(status.success(), "bench failed: {out}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    let step = &report["steps"][0];
    assert_eq!(step["sent"], 240, "{step}");
    assert_eq!(step["acked"], 240, "{step}");
    assert_eq!(step["errors"], 0, "{step}");
    assert_eq!(step["lost"], 0, "{step}");
    assert_eq!(step["history_mismatches"], 0, "{step}");
    // Direct pairs: each message reaches exactly one other connection.
    assert_eq!(step["delivered"], 240, "{step}");
    assert_eq!(step["pass"][0], true, "{step}");
    assert!(
        step["deliver_ms"]["p99"].as_f64().unwrap_or(-1.0) > 0.0,
        "{step}"
    );
    assert!(step["server_cpu_percent"].as_f64().is_some(), "{step}");
    let page = std::fs::read_to_string(&html).expect("html written");
    assert!(
        page.contains("<svg") && page.contains("12 users, 120 msg/s"),
        "{page}"
    );
    assert!(out.contains("| 12 | 120 |"), "terminal table: {out}");

    // Groups of 4: every message reaches the 3 other members.
    let (status, out) = bench(
        &server,
        &[
            "--users",
            "8",
            "--rate",
            "40",
            "--duration",
            "2",
            "--room-size",
            "4",
            "--prefix",
            "grp",
            "--json",
            json.to_str().expect("utf-8 path"),
        ],
    );
    assert!(status.success(), "group bench failed: {out}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    let step = &report["steps"][0];
    assert_eq!(step["acked"], 80, "{step}");
    assert_eq!(step["delivered"], 240, "{step}");
    assert_eq!(step["lost"], 0, "{step}");
}

#[test]
fn idle_connections_report_memory_per_connection() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("idle.json");
    let (status, out) = bench(
        &server,
        &[
            "--idle",
            "200",
            "--json",
            json.to_str().expect("utf-8 path"),
        ],
    );
    assert!(status.success(), "idle bench failed: {out}");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    assert_eq!(r["opened"], 200, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["server_open_fds"].as_f64().unwrap_or(0.0) >= 200.0, "{r}");
    assert!(r["rss_per_connection_kb"].as_f64().is_some(), "{r}");
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args([
            "bench",
            "--url",
            "http://127.0.0.1:9",
            "--users",
            "2",
            "--duration",
            "1",
            "--quiet",
        ])
        .output()
        .expect("run confab bench");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("confab bench:") && err.contains("connect"),
        "{err}"
    );
}
