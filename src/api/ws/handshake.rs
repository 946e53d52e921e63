//! A connection's opening, before it has a session: the upgrade request
//! (origin, headers, the 101 answer), the first message, which must be a
//! valid `auth` (with the rooms to resume), and the refusal of a
//! connection that may not go on (an error frame, then a close). Shared
//! with the proxy.

use std::collections::HashMap;
use std::time::Duration;

use fastwebsockets::{Frame, Payload, WebSocket};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::parse::{Incoming_, Reassembler};
use crate::api::shared::Body;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::frames;
use crate::hub::close;

/// The upgraded connection under a session.
pub(crate) type Io = TokioIo<Upgraded>;

/// Checks a WebSocket upgrade request (origin, headers); answers the
/// 101 response and the future of the upgraded connection. Shared with the
/// proxy.
pub(crate) fn accept(
    allowed_origins: &[String],
    mut req: Request<Incoming>,
) -> Result<(Response<Body>, fastwebsockets::upgrade::UpgradeFut), ApiError> {
    check_origin(allowed_origins, &req)?;
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(ApiError::bad_request(
            "bad_request",
            "expected a WebSocket upgrade request",
        ));
    }
    let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| ApiError::bad_request("bad_request", format!("bad WebSocket upgrade: {e}")))?;
    Ok((resp.map(|_| Body::empty()), fut))
}

/// Browsers send `Origin`; it must be the page's own origin or configured.
/// (Also for the status page's WebSocket.)
pub(crate) fn check_origin(allowed: &[String], req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(origin) = req.headers().get("origin").and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    if allowed.iter().any(|o| o == origin) {
        return Ok(());
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
    if !host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "bad_origin",
        "WebSocket connections from this origin are not allowed",
    ))
}

#[derive(Deserialize)]
struct AuthFrame {
    token: String,
    #[serde(default)]
    resume: HashMap<String, u64>,
}

/// Sets a new connection's limits and reads its first complete message
/// (answering pings meanwhile); Err on timeout.
async fn first_message(
    ws: &mut WebSocket<Io>,
    max_frame: usize,
    timeout: Duration,
) -> (Result<Incoming_, tokio::time::error::Elapsed>, Reassembler) {
    ws.set_auto_close(false);
    ws.set_auto_pong(false);
    ws.set_max_message_size(max_frame.saturating_add(1));
    let mut asm = Reassembler::new(max_frame);
    let first = tokio::time::timeout(timeout, async {
        loop {
            let frame = ws.read_frame().await;
            match asm.feed(frame) {
                Some(Incoming_::Ping(p)) => {
                    let pong = ws.write_frame(Frame::pong(Payload::Owned(p))).await;
                    if pong.is_err() {
                        return Incoming_::Gone;
                    }
                }
                Some(m) => return m,
                None => {}
            }
        }
    })
    .await;
    (first, asm)
}

/// Reads a new connection's first message, which must be a valid `auth`.
/// None: the connection was answered (refused with 4001, or closed) and
/// ends. Boxed by the callers: the session task lives as long as the
/// connection, and this future is used once. Shared with the proxy.
pub(crate) async fn auth_first(
    ws: &mut WebSocket<Io>,
    auth: &crate::auth::Auth,
    limits: &crate::config::LimitsConfig,
) -> Option<(Caller, HashMap<String, u64>, Reassembler)> {
    let timeout = Duration::from_secs(limits.auth_timeout_secs);
    let (first, asm) = first_message(ws, limits.max_frame_bytes, timeout).await;
    let refused = match first {
        Ok(Incoming_::Text(bytes)) => match authenticate(auth, &bytes) {
            Ok((caller, resume)) => return Some((caller, resume, asm)),
            Err(e) => e.message,
        },
        Ok(Incoming_::TooBig) => {
            let _ = ws
                .write_frame(Frame::close(close::TOO_BIG, b"frame too large"))
                .await;
            return None;
        }
        Ok(Incoming_::Gone | Incoming_::Close) => return None,
        Ok(_) => "the first frame must be a JSON auth frame".into(),
        Err(_) => "no auth frame in time".into(),
    };
    reject(ws, "unauthorized", &refused, close::UNAUTHORIZED).await;
    None
}

fn authenticate(
    auth: &crate::auth::Auth,
    bytes: &[u8],
) -> Result<(Caller, HashMap<String, u64>), ApiError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|_| ApiError::unauthorized("the first frame must be a JSON auth frame"))?;
    if v.get("type").and_then(|t| t.as_str()) != Some("auth") {
        return Err(ApiError::unauthorized(
            "the first frame must be {\"type\":\"auth\",…}",
        ));
    }
    let frame: AuthFrame = serde_json::from_value(v)
        .map_err(|e| ApiError::unauthorized(format!("bad auth frame: {e}")))?;
    let caller = auth.verify(&frame.token)?;
    Ok((caller, frame.resume))
}

/// Refuses a connection before its session starts: an `error` frame with
/// `code`, then a close with `close_code` (reason: the code).
pub(crate) async fn reject(ws: &mut WebSocket<Io>, code: &str, message: &str, close_code: u16) {
    let err = frames::error(code, message, None, None);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.write_frame(Frame::text(Payload::Borrowed(&err))).await;
        let _ = ws
            .write_frame(Frame::close(close_code, code.as_bytes()))
            .await;
    })
    .await;
}
