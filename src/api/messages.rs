//! Messages over HTTP: history and sending (same durability as a WebSocket
//! `send`: the reply comes after the commit).

use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::shared::{AppState, Body, caller, json, parse_id, query, read_json};
use crate::error::ApiError;
use crate::ids::RoomId;
use crate::writes::{Op, Origin};

#[derive(Deserialize)]
struct PostBody {
    text: String,
    client_id: Option<String>,
}

/// Checks a message's `client_id` and text against the limits.
pub fn validate_send(
    state: &AppState,
    client_id: Option<&str>,
    text: &str,
) -> Result<(), ApiError> {
    validate_send_limits(&state.config.limits, client_id, text)
}

/// [`validate_send`] against `limits` (a proxy checks before forwarding).
pub fn validate_send_limits(
    limits: &crate::config::LimitsConfig,
    client_id: Option<&str>,
    text: &str,
) -> Result<(), ApiError> {
    match client_id {
        Some(c) if !c.is_empty() && c.chars().count() <= 64 => {}
        _ => {
            return Err(ApiError::bad_request(
                "bad_client_id",
                "client_id is required: 1–64 characters, unique per message",
            ));
        }
    }
    let max = limits.max_text_chars;
    if text.is_empty() || text.chars().count() > max {
        return Err(ApiError::bad_request(
            "message_too_long",
            format!("message text must be 1–{max} characters"),
        ));
    }
    Ok(())
}

pub async fn history(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let room: RoomId = parse_id(id)?;
    let (mut after, mut before, mut limit) = (None, None, 50usize);
    let num = |v: &str, name: &str| {
        v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(
                "bad_request",
                format!("{name} must be a non-negative number"),
            )
        })
    };
    for (k, v) in query(&req) {
        match k.as_str() {
            "after" => after = Some(num(&v, "after")?),
            "before" => before = Some(num(&v, "before")?),
            "limit" => limit = num(&v, "limit")? as usize,
            _ => {}
        }
    }
    let messages = state
        .storage
        .history(room, c.user, after, before, limit.clamp(1, 200))
        .await?;
    json(StatusCode::OK, &serde_json::json!({"messages": messages}))
}

pub async fn post(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let c = caller(state, &req).await?;
    let room: RoomId = parse_id(id)?;
    let body: PostBody = read_json(state, req).await?;
    validate_send(state, body.client_id.as_deref(), &body.text)?;
    state.budgets.take_send(c.user)?;
    metrics::counter!("confab_messages_received_total").increment(1);
    crate::telemetry::LiveStats::add(&state.live.received, 1);
    let (msg, duplicate) = state
        .storage
        .call(|reply| Op::Send {
            room,
            from: c.user,
            client_id: body.client_id.unwrap_or_default(),
            text: body.text,
            origin: Origin::Http(reply),
            received: Instant::now(),
        })
        .await?;
    json(
        if duplicate {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        &msg,
    )
}
