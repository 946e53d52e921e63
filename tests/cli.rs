//! The binary as an operator meets it: `--help`, configuration through the
//! environment, the files it creates, bad configuration, and the connection
//! limit.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn confab() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONFAB_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn help(args: &[&str]) -> String {
    let out = confab()
        .args(args)
        .arg("--help")
        .output()
        .expect("run confab --help");
    assert!(out.status.success(), "{args:?} --help: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_lists_the_subcommands_and_only_their_own_options() {
    let text = help(&[]);
    for sub in [
        "serve", "proxy", "bench", "reindex", "wallet", "backup", "restore", "export", "migrate",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}: {text}");
    }
    let text = help(&["serve"]);
    for flag in ["--listen", "--data-dir", "--node", "--config", "--set"] {
        assert!(text.contains(flag), "serve --help lacks {flag}: {text}");
    }
    // An empty `[env: CONFAB_CONFIG=]` looked like a setting with no value.
    assert!(text.contains("[env: CONFAB_CONFIG]"), "{text}");
    let text = help(&["proxy"]);
    assert!(text.contains("--listen"), "{text}");
    for flag in ["--data-dir", "--node"] {
        assert!(!text.contains(flag), "proxy keeps no data: {flag}: {text}");
    }
    // The subcommands that work on a data directory neither listen nor
    // join a cluster.
    for sub in [
        &["backup"][..],
        &["restore"],
        &["export"],
        &["reindex"],
        &["wallet", "credit"],
        &["wallet", "verify"],
        &["migrate"],
    ] {
        let text = help(sub);
        for flag in ["--data-dir", "--config", "--set"] {
            assert!(text.contains(flag), "{sub:?} --help lacks {flag}: {text}");
        }
        for flag in ["--listen", "--node"] {
            assert!(!text.contains(flag), "{sub:?} --help lists {flag}: {text}");
        }
    }
    // The subcommands that wait for a running server bound the wait, and
    // say so; the others have nothing to wait for.
    for sub in [
        &["backup"][..],
        &["export"],
        &["wallet", "credit"],
        &["wallet", "verify"],
    ] {
        let text = help(sub);
        assert!(text.contains("--timeout <SECS>"), "{sub:?} --help: {text}");
        assert!(text.contains("running server"), "{sub:?} --help: {text}");
    }
    for sub in [&["restore"][..], &["reindex"], &["migrate"]] {
        let text = help(sub);
        assert!(!text.contains("--timeout"), "{sub:?} --help: {text}");
    }
    // Every argument is described: no line is a bare argument name.
    let text = help(&["wallet", "credit"]);
    for arg in ["<USER>", "<AMOUNT>"] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(arg))
            .unwrap_or_else(|| panic!("{arg} not listed: {text}"));
        assert!(line.trim() != arg, "{arg} has no description: {text}");
    }
    assert!(text.contains("minor units"), "{text}");
}

/// Starts `confab` with `env` added, waits for it to listen, stops it with
/// SIGTERM and returns what it logged.
fn log_of_a_clean_start(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = confab();
    cmd.current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn confab");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the listening line");
    assert!(line.starts_with("confab listening on"), "{line}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_clean_start_warns_of_nothing_but_a_misspelt_setting() {
    // `cargo run` hands the build-time CONFAB_GIT_HASH to the server too.
    let log = log_of_a_clean_start(&[("CONFAB_GIT_HASH", "0123456789ab")]);
    assert!(!log.contains("WARN"), "a clean start warned:\n{log}");
    assert!(
        !log.contains("ERROR"),
        "a clean start logged an error:\n{log}"
    );
    let log = log_of_a_clean_start(&[("CONFAB_SEND_BRUST", "5")]);
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("CONFAB_SEND_BRUST")),
        "a misspelt setting must be warned about:\n{log}"
    );
}

#[tokio::test]
async fn environment_variables_configure_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("store");
    // No subcommand: `serve` is the default.
    let mut child = confab()
        .current_dir(dir.path())
        .env("CONFAB_LISTEN", "127.0.0.1:0")
        .env("CONFAB_DATA_DIR", &data)
        .env("CONFAB_LOGIN_MAX_ATTEMPTS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn confab");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the listening line");
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("confab listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .parse()
        .expect("address");
    let api = Api(addr);
    let user = api.new_user("envcfg").await;
    // CONFAB_LOGIN_MAX_ATTEMPTS=1: the second attempt is refused.
    let body = serde_json::json!({"username": user.username, "password": "wrong password"});
    assert_err(
        &api.post("/api/v1/login", "", &body).await,
        401,
        "invalid_credentials",
    );
    assert_err(
        &api.post("/api/v1/login", "", &body).await,
        429,
        "rate_limited",
    );

    assert!(
        data.join("confab.redb").is_file(),
        "store in CONFAB_DATA_DIR"
    );
    let secret = std::fs::metadata(data.join("jwt_secret")).expect("jwt_secret created");
    assert_eq!(
        secret.permissions().mode() & 0o777,
        0o600,
        "jwt_secret mode"
    );
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_configuration_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (args, needle) in [
        (
            vec!["serve", "--set", "no_such_option=1"],
            "unknown config option",
        ),
        (vec!["serve", "--set", "send_burst=lots"], "send_burst"),
        (
            vec!["serve", "--listen", "not-an-address"],
            "invalid configuration",
        ),
    ] {
        let out = confab()
            .current_dir(dir.path())
            .args(&args)
            .output()
            .expect("run confab");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

async fn connect_retrying(addr: std::net::SocketAddr, token: &str) -> Ws {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut ws) = Ws::connect_with(addr, WsOpts::default()).await {
            ws.auth(token, serde_json::json!({})).await;
            return ws;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection slot freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn max_connections_bounds_open_sockets() {
    let server = Server::start(&["max_connections=2"]);
    let api = server.api();
    let u = api.new_user("maxconn").await;
    // The signup's HTTP connection frees its slot a moment after it closes,
    // so the first two sockets may need a retry.
    let mut a = connect_retrying(server.addr, &u.token).await;
    let _b = connect_retrying(server.addr, &u.token).await;
    // With two open, every further connection is closed without being served.
    for _ in 0..3 {
        let third = Ws::connect_with(server.addr, WsOpts::default()).await;
        assert!(third.is_err(), "a third connection must be refused");
    }
    // The open ones keep working, and a slot frees up when one closes.
    a.ping().await;
    a.close().await;
    connect_retrying(server.addr, &u.token).await;
}
