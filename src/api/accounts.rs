//! Accounts: signup, login, logout, me, user search, contacts.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::shared::{AppState, Body, caller, json, no_content, parse_id, query, read_json};
use crate::error::ApiError;
use crate::ids::UserId;
use crate::writes::Op;

#[derive(Deserialize)]
struct SignupBody {
    username: String,
    password: String,
    display_name: Option<String>,
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
    password: String,
}

/// `{username}` or `{user_id}`.
#[derive(Deserialize)]
struct ContactBody {
    username: Option<String>,
    user_id: Option<UserId>,
}

pub fn valid_username(u: &str) -> bool {
    (3..=32).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A display name as it is stored: Unicode NFC, runs of white space made
/// one space, trimmed; 1–64 characters, no control or invisible formatting
/// characters (bidi overrides, zero-width spaces, …) except the joiner
/// inside an emoji sequence. So a name looks like what it is: it cannot
/// reorder the text around it or hide characters.
pub fn display_name(raw: &str) -> Result<String, ApiError> {
    use unicode_normalization::UnicodeNormalization;
    let bad = |why: &str| {
        Err(ApiError::bad_request(
            "invalid_display_name",
            format!("display names are 1–64 characters: {why}"),
        ))
    };
    let nfc: String = raw.nfc().collect();
    let chars: Vec<char> = nfc.chars().collect();
    let mut out = String::with_capacity(nfc.len());
    for (i, &c) in chars.iter().enumerate() {
        if c.is_whitespace() {
            if !out.is_empty() && !out.ends_with(' ') {
                out.push(' ');
            }
            continue;
        }
        if c.is_control() {
            return bad("no control characters");
        }
        if c == '\u{200d}' {
            let emoji = |c: Option<&char>| c.is_some_and(|&c| is_emoji(c));
            if emoji(i.checked_sub(1).and_then(|j| chars.get(j))) && emoji(chars.get(i + 1)) {
                out.push(c);
                continue;
            }
            return bad("no invisible characters");
        }
        if is_invisible(c) {
            return bad("no invisible or text-direction characters");
        }
        out.push(c);
    }
    let out = out.trim_end().to_string();
    let n = out.chars().count();
    if n == 0 {
        return bad("not only spaces");
    }
    if n > 64 {
        return bad("this one is too long");
    }
    Ok(out)
}

/// Format characters that change how text around them shows, or do not
/// show themselves.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}'
        | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{feff}' | '\u{ffa0}' | '\u{fff0}'..='\u{fffb}'
        | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e007f}')
}

/// Pictographs that may be joined into one emoji by U+200D.
fn is_emoji(c: char) -> bool {
    matches!(c, '\u{2600}'..='\u{27bf}' | '\u{1f000}'..='\u{1faff}' | '\u{fe0f}')
}

pub async fn signup(
    state: &AppState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let ip = client_ip(state, &req, peer);
    let body: SignupBody = read_json(state, req).await?;
    if !valid_username(&body.username) {
        return Err(ApiError::bad_request(
            "invalid_username",
            "usernames are 3–32 characters: letters, digits, _ . -",
        ));
    }
    crate::auth::check_password(&body.username, &body.password)?;
    let display_name = display_name(body.display_name.as_deref().unwrap_or(&body.username))?;
    if state.storage.user_by_name(&body.username).await?.is_some() {
        return Err(taken());
    }
    if !display_name.eq_ignore_ascii_case(&body.username)
        && state.storage.user_by_name(&display_name).await?.is_some()
    {
        return Err(ApiError::bad_request(
            "invalid_display_name",
            "that display name is another user's username",
        ));
    }
    state.auth.check_signup(ip)?;
    let password_hash = state.auth.hash_password(ip, body.password).await?;
    let user = state
        .storage
        .call(|reply| Op::CreateUser {
            username: body.username,
            display_name,
            password_hash,
            reply,
        })
        .await?;
    state.auth.signed_up(ip);
    let token = state.auth.issue(user.id)?;
    json(
        StatusCode::CREATED,
        &serde_json::json!({"token": token, "user": user}),
    )
}

/// The client's address: the connection's, or through a cluster proxy the
/// one the proxy names on its (authenticated) link request — what the login
/// and signup limits count.
fn client_ip(state: &AppState, req: &Request<Incoming>, peer: SocketAddr) -> std::net::IpAddr {
    if state.cluster.is_some()
        && let Some(ip) = req
            .headers()
            .get(crate::cluster::link::CLIENT_IP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<std::net::IpAddr>().ok())
        && crate::cluster::link::link_proxy(state.cluster.as_deref(), req).is_ok()
    {
        return ip;
    }
    peer.ip()
}

fn taken() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "username_taken",
        "that username is taken",
    )
}

pub async fn login(
    state: &AppState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let ip = client_ip(state, &req, peer);
    let body: LoginBody = read_json(state, req).await?;
    let outcome = login_inner(state, body, ip).await;
    metrics::counter!("confab_logins_total", "outcome" => match &outcome {
        Ok(_) => "ok",
        Err(e) => e.code,
    })
    .increment(1);
    let live = &*state.live;
    crate::telemetry::LiveStats::add(
        if outcome.is_ok() {
            &live.logins_ok
        } else {
            &live.logins_failed
        },
        1,
    );
    outcome
}

async fn login_inner(
    state: &AppState,
    body: LoginBody,
    ip: std::net::IpAddr,
) -> Result<Response<Body>, ApiError> {
    let wrong = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong username or password",
        )
    };
    // A malformed username cannot be anyone's: refused at once, and nothing
    // about it is kept but a failure of the address.
    if !valid_username(&body.username) {
        state.auth.check_login_ip(ip)?;
        state.auth.login_failed(None, ip);
        return Err(wrong());
    }
    state.auth.check_login(&body.username, ip)?;
    let found = state.storage.user_by_name(&body.username).await?;
    let hash = found.as_ref().map(|(_, r)| r.password_hash.clone());
    if !state.auth.verify_password(ip, hash, body.password).await? {
        state.auth.login_failed(Some(&body.username), ip);
        return Err(wrong());
    }
    state.auth.login_succeeded(&body.username, ip);
    let Some((id, rec)) = found else {
        return Err(ApiError::internal("verified a password without a user"));
    };
    let token = state.auth.issue(id)?;
    let user = crate::store::User {
        id,
        username: rec.username,
        display_name: rec.display_name,
    };
    json(
        StatusCode::OK,
        &serde_json::json!({"token": token, "user": user}),
    )
}

pub async fn logout(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let jti = c.jti.clone();
    state
        .storage
        .call(|reply| Op::Revoke {
            jti,
            exp: c.exp,
            reply,
        })
        .await?;
    state.auth.revoke(c.jti.clone(), c.exp);
    state.hub.close_token(c.user, &c.jti, c.exp);
    no_content()
}

pub async fn me(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let user = state
        .storage
        .user(c.user)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
    json(StatusCode::OK, &user)
}

/// `GET /api/v1/me/privacy`: who sees the caller's presence and who may add
/// them to groups.
pub async fn privacy(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    json(StatusCode::OK, &state.storage.privacy(c.user).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivacyBody {
    presence: Option<crate::store::Audience>,
    group_adds: Option<crate::store::Audience>,
}

/// `PUT /api/v1/me/privacy` `{presence?, group_adds?}`: changes what is
/// given. Peers who no longer see the caller's presence are told it is
/// unknown (offline, no last seen) at once.
pub async fn set_privacy(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let body: PrivacyBody = read_json(state, req).await?;
    let (before, after) = state
        .storage
        .call(|reply| Op::SetPrivacy {
            user: c.user,
            presence: body.presence,
            group_adds: body.group_adds,
            reply,
        })
        .await?;
    if before.presence != after.presence {
        super::ws::privacy_changed(state, c.user).await;
    }
    json(StatusCode::OK, &after)
}

/// `GET /api/v1/users/{id}`: a user's public profile (any signed-in user
/// may look anyone up by id, as by name in `GET /users`).
pub async fn get_user(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    caller(state, &req).await?;
    let id: UserId = parse_id(id)?;
    let user = state
        .storage
        .user(id)
        .await?
        .ok_or_else(ApiError::user_not_found)?;
    json(StatusCode::OK, &user)
}

pub async fn search_users(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    caller(state, &req).await?;
    let mut q = String::new();
    let mut limit = 20usize;
    for (k, v) in query(&req) {
        match k.as_str() {
            "q" => q = v,
            "limit" => {
                limit = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("bad_request", "limit must be a number"))?
            }
            _ => {}
        }
    }
    let q = q.trim();
    if q.is_empty() {
        return Err(ApiError::bad_request(
            "bad_request",
            "q (a username prefix) is required",
        ));
    }
    let users = state.storage.search_users(q, limit.clamp(1, 50)).await?;
    json(StatusCode::OK, &serde_json::json!({"users": users}))
}

pub async fn contacts(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let contacts = state.storage.contacts(c.user).await?;
    json(StatusCode::OK, &serde_json::json!({"contacts": contacts}))
}

pub async fn add_contact(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let body: ContactBody = read_json(state, req).await?;
    let who = match (body.username, body.user_id) {
        (_, Some(id)) => crate::writes::Contact::Id(id),
        (Some(name), None) => crate::writes::Contact::Name(name),
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_json",
                "give the contact's `username` or `user_id`",
            ));
        }
    };
    let (user, added) = state
        .storage
        .call(|reply| Op::AddContact {
            owner: c.user,
            who,
            reply,
        })
        .await?;
    json(
        if added {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &user,
    )
}

pub async fn remove_contact(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let contact: UserId = parse_id(id)?;
    state
        .storage
        .call(|reply| Op::RemoveContact {
            owner: c.user,
            contact,
            reply,
        })
        .await?;
    no_content()
}
