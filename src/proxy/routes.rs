//! The proxy's route table: each request's route name (for the metrics)
//! and where it goes — answered here (health, status, metrics, the UI),
//! upgraded to a WebSocket session, or forwarded to the node that serves
//! its room, its caller, its username or the wallet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::cross_node::{by_username, create_room};
use super::forward::{forward, forward_checked};
use super::state::Proxy;
use super::status::{metrics_page, readiness, status_json, status_page};
use super::ws;
use crate::api::{Body, json, method_not_allowed, no_such_endpoint};
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};

pub(super) async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let (route, result) = route(&proxy, req, peer).await;
    crate::api::finish(route, &method, started, result)
}

async fn route(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let m = req.method().clone();
    let get = m == Method::GET || m == Method::HEAD;
    let post = m == Method::POST;
    macro_rules! on {
        ($name:literal, $ok:expr, $call:expr) => {
            if $ok {
                ($name, $call.await)
            } else {
                ($name, Err(method_not_allowed()))
            }
        };
    }
    match segs.as_slice() {
        ["healthz"] => on!("/healthz", get, async {
            json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok", "role": "proxy"}),
            )
        }),
        ["readyz"] => on!("/readyz", get, async { readiness(p) }),
        ["metrics"] => on!("/metrics", get, async {
            crate::status::check_metrics_access(&p.config.server, &req, peer)?;
            Ok(metrics_page(p))
        }),
        ["status"] => on!("/status", get, async {
            crate::status::check_access_with(&p.config.server, &req, peer)?;
            Ok(status_page(p))
        }),
        ["api", "v1", rest @ ..] => match rest {
            ["status"] => on!("/status", get, async {
                crate::status::check_access_with(&p.config.server, &req, peer)?;
                json(StatusCode::OK, &status_json(p))
            }),
            ["ws"] => on!("/ws", get, ws::upgrade(p, req)),
            ["signup"] => on!("/signup", post, by_username(p, req, peer)),
            ["login"] => on!("/login", post, by_username(p, req, peer)),
            // Lists and searches: every node has every room and the whole
            // search index; the caller's node answers.
            ["users"] => on!("/users", get, by_caller(p, req, false)),
            ["search"] => on!("/search", get, by_caller(p, req, false)),
            ["rooms"] if get => ("/rooms", by_caller(p, req, false).await),
            ["rooms"] => on!("/rooms", post, create_room(p, req)),
            ["rooms", id, rest @ ..] => {
                let stream = rest == ["export"];
                (
                    "/rooms/{id}",
                    match id.parse::<RoomId>() {
                        Ok(room) => forward_checked(p, p.nodes.room_node(room), req, stream).await,
                        Err(_) => Err(ApiError::bad_id()),
                    },
                )
            }
            ["users", id] => (
                "/users/{id}",
                match id.parse::<UserId>() {
                    Ok(u) => forward_checked(p, p.nodes.user_node(u), req, false).await,
                    Err(_) => Err(ApiError::bad_id()),
                },
            ),
            ["wallet", ..] => (
                "/wallet",
                forward_checked(p, p.nodes.wallet_node(), req, false).await,
            ),
            ["logout"] | ["me"] | ["me", "export" | "privacy"] | ["contacts", ..] => {
                let stream = rest == ["me", "export"];
                ("/me", by_caller(p, req, stream).await)
            }
            _ => ("other", Err(no_such_endpoint(&path))),
        },
        ["api", ..] | ["cluster", ..] => ("other", Err(no_such_endpoint(&path))),
        _ => on!("/ui", get, async { Ok(crate::api::assets::serve(&path)) }),
    }
}

/// A request about the caller: to the node that serves the caller, after
/// the token is checked here.
async fn by_caller(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    let c = p.caller(&req)?;
    forward(p, p.nodes.user_node(c.user), req, stream).await
}
