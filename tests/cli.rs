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

#[test]
fn help_lists_the_subcommands() {
    let out = confab().arg("--help").output().expect("run confab --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("serve"), "{text}");
    let out = confab()
        .args(["serve", "--help"])
        .output()
        .expect("run confab serve --help");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen", "--data-dir", "--config", "--set"] {
        assert!(text.contains(flag), "serve --help lacks {flag}: {text}");
    }
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
