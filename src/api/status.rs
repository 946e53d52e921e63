//! `GET /api/v1/status` (JSON) and `GET /api/v1/status/ws` (the samples,
//! pushed every second): the server's status board and live totals
//! ([`crate::status`]) and its figures now, behind the status access rule.

use std::net::SocketAddr;
use std::sync::Arc;

use fastwebsockets::{Frame, OpCode, Payload};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::shared::{AppState, Body, json};
use crate::error::ApiError;
use crate::status::{Gauges, Source, StatusBoard, Totals};
use crate::telemetry::{LiveStats, ProcessStats};

/// Whether `peer` may see this node's status (see
/// [`crate::status::check_access_with`]).
pub fn check_access(
    state: &AppState,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<(), ApiError> {
    crate::status::check_access_with(&state.config.server, req, peer)
}

impl Source for AppState {
    fn board(&self) -> &StatusBoard {
        &self.status
    }

    fn live(&self) -> &LiveStats {
        &self.live
    }

    fn gauges(&self) -> Gauges {
        let (search_lag_messages, search_lag_seconds) = match &self.search {
            Some(ix) => ix.status.lag(self.storage.committed()),
            None => (0, 0.0),
        };
        Gauges {
            connections: self.connections.open() as u64,
            sessions: self.hub.online_sessions() as u64,
            search_lag_messages,
            search_lag_seconds,
            storage: self.storage.health().state().as_str(),
        }
    }
}

/// `GET /api/v1/status[?history=0]`.
pub async fn get(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    check_access(state, &req, peer)?;
    let with_history = !super::shared::query(&req)
        .iter()
        .any(|(k, v)| k == "history" && v == "0");
    let history = state.status.history();
    let proc_ = ProcessStats::of("self").unwrap_or_default();
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "git": crate::telemetry::GIT_HASH,
        "started_at": state.status.started_ms,
        "uptime_secs": state.status.started.elapsed().as_secs(),
        "connections": state.connections.open(),
        "sessions": state.hub.online_sessions(),
        "rss_bytes": proc_.rss_bytes,
        "open_fds": proc_.open_fds,
        "threads": proc_.threads,
        "totals": Totals::of(&state.live),
        "storage": {
            "backend": state.storage.backend(),
            "state": state.storage.health().state().as_str(),
            "since": state.storage.health().since_ms(),
            "detail": state.storage.health().detail(),
            "database": state.storage.database(),
        },
        "search": state
            .search
            .as_ref()
            .map(|ix| ix.status_json(state.storage.committed())),
        "store": serde_json::json!({
            "damaged_records": state.storage.damaged_records(),
            "scrub": state.scrub.as_ref().map(|s| s.snapshot()),
        }),
        "now": history.last(),
        "history": if with_history { history } else { Vec::new() },
    });
    json(StatusCode::OK, &body)
}

/// `GET /api/v1/status/ws`: the history, then a sample every second.
pub async fn stream(
    state: &Arc<AppState>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    check_access(state, &req, peer)?;
    super::ws::check_origin(&state.config.server.allowed_origins, &req)?;
    let protocol = req.headers().get("sec-websocket-protocol").cloned();
    let (mut resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| ApiError::bad_request("bad_request", format!("bad WebSocket upgrade: {e}")))?;
    if let Some(p) = protocol.and_then(|p| p.to_str().ok().map(str::to_string)) {
        // Echo the token sub-protocol, or browsers drop the connection.
        if let Some(chosen) = p
            .split(',')
            .map(str::trim)
            .find(|x| x.starts_with("status."))
            && let Ok(v) = hyper::header::HeaderValue::from_str(chosen)
        {
            resp.headers_mut().insert("sec-websocket-protocol", v);
        }
    }
    let slot = state.connections.take();
    let state = state.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let Ok(mut ws) = fut.await else {
            return;
        };
        let mut updates = state.status.updates.subscribe();
        let mut shutdown = state.shutdown.clone();
        let first = serde_json::json!({"type": "history", "samples": state.status.history()});
        if ws.write_frame(text(first)).await.is_err() {
            return;
        }
        loop {
            let sample = tokio::select! {
                s = updates.recv() => match s {
                    Ok(s) => s,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
                _ = shutdown.changed() => {
                    let _ = ws.write_frame(Frame::close(1001, b"shutting down")).await;
                    return;
                }
            };
            let msg = serde_json::json!({"type": "sample", "sample": sample});
            if ws.write_frame(text(msg)).await.is_err() {
                return;
            }
        }
    });
    Ok(resp.map(|_| Body::empty()))
}

fn text(v: serde_json::Value) -> Frame<'static> {
    Frame::new(
        true,
        OpCode::Text,
        None,
        Payload::Owned(v.to_string().into_bytes()),
    )
}
