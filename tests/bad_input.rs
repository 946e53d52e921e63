//! Bad input gets a clear error and changes nothing; the connection keeps
//! working afterwards. Plus the plain HTTP surface: /healthz, the UI, security
//! headers, 404/405, Origin check.

mod common;

use std::time::Duration;

use common::*;
use fastwebsockets::{Frame, Payload};
use hyper::Method;
use serde_json::{Value, json};

/// Sets up A and B with a direct room; returns (server, A, room id).
async fn setup(settings: &[&str]) -> (Server, User, String) {
    let srv = Server::start(settings);
    let api = srv.api();
    let a = api.new_user("ba").await;
    let b = api.new_user("bb").await;
    let rid = api.direct_room(&a.token, &b.id).await["id"]
        .as_str()
        .expect("room id")
        .to_string();
    (srv, a, rid)
}

/// Proves the connection still works: a real send is acked.
async fn still_works(ws: &mut Ws, rid: &str, after: &str) -> Value {
    let c = cid("ok");
    ws.send_msg(rid, &c, &format!("still fine after {after}"))
        .await;
    let v = ws
        .expect(&format!("an ack after {after}"), |v| {
            (v["type"] == "ack" && v["client_id"] == c.as_str())
                || v["type"] == "error"
                || is_end(v)
        })
        .await;
    assert_eq!(
        v["type"], "ack",
        "the connection must keep working after {after}; got {v}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_bad_frames_get_errors_and_connection_survives() {
    let (srv, a, rid) = setup(&[]).await;
    let api = srv.api();
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    let mut last_seq = still_works(&mut ws, &rid, "auth").await["seq"]
        .as_u64()
        .expect("seq");

    // Malformed JSON.
    ws.send_raw_text(b"{\"type\":\"send\", oops".to_vec()).await;
    ws.expect_error("invalid_json").await;
    last_seq = next_seq(&mut ws, &rid, "malformed JSON", last_seq).await;

    // JSON that is not an object / lacks a type / has mistyped fields.
    for (what, raw) in [
        (
            "send without text",
            json!({"type": "send", "room": rid, "client_id": "x"}),
        ),
        (
            "send with numeric text",
            json!({"type": "send", "room": rid, "client_id": "x", "text": 5}),
        ),
    ] {
        ws.send_json(&raw).await;
        ws.expect_error("invalid_json").await;
        last_seq = next_seq(&mut ws, &rid, what, last_seq).await;
    }

    // Unknown type.
    ws.send_json(&json!({"type": "frobnicate", "room": rid}))
        .await;
    ws.expect_error("unknown_type").await;
    last_seq = next_seq(&mut ws, &rid, "unknown type", last_seq).await;

    // Bad room ids.
    for bad in ["zz", "../../etc/passwd", "0123456789ABCDEFG", ""] {
        ws.send_msg(bad, "bad-id", "x").await;
        ws.expect_error("bad_id").await;
        last_seq = next_seq(&mut ws, &rid, &format!("bad room id {bad:?}"), last_seq).await;
    }

    // Text limits: characters, not bytes.
    let c = cid("long");
    ws.send_msg(&rid, &c, &"x".repeat(4097)).await;
    let e = ws.expect_error("message_too_long").await;
    assert!(
        e.get("client_id").is_none_or(|x| x == c.as_str()),
        "error client_id must match the send: {e}"
    );
    last_seq = next_seq(&mut ws, &rid, "a too long text", last_seq).await;
    ws.send_msg(&rid, &cid("empty"), "").await;
    ws.expect_error("message_too_long").await;
    last_seq = next_seq(&mut ws, &rid, "an empty text", last_seq).await;
    let korean = "가".repeat(4096);
    let ack = ws.send_and_ack(&rid, &cid("ko"), &korean).await;
    assert_eq!(
        ack["seq"].as_u64(),
        Some(last_seq + 1),
        "4096 multi-byte chars fit: {ack}"
    );
    last_seq += 1;

    // client_id checks.
    ws.send_json(&json!({"type": "send", "room": rid, "text": "no cid"}))
        .await;
    ws.expect_error_any(&["bad_client_id", "invalid_json"])
        .await;
    ws.send_msg(&rid, "", "empty cid").await;
    ws.expect_error("bad_client_id").await;
    ws.send_msg(&rid, &"c".repeat(65), "long cid").await;
    ws.expect_error("bad_client_id").await;
    ws.send_msg(&rid, &"c".repeat(64), "64-char cid is fine")
        .await;
    ws.expect_ack(&"c".repeat(64)).await;
    last_seq += 1;
    last_seq = next_seq(&mut ws, &rid, "client_id checks", last_seq).await;

    // Invalid UTF-8 in a text frame.
    ws.send_raw_text(vec![b'{', b'"', 0xff, 0xfe, 0xc3, 0x28, b'"', b'}'])
        .await;
    ws.expect_error("invalid_utf8").await;
    last_seq = next_seq(&mut ws, &rid, "invalid UTF-8", last_seq).await;

    // Binary frame.
    ws.send_binary(br#"{"type":"ping"}"#.to_vec()).await;
    ws.expect_error("binary_not_supported").await;
    last_seq = next_seq(&mut ws, &rid, "a binary frame", last_seq).await;

    // A second auth.
    ws.send_json(&json!({"type": "auth", "token": a.token, "resume": {}}))
        .await;
    ws.expect_error("already_authenticated").await;
    last_seq = next_seq(&mut ws, &rid, "a second auth", last_seq).await;

    // read / typing with bad input.
    ws.send_json(&json!({"type": "read", "room": "nope", "seq": 1}))
        .await;
    ws.expect_error("bad_id").await;
    ws.send_json(&json!({"type": "read", "room": rid, "seq": "one"}))
        .await;
    ws.expect_error("invalid_json").await;
    ws.send_json(&json!({"type": "typing", "room": "nope"}))
        .await;
    ws.expect_error("bad_id").await;
    last_seq = next_seq(&mut ws, &rid, "bad read/typing frames", last_seq).await;

    // Nothing bad was stored.
    let hist = api.history_all(&a.token, &rid).await;
    let seqs: Vec<u64> = hist
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=last_seq).collect::<Vec<u64>>(),
        "only the good sends are stored"
    );
    for m in &hist {
        let t = m["text"].as_str().expect("text");
        assert!(
            t.starts_with("still fine") || t == korean || t == "64-char cid is fine",
            "unexpected stored message: {m}"
        );
    }
}

async fn next_seq(ws: &mut Ws, rid: &str, after: &str, last: u64) -> u64 {
    let ack = still_works(ws, rid, after).await;
    let seq = ack["seq"].as_u64().expect("seq");
    assert_eq!(
        seq,
        last + 1,
        "the refused frame ({after}) must not consume a seq"
    );
    seq
}

/// PROTOCOL.md: `invalid_json` = "not JSON, or missing/mistyped fields"; a
/// frame without `type` misses a field (it does not name an unknown type).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_frame_without_type_is_invalid_json() {
    let (srv, a, rid) = setup(&[]).await;
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    let mut wrong = Vec::new();
    for (what, frame) in [
        (
            "no type",
            json!({"room": rid, "client_id": "x", "text": "y"}),
        ),
        ("numeric type", json!({"type": 7})),
        ("a JSON array", json!([1, 2, 3])),
    ] {
        ws.send_json(&frame).await;
        let v = ws
            .expect(&format!("an error for {what}"), |v| {
                v["type"] == "error" || is_end(v)
            })
            .await;
        if v["code"] != "invalid_json" {
            wrong.push(format!("{what} {frame} -> {v}"));
        }
    }
    still_works(&mut ws, &rid, "frames without a string type").await;
    assert!(wrong.is_empty(), "expected invalid_json for: {wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_api_paths_are_404_json() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let u = api.new_user("nf").await;
    let mut wrong = Vec::new();
    for path in [
        "/api/v1/nope",
        "/api/v1/rooms/0123456789abcdef/nope",
        "/api/v2/rooms",
        "/api/nope",
    ] {
        let r = api.get(path, &u.token).await;
        if !(r.0.as_u16() == 404 && r.1["error"]["code"] == "not_found") {
            let body: String = r.1.to_string().chars().take(80).collect();
            wrong.push(format!("GET {path} -> {} {body}", r.0));
        }
    }
    assert!(wrong.is_empty(), "expected 404 not_found for: {wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_with_1009_and_server_keeps_serving() {
    let (srv, a, rid) = setup(&[]).await;
    let mut bystander = Ws::connect_auth(srv.addr, &a.token).await;
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    still_works(&mut ws, &rid, "auth").await;

    let big =
        json!({"type": "send", "room": rid, "client_id": "huge", "text": "y".repeat(100_000)});
    // The write may fail if the server closes early; what matters is what we read.
    let _ = ws
        .try_send_frame(Frame::text(Payload::Owned(
            serde_json::to_vec(&big).expect("json"),
        )))
        .await;
    let v = ws.expect("the connection to close", is_end).await;
    assert_eq!(v["type"], CLOSE, "expected a close frame (1009), got {v}");
    assert_eq!(v["code"], 1009, "close code for an oversized frame: {v}");

    // The server keeps serving: the other connection and new ones work.
    still_works(&mut bystander, &rid, "another client's oversized frame").await;
    let mut fresh = Ws::connect_auth(srv.addr, &a.token).await;
    still_works(&mut fresh, &rid, "another client's oversized frame").await;
    let hist = srv.api().history_all(&a.token, &rid).await;
    assert!(
        hist.iter().all(|m| m["client_id"] != "huge"),
        "the oversized message must not be stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_auth_failures_close_with_4001() {
    let srv = Server::start(&["auth_timeout_secs=1"]);
    let api = srv.api();
    let a = api.new_user("af").await;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad JSON first frame", b"{nope".to_vec()),
        ("non-auth first frame", br#"{"type":"ping"}"#.to_vec()),
        (
            "send before auth",
            br#"{"type":"send","room":"0123456789abcdef","client_id":"x","text":"y"}"#.to_vec(),
        ),
        (
            "garbage token",
            br#"{"type":"auth","token":"garbage","resume":{}}"#.to_vec(),
        ),
        ("auth without token", br#"{"type":"auth"}"#.to_vec()),
    ];
    for (what, raw) in cases {
        let mut ws = Ws::connect(srv.addr).await;
        ws.send_raw_text(raw).await;
        let v = ws.next().await;
        assert_eq!(
            v["type"], "error",
            "{what}: expected an error frame, got {v}"
        );
        assert_eq!(v["code"], "unauthorized", "{what}: {v}");
        assert_eq!(ws.expect_close().await, Some(4001), "{what}: close code");
    }

    // No frame at all: closed after auth_timeout_secs.
    let mut ws = Ws::connect(srv.addr).await;
    let started = std::time::Instant::now();
    let v = ws.next().await;
    assert_eq!(v["type"], "error", "auth timeout: {v}");
    assert_eq!(v["code"], "unauthorized", "auth timeout: {v}");
    assert_eq!(
        ws.expect_close().await,
        Some(4001),
        "auth timeout close code"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "auth_timeout_secs=1 took {:?}",
        started.elapsed()
    );

    // A good auth still works.
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_origin_check() {
    let srv = Server::start(&[]);
    // A foreign Origin is refused with 403 bad_origin.
    let r = api_upgrade(&srv, Some("http://evil.example")).await;
    assert_eq!(
        r.status.as_u16(),
        403,
        "foreign Origin: {} {}",
        r.status,
        r.json
    );
    assert_eq!(r.json["error"]["code"], "bad_origin", "{}", r.json);
    // Same-origin (Origin host == Host) and no Origin are accepted.
    let same = format!("http://{}", srv.addr);
    let ok = Ws::connect_with(
        srv.addr,
        WsOpts {
            origin: Some(same),
            ..WsOpts::default()
        },
    )
    .await;
    assert!(ok.is_ok(), "same-origin upgrade refused: {:?}", ok.err());
}

async fn api_upgrade(srv: &Server, origin: Option<&str>) -> Resp {
    let key = fastwebsockets::handshake::generate_key();
    let mut headers = vec![
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-key", key.as_str()),
        ("sec-websocket-version", "13"),
    ];
    if let Some(o) = origin {
        headers.push(("origin", o));
    }
    srv.api()
        .raw(Method::GET, "/api/v1/ws", "", None, &headers)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input() {
    let (srv, a, rid) = setup(&[]).await;
    let api = srv.api();

    // Malformed JSON / wrong shape.
    let r = api
        .raw(
            Method::POST,
            "/api/v1/signup",
            "",
            Some(b"{\"username\": ".to_vec()),
            &[],
        )
        .await;
    assert_err(&(r.status, r.json), 400, "invalid_json");
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": 5, "password": PASSWORD}),
        )
        .await;
    assert_err(&r, 400, "invalid_json");
    let r = api.post("/api/v1/signup", "", &json!(["a", "b"])).await;
    assert_err(&r, 400, "invalid_json");
    let r = api
        .raw(
            Method::POST,
            &format!("/api/v1/rooms/{rid}/messages"),
            &a.token,
            Some(b"not json at all".to_vec()),
            &[],
        )
        .await;
    assert_err(&(r.status, r.json), 400, "invalid_json");
    let r = api
        .raw(
            Method::POST,
            "/api/v1/login",
            "",
            Some(vec![b'{', 0xff, b'}']),
            &[],
        )
        .await;
    assert_err(&(r.status, r.json), 400, "invalid_json");

    // Bad ids in paths.
    assert_err(
        &api.get("/api/v1/rooms/xyz/messages", &a.token).await,
        400,
        "bad_id",
    );
    assert_err(&api.get("/api/v1/rooms/xyz", &a.token).await, 400, "bad_id");
    assert_err(
        &api.post_message(&a.token, "xyz", "c", "t").await,
        400,
        "bad_id",
    );
    assert_err(
        &api.delete(&format!("/api/v1/rooms/{rid}/members/xyz"), &a.token)
            .await,
        400,
        "bad_id",
    );

    // Message validation over HTTP.
    assert_err(
        &api.post_message(&a.token, &rid, "too-long", &"x".repeat(4097))
            .await,
        400,
        "message_too_long",
    );
    assert_err(
        &api.post_message(&a.token, &rid, "", "empty cid").await,
        400,
        "bad_client_id",
    );
    let r = api
        .get(&format!("/api/v1/rooms/{rid}/messages?limit=abc"), &a.token)
        .await;
    assert_err(&r, 400, "bad_request");

    // Unknown API path, wrong method.
    assert_err(&api.get("/api/v1/nope", &a.token).await, 404, "not_found");
    let r = api
        .raw(Method::PUT, "/api/v1/signup", "", Some(b"{}".to_vec()), &[])
        .await;
    assert_err(&(r.status, r.json), 405, "method_not_allowed");

    // No token.
    assert_err(&api.get("/api/v1/rooms", "").await, 401, "unauthorized");
    assert_err(
        &api.post_message("", &rid, "c", "t").await,
        401,
        "unauthorized",
    );

    // Oversized body.
    let big =
        serde_json::to_vec(&json!({"text": "z".repeat(70_000), "client_id": "big"})).expect("json");
    let r = api
        .raw(
            Method::POST,
            &format!("/api/v1/rooms/{rid}/messages"),
            &a.token,
            Some(big),
            &[],
        )
        .await;
    assert_err(&(r.status, r.json), 413, "payload_too_large");

    // Nothing was stored, and the server still works.
    let hist = api.history_all(&a.token, &rid).await;
    assert!(hist.is_empty(), "bad requests stored messages: {hist:?}");
    let (st, m) = api.post_message(&a.token, &rid, "fine", "fine").await;
    assert_eq!(st.as_u16(), 201, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_ui_and_security_headers() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let r = api.raw(Method::GET, "/healthz", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(r.json, json!({"status": "ok"}));

    for path in ["/", "/some/ui/route"] {
        let r = api.raw(Method::GET, path, "", None, &[]).await;
        assert_eq!(r.status.as_u16(), 200, "GET {path}");
        let ct = r.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("text/html"),
            "GET {path}: content-type {ct:?}"
        );
        let body = String::from_utf8_lossy(&r.body).to_lowercase();
        assert!(
            body.contains("<html") || body.contains("<!doctype html"),
            "GET {path}: not HTML"
        );
        let csp = r
            .header("content-security-policy")
            .unwrap_or_else(|| panic!("GET {path}: no Content-Security-Policy header"));
        assert!(
            csp.contains("'self'"),
            "CSP should restrict to own origin: {csp}"
        );
        assert_security_headers(&r, path);
    }
    // Every response carries the headers, API errors included.
    let r = api.raw(Method::GET, "/api/v1/me", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 401);
    assert_security_headers(&r, "/api/v1/me");
    assert!(
        r.header("content-security-policy").is_some(),
        "CSP on API responses too"
    );
    let r = api.raw(Method::GET, "/healthz", "", None, &[]).await;
    assert_security_headers(&r, "/healthz");

    let r = api.raw(Method::GET, "/metrics", "", None, &[]).await;
    assert_eq!(r.status.as_u16(), 200, "/metrics");
}

fn assert_security_headers(r: &Resp, path: &str) {
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{path}"
    );
    assert_eq!(
        r.header("referrer-policy").as_deref(),
        Some("no-referrer"),
        "{path}"
    );
    assert_eq!(
        r.header("x-frame-options")
            .map(|s| s.to_uppercase())
            .as_deref(),
        Some("DENY"),
        "{path}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_send_rate_limit() {
    let (srv, a, rid) = setup(&["send_rate_per_sec=1", "send_burst=3"]).await;
    let mut ws = Ws::connect_auth(srv.addr, &a.token).await;
    for k in 0..6 {
        ws.send_msg(&rid, &format!("rl-{k}"), "burst").await;
    }
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    while acked.len() + limited.len() < 6 {
        let v = ws
            .expect("ack or rate_limited", |v| {
                v["type"] == "ack" || v["type"] == "error" || is_end(v)
            })
            .await;
        match v["type"].as_str() {
            Some("ack") => acked.push(v["client_id"].as_str().expect("cid").to_string()),
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited.push(v);
            }
            _ => panic!("connection ended under rate limiting: {v}"),
        }
    }
    assert!(
        (3..=4).contains(&acked.len()),
        "burst 3 (+ at most one refill): acked {acked:?}"
    );
    assert_eq!(
        &acked[..3],
        &["rl-0", "rl-1", "rl-2"],
        "the first sends pass"
    );
    ws.ping().await;
    let hist = srv.api().history_all(&a.token, &rid).await;
    assert_eq!(hist.len(), acked.len(), "refused sends are not stored");
}
