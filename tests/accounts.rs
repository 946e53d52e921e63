//! Accounts and tokens: signup, login, logout, me, login rate limit, forged /
//! tampered / expired / revoked tokens, user search, contacts.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_login_me_logout() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let name = uname("Alice");

    // Signup: 201 {token, user}; the name is stored lowercase.
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": name, "password": PASSWORD, "display_name": "Alice Liddell"}),
        )
        .await;
    assert_status(&r, 201);
    let signup_token = r.1["token"].as_str().expect("token").to_string();
    let user = r.1["user"].clone();
    let uid = user["id"].as_str().expect("user.id").to_string();
    assert_eq!(
        user["username"],
        name.to_lowercase(),
        "username is stored lowercase"
    );
    assert_eq!(user["display_name"], "Alice Liddell");

    // display_name defaults to the username.
    let bob = uname("bob");
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": bob, "password": PASSWORD}),
        )
        .await;
    assert_status(&r, 201);
    assert_eq!(r.1["user"]["display_name"], bob);

    // Duplicate (case-insensitively) → 409 username_taken.
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": name.to_uppercase(), "password": PASSWORD}),
        )
        .await;
    assert_err(&r, 409, "username_taken");

    // me with the signup token.
    let r = api.get("/api/v1/me", &signup_token).await;
    assert_status(&r, 200);
    assert_eq!(r.1["id"], uid.as_str());
    assert_eq!(r.1["username"], name.to_lowercase());

    // Login (case-insensitive username) → 200 {token, user}.
    let r = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": name.to_uppercase(), "password": PASSWORD}),
        )
        .await;
    assert_status(&r, 200);
    let login_token = r.1["token"].as_str().expect("token").to_string();
    assert_eq!(r.1["user"]["id"], uid.as_str());

    // Wrong password and unknown user: the same 401 invalid_credentials.
    let r = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": name, "password": "wrong password"}),
        )
        .await;
    assert_err(&r, 401, "invalid_credentials");
    let r = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": uname("nobody"), "password": PASSWORD}),
        )
        .await;
    assert_err(&r, 401, "invalid_credentials");

    // Logout revokes that token only.
    let r = api.post("/api/v1/logout", &signup_token, &json!({})).await;
    assert_status(&r, 204);
    let r = api.get("/api/v1/me", &signup_token).await;
    assert_err(&r, 401, "unauthorized");
    let r = api.post("/api/v1/logout", &signup_token, &json!({})).await;
    assert_err(&r, 401, "unauthorized");
    let r = api.get("/api/v1/me", &login_token).await;
    assert_status(&r, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_validation() {
    let srv = Server::start(&[]);
    let api = srv.api();
    for bad in [
        "ab",
        "has space",
        "semi;colon",
        "ünïcode",
        &"x".repeat(33),
        "",
    ] {
        let r = api
            .post(
                "/api/v1/signup",
                "",
                &json!({"username": bad, "password": PASSWORD}),
            )
            .await;
        assert_err(&r, 400, "invalid_username");
    }
    // 3 and 32 characters with every allowed character class are fine.
    let ok3 = format!("a{}", &uname("")[1..3]);
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": ok3, "password": PASSWORD}),
        )
        .await;
    assert_status(&r, 201);
    let mut ok32 = format!("A.b-c_{}", uname("x"));
    ok32.truncate(32);
    while ok32.len() < 32 {
        ok32.push('9');
    }
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": ok32, "password": PASSWORD}),
        )
        .await;
    assert_status(&r, 201);

    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": uname("pw"), "password": "short"}),
        )
        .await;
    assert_err(&r, 400, "invalid_password");
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": uname("pw"), "password": "p".repeat(257)}),
        )
        .await;
    assert_err(&r, 400, "invalid_password");
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": uname("dn"), "password": PASSWORD, "display_name": "bad\u{7}name"}),
        )
        .await;
    assert_err(&r, 400, "invalid_display_name");
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": uname("dn"), "password": PASSWORD, "display_name": ""}),
        )
        .await;
    assert_err(&r, 400, "invalid_display_name");
    // Unknown fields are ignored.
    let r = api
        .post(
            "/api/v1/signup",
            "",
            &json!({"username": uname("extra"), "password": PASSWORD, "favourite_colour": "blue"}),
        )
        .await;
    assert_status(&r, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_rate_limit() {
    let srv = Server::start(&["login_max_attempts=3"]);
    let api = srv.api();
    let u = api.new_user("rl").await;
    let other = api.new_user("rl2").await;

    for i in 0..3 {
        let r = api
            .post(
                "/api/v1/login",
                "",
                &json!({"username": u.username, "password": "nope nope"}),
            )
            .await;
        assert_err(&r, 401, "invalid_credentials");
        let _ = i;
    }
    // The 4th attempt is refused even with the right password.
    let r = api
        .raw(
            Method::POST,
            "/api/v1/login",
            "",
            Some(
                serde_json::to_vec(&json!({"username": u.username, "password": PASSWORD}))
                    .expect("json"),
            ),
            &[],
        )
        .await;
    assert_eq!(
        r.status.as_u16(),
        429,
        "4th login attempt: {} {}",
        r.status,
        r.json
    );
    assert_eq!(r.json["error"]["code"], "rate_limited", "{}", r.json);
    let retry = r.header("retry-after").expect("429 must carry Retry-After");
    let secs: u64 = retry
        .trim()
        .parse()
        .expect("Retry-After is integer seconds");
    assert!(
        (1..=60).contains(&secs),
        "Retry-After {secs} outside 1..=60 (window 60 s)"
    );

    // Another username from the same IP is unaffected.
    let r = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": other.username, "password": PASSWORD}),
        )
        .await;
    assert_status(&r, 200);
    // The existing token of the limited user still works.
    assert_status(&api.get("/api/v1/me", &u.token).await, 200);
}

const SECRET: &str = "integration-test-secret-0123456789";

fn mint(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("mint jwt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_expired_tokens() {
    let secret_setting = format!("jwt_secret={SECRET}");
    let srv = Server::start(&[&secret_setting]);
    let api = srv.api();
    let a = api.new_user("tok").await;
    let b = api.new_user("tok").await;
    let now = now_secs();

    // Control: a token we mint with the configured secret is accepted, so the
    // failures below are about the property under test.
    let good = mint(
        SECRET,
        &json!({"sub": a.id, "iat": now, "exp": now + 3600, "jti": cid("jti")}),
    );
    let r = api.get("/api/v1/me", &good).await;
    assert_status(&r, 200);
    assert_eq!(r.1["id"], a.id.as_str());

    // Expired an hour ago.
    let expired = mint(
        SECRET,
        &json!({"sub": a.id, "iat": now - 7200, "exp": now - 3600, "jti": cid("jti")}),
    );
    assert_err(&api.get("/api/v1/me", &expired).await, 401, "unauthorized");

    // Signed with another secret.
    let forged = mint(
        "some-other-secret",
        &json!({"sub": a.id, "iat": now, "exp": now + 3600, "jti": cid("jti")}),
    );
    assert_err(&api.get("/api/v1/me", &forged).await, 401, "unauthorized");

    // Tampered: a real token with its payload changed to B's id, signature kept.
    let parts: Vec<&str> = a.token.split('.').collect();
    assert_eq!(parts.len(), 3, "token is a JWT: {}", a.token);
    let mut claims: Value = serde_json::from_slice(&b64url_decode(parts[1])).expect("claims json");
    for k in ["sub", "iat", "exp", "jti"] {
        assert!(
            !claims[k].is_null(),
            "server token lacks claim `{k}`: {claims}"
        );
    }
    claims["sub"] = Value::from(b.id.clone());
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64url_encode(&serde_json::to_vec(&claims).expect("json")),
        parts[2]
    );
    assert_err(&api.get("/api/v1/me", &tampered).await, 401, "unauthorized");

    // Signature bytes changed (a character in the middle of the signature).
    let sig = parts[2];
    let mid = sig.len() / 2;
    let flipped = if &sig[mid..mid + 1] == "A" { "B" } else { "A" };
    let bad_sig = format!(
        "{}.{}.{}{}{}",
        parts[0],
        parts[1],
        &sig[..mid],
        flipped,
        &sig[mid + 1..]
    );
    assert_err(&api.get("/api/v1/me", &bad_sig).await, 401, "unauthorized");

    // alg=none.
    let none = format!(
        "{}.{}.",
        b64url_encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64url_encode(
            &serde_json::to_vec(
                &json!({"sub": a.id, "iat": now, "exp": now + 3600, "jti": cid("jti")})
            )
            .expect("json")
        )
    );
    assert_err(&api.get("/api/v1/me", &none).await, 401, "unauthorized");

    // Garbage, missing, and a non-Bearer scheme.
    assert_err(
        &api.get("/api/v1/me", "not-a-jwt").await,
        401,
        "unauthorized",
    );
    assert_err(&api.get("/api/v1/me", "").await, 401, "unauthorized");
    let r = api
        .raw(
            Method::GET,
            "/api/v1/me",
            "",
            None,
            &[("authorization", &format!("Basic {}", a.token))],
        )
        .await;
    assert_eq!(
        r.status.as_u16(),
        401,
        "non-Bearer auth: {} {}",
        r.status,
        r.json
    );

    // A valid token for a user id that does not exist.
    let ghost = mint(
        SECRET,
        &json!({"sub": "00000000deadbeef", "iat": now, "exp": now + 3600, "jti": cid("jti")}),
    );
    assert_err(&api.get("/api/v1/me", &ghost).await, 401, "unauthorized");

    // The same tokens are refused on the WebSocket with error + 4001.
    for (what, tok) in [
        ("expired", &expired),
        ("forged", &forged),
        ("tampered", &tampered),
    ] {
        let mut ws = Ws::connect(srv.addr).await;
        ws.send_json(&json!({"type": "auth", "token": tok, "resume": {}}))
            .await;
        let v = ws.next().await;
        assert_eq!(
            v["type"], "error",
            "{what} token on WS: expected error frame, got {v}"
        );
        assert_eq!(v["code"], "unauthorized", "{what} token on WS: {v}");
        assert_eq!(
            ws.expect_close().await,
            Some(4001),
            "{what} token on WS: close code"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expires_after_ttl() {
    let srv = Server::start(&["token_ttl_secs=1"]);
    let api = srv.api();
    let u = api.new_user("ttl").await;
    let issued = Instant::now();
    // Poll: valid at first (maybe), 401 within ttl + clock granularity.
    loop {
        let r = api.get("/api/v1/me", &u.token).await;
        if r.0 == StatusCode::UNAUTHORIZED {
            assert_err(&r, 401, "unauthorized");
            break;
        }
        assert_status(&r, 200);
        assert!(
            issued.elapsed() < Duration::from_secs(6),
            "token with token_ttl_secs=1 still accepted after {:?}",
            issued.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_closes_websockets_with_4001() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let u = api.new_user("lo").await;
    let r = api
        .post(
            "/api/v1/login",
            "",
            &json!({"username": u.username, "password": PASSWORD}),
        )
        .await;
    assert_status(&r, 200);
    let other_token = r.1["token"].as_str().expect("token").to_string();

    let mut ws1 = Ws::connect_auth(srv.addr, &u.token).await;
    let mut ws2 = Ws::connect_auth(srv.addr, &u.token).await;
    let mut survivor = Ws::connect_auth(srv.addr, &other_token).await;

    assert_status(&api.post("/api/v1/logout", &u.token, &json!({})).await, 204);
    assert_eq!(
        ws1.expect_close().await,
        Some(4001),
        "WS 1 with the revoked token"
    );
    assert_eq!(
        ws2.expect_close().await,
        Some(4001),
        "WS 2 with the revoked token"
    );
    // A session on another token of the same user stays open.
    survivor.ping().await;

    // The revoked token cannot authenticate a new WebSocket.
    let mut ws3 = Ws::connect(srv.addr).await;
    ws3.send_json(&json!({"type": "auth", "token": u.token, "resume": {}}))
        .await;
    let v = ws3.next().await;
    assert_eq!(v["type"], "error", "auth with revoked token: {v}");
    assert_eq!(v["code"], "unauthorized", "auth with revoked token: {v}");
    assert_eq!(ws3.expect_close().await, Some(4001));
    assert_err(&api.get("/api/v1/me", &u.token).await, 401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_search_by_prefix() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let base = uname("srch");
    let me = api.signup(&format!("{base}_me")).await;
    let mut names = Vec::new();
    for s in ["gamma", "alpha", "beta"] {
        let n = format!("{base}_{s}");
        api.signup(&n).await;
        names.push(n);
    }
    let _unrelated = api.new_user("zz").await;

    let r = api
        .get(
            &format!("/api/v1/users?q={}", base.to_uppercase()),
            &me.token,
        )
        .await;
    assert_status(&r, 200);
    let got: Vec<String> = r.1["users"]
        .as_array()
        .expect("users array")
        .iter()
        .map(|u| u["username"].as_str().expect("username").to_string())
        .collect();
    let mut want: Vec<String> = names.clone();
    want.push(format!("{base}_me"));
    want.sort();
    assert_eq!(got, want, "prefix search, case-insensitive, sorted");
    for u in r.1["users"].as_array().expect("users") {
        assert!(
            u["id"].is_string() && u["display_name"].is_string(),
            "user object: {u}"
        );
        assert!(
            u.get("password").is_none() && u.get("password_hash").is_none(),
            "user object leaks secrets: {u}"
        );
    }

    let r = api
        .get(&format!("/api/v1/users?q={base}_b"), &me.token)
        .await;
    assert_status(&r, 200);
    assert_eq!(r.1["users"].as_array().expect("users").len(), 1, "{}", r.1);
    assert_eq!(r.1["users"][0]["username"], format!("{base}_beta"));

    let r = api
        .get(&format!("/api/v1/users?q={base}&limit=2"), &me.token)
        .await;
    assert_status(&r, 200);
    let got: Vec<&str> = r.1["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["username"].as_str().expect("username"))
        .collect();
    assert_eq!(
        got,
        vec![want[0].as_str(), want[1].as_str()],
        "limit=2 keeps the first two"
    );

    assert_err(
        &api.get("/api/v1/users?q=", &me.token).await,
        400,
        "bad_request",
    );
    assert_err(
        &api.get("/api/v1/users", &me.token).await,
        400,
        "bad_request",
    );
    assert_err(
        &api.get(&format!("/api/v1/users?q={base}"), "").await,
        401,
        "unauthorized",
    );

    // By id: the same public profile; bad and unknown ids are told apart.
    let someone = &r.1["users"][0];
    let id = someone["id"].as_str().expect("id");
    let r = api.get(&format!("/api/v1/users/{id}"), &me.token).await;
    assert_status(&r, 200);
    assert_eq!(&r.1, someone, "the profile by id equals the one by name");
    assert_err(
        &api.get("/api/v1/users/not-an-id", &me.token).await,
        400,
        "bad_id",
    );
    assert_err(
        &api.get("/api/v1/users/0123456789abcdef", &me.token).await,
        404,
        "user_not_found",
    );
    assert_err(
        &api.get(&format!("/api/v1/users/{id}"), "").await,
        401,
        "unauthorized",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_add_list_delete() {
    let srv = Server::start(&[]);
    let api = srv.api();
    let a = api.new_user("ca").await;
    let b = api.new_user("cb").await;
    let c = api.new_user("cc").await;

    let r = api.get("/api/v1/contacts", &a.token).await;
    assert_status(&r, 200);
    assert_eq!(r.1["contacts"], json!([]), "new user has no contacts");

    let r = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": b.username}),
        )
        .await;
    assert_status(&r, 201);
    assert_eq!(r.1["id"], b.id.as_str());
    let r = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": b.username.to_uppercase()}),
        )
        .await;
    assert_status(&r, 200);
    assert_eq!(r.1["id"], b.id.as_str());
    let r = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": c.username}),
        )
        .await;
    assert_status(&r, 201);

    let r = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": uname("ghost")}),
        )
        .await;
    assert_err(&r, 404, "user_not_found");
    let r = api
        .post(
            "/api/v1/contacts",
            &a.token,
            &json!({"username": a.username}),
        )
        .await;
    assert_err(&r, 400, "bad_request");

    let r = api.get("/api/v1/contacts", &a.token).await;
    assert_status(&r, 200);
    let mut ids: Vec<&str> = r.1["contacts"]
        .as_array()
        .expect("contacts array")
        .iter()
        .map(|u| u["id"].as_str().expect("id"))
        .collect();
    ids.sort();
    let mut want = vec![b.id.as_str(), c.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    // Contacts are per user.
    let r = api.get("/api/v1/contacts", &b.token).await;
    assert_eq!(r.1["contacts"], json!([]), "B's contacts: {}", r.1);

    assert_status(
        &api.delete(&format!("/api/v1/contacts/{}", b.id), &a.token)
            .await,
        204,
    );
    assert_status(
        &api.delete(&format!("/api/v1/contacts/{}", b.id), &a.token)
            .await,
        204,
    );
    assert_err(
        &api.delete("/api/v1/contacts/not-an-id!", &a.token).await,
        400,
        "bad_id",
    );
    let r = api.get("/api/v1/contacts", &a.token).await;
    let ids: Vec<&str> = r.1["contacts"]
        .as_array()
        .expect("contacts array")
        .iter()
        .map(|u| u["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec![c.id.as_str()]);
    assert_err(&api.get("/api/v1/contacts", "").await, 401, "unauthorized");
}
