//! `GET /api/v1/me/export` and `GET /api/v1/rooms/{id}/export`: the
//! caller's own data, or a room they are a member of, as JSON Lines
//! (`application/x-ndjson`), streamed from one consistent snapshot. Each
//! export is admitted by the bounds of [`export::Exports`] (one per user,
//! `export_concurrency` server-wide) before anything is sent.

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};

use super::shared::{AppState, Body, caller, parse_id};
use crate::error::ApiError;
use crate::export::Scope;
use crate::ids::{RoomId, UserId};

pub async fn me(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let name = state
        .storage
        .user(c.user)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?
        .username;
    stream(
        state,
        c.user,
        Scope::User(c.user),
        &format!("confab-{name}"),
    )
    .await
}

pub async fn room(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let room: RoomId = parse_id(id)?;
    state.storage.check_member(room, c.user).await?;
    stream(
        state,
        c.user,
        Scope::Room(room),
        &format!("confab-room-{room}"),
    )
    .await
}

/// Starts the export for `user` if its bounds admit it (429 / 503
/// otherwise, before any byte of the body).
async fn stream(
    state: &AppState,
    user: UserId,
    scope: Scope,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let slot = state.exports.admit(Some(user))?;
    let rx = state.storage.export(scope, slot).await?;
    metrics::counter!("confab_exports_total").increment(1);
    let mut resp = Response::new(Body::stream(rx));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.jsonl\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
