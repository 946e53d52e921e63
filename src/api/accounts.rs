//! Accounts: signup, login, logout, me, user search, contacts.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::{AppState, Body, caller, json, no_content, parse_id, query, read_json};
use crate::error::ApiError;
use crate::ids::UserId;
use crate::store::writer::Op;

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

fn valid_display_name(d: &str) -> bool {
    let n = d.chars().count();
    (1..=64).contains(&n) && !d.chars().any(char::is_control) && !d.trim().is_empty()
}

pub async fn signup(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: SignupBody = read_json(state, req).await?;
    if !valid_username(&body.username) {
        return Err(ApiError::bad_request(
            "invalid_username",
            "usernames are 3–32 characters: letters, digits, _ . -",
        ));
    }
    if !(8..=256).contains(&body.password.len()) {
        return Err(ApiError::bad_request(
            "invalid_password",
            "passwords are 8–256 bytes long",
        ));
    }
    let display_name = body.display_name.unwrap_or_else(|| body.username.clone());
    if !valid_display_name(&display_name) {
        return Err(ApiError::bad_request(
            "invalid_display_name",
            "display names are 1–64 characters without control characters",
        ));
    }
    if let Some(c) = &state.cluster
        && !c.owns(crate::cluster::ring::username_key(&body.username))
    {
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_node",
            format!(
                "node {} does not own this username (node {} does); sign up through confab proxy",
                c.me.as_deref().unwrap_or("?"),
                c.ring.username_owner(&body.username)
            ),
        ));
    }
    if state.store.user_by_name(&body.username)?.is_some() {
        return Err(taken());
    }
    let password_hash = state.auth.hash_password(body.password).await?;
    let user = state
        .writer
        .call(|reply| Op::CreateUser {
            username: body.username,
            display_name,
            password_hash,
            placement: state.cluster.clone(),
            reply,
        })
        .await?;
    let token = state.auth.issue(user.id)?;
    json(
        StatusCode::CREATED,
        &serde_json::json!({"token": token, "user": user}),
    )
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
    // Through a cluster proxy, the login rate limit counts the client's
    // address, which the proxy names on its (authenticated) link request.
    let mut peer = peer;
    if state.cluster.is_some()
        && let Some(ip) = req
            .headers()
            .get(crate::cluster::link::CLIENT_IP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<std::net::IpAddr>().ok())
        && crate::cluster::node::link_proxy(state, &req).is_ok()
    {
        peer = SocketAddr::new(ip, 0);
    }
    let body: LoginBody = read_json(state, req).await?;
    let outcome = login_inner(state, body, peer).await;
    metrics::counter!("confab_logins_total", "outcome" => match &outcome {
        Ok(_) => "ok",
        Err(e) => e.code,
    })
    .increment(1);
    let live = &crate::status::LIVE;
    crate::status::LiveStats::add(
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
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    state.auth.login_attempt(&body.username, peer.ip())?;
    let found = if valid_username(&body.username) {
        state.store.user_by_name(&body.username)?
    } else {
        None
    };
    let hash = found.as_ref().map(|(_, r)| r.password_hash.clone());
    if !state.auth.verify_password(hash, body.password).await? {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong username or password",
        ));
    }
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
    let c = caller(state, &req)?;
    let jti = c.jti.clone();
    state
        .writer
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
    let c = caller(state, &req)?;
    let user = state
        .store
        .user(c.user)?
        .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
    json(StatusCode::OK, &user)
}

/// `GET /api/v1/users/{id}`: a user's public profile (any signed-in user
/// may look anyone up by id, as by name in `GET /users`).
pub async fn get_user(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    caller(state, &req)?;
    let id: UserId = parse_id(id)?;
    let user = state.store.user(id)?.ok_or_else(ApiError::user_not_found)?;
    json(StatusCode::OK, &user)
}

pub async fn search_users(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    caller(state, &req)?;
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
    let users = state.store.search_users(q, limit.clamp(1, 50))?;
    json(StatusCode::OK, &serde_json::json!({"users": users}))
}

pub async fn contacts(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req)?;
    let contacts = state.store.contacts(c.user)?;
    json(StatusCode::OK, &serde_json::json!({"contacts": contacts}))
}

pub async fn add_contact(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req)?;
    let body: ContactBody = read_json(state, req).await?;
    let who = match (body.username, body.user_id) {
        (_, Some(id)) => crate::store::writer::Contact::Id(id),
        (Some(name), None) => crate::store::writer::Contact::Name(name),
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_json",
                "give the contact's `username` or `user_id`",
            ));
        }
    };
    let (user, added) = state
        .writer
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
    let c = caller(state, &req)?;
    let contact: UserId = parse_id(id)?;
    state
        .writer
        .call(|reply| Op::RemoveContact {
            owner: c.user,
            contact,
            reply,
        })
        .await?;
    no_content()
}
