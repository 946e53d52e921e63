//! The HTTP and WebSocket surface: routing, request/response helpers and one
//! file per resource. Handlers validate input, then read and write only
//! through the storage interface (`AppState::storage`, a
//! [`crate::storage::Storage`]); they never see the backend underneath.

mod accounts;
pub(crate) mod assets;
mod body;
mod export;
mod messages;
pub mod reads;
mod rooms;
mod search;
pub mod shared;
mod status;
mod wallet;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::error::ApiError;

pub use accounts::valid_username;
pub use body::Body;
pub use messages::validate_send_limits;
pub use shared::{AppState, UserBudgets, caller, json, no_content, parse_id, query, read_json};
pub(crate) use shared::{finish, method_not_allowed, no_such_endpoint, read_body};

/// Entry point for every HTTP request.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let span = tracing::debug_span!("req", id = state.next_request.fetch_add(1, std::sync::atomic::Ordering::Relaxed), %method, path = %req.uri().path());
    let (route, result) = tracing::Instrument::instrument(route(&state, req, peer), span).await;
    let resp = finish(route, &method, started, result);
    let live = &*state.live;
    crate::telemetry::LiveStats::add(&live.http_requests, 1);
    if resp.status().is_server_error() {
        crate::telemetry::LiveStats::add(&live.http_errors, 1);
    }
    resp
}

async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let m = req.method().clone();
    let get = m == Method::GET || m == Method::HEAD;
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
            json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        }),
        ["readyz"] => on!("/readyz", get, async { readiness(state) }),
        ["metrics"] => on!("/metrics", get, async {
            crate::status::check_metrics_access(&state.config.server, &req, peer)?;
            Ok(metrics_page(state))
        }),
        ["api", "v1", rest @ ..] => match rest {
            ["signup"] => on!(
                "/signup",
                m == Method::POST,
                accounts::signup(state, req, peer)
            ),
            ["login"] => on!(
                "/login",
                m == Method::POST,
                accounts::login(state, req, peer)
            ),
            ["logout"] => on!("/logout", m == Method::POST, accounts::logout(state, req)),
            ["me"] => on!("/me", get, accounts::me(state, req)),
            ["me", "export"] => on!("/me/export", get, export::me(state, req)),
            ["me", "privacy"] => match m {
                Method::GET => ("/me/privacy", accounts::privacy(state, req).await),
                Method::PUT => ("/me/privacy", accounts::set_privacy(state, req).await),
                _ => ("/me/privacy", Err(method_not_allowed())),
            },
            ["users"] => on!("/users", get, accounts::search_users(state, req)),
            ["users", id] => on!("/users/{id}", get, accounts::get_user(state, req, id)),
            ["search"] => on!("/search", get, search::search(state, req)),
            ["wallet"] => on!("/wallet", get, wallet::get(state, req)),
            ["wallet", "transactions"] => on!(
                "/wallet/transactions",
                get,
                wallet::transactions(state, req)
            ),
            ["wallet", "transfers"] => on!(
                "/wallet/transfers",
                m == Method::POST,
                wallet::create(state, req)
            ),
            ["wallet", "transfers", id] => match m {
                Method::GET => (
                    "/wallet/transfers/{id}",
                    wallet::get_transfer(state, req, id).await,
                ),
                Method::DELETE => (
                    "/wallet/transfers/{id}",
                    wallet::cancel(state, req, id).await,
                ),
                _ => ("/wallet/transfers/{id}", Err(method_not_allowed())),
            },
            ["contacts"] => match m {
                Method::GET => ("/contacts", accounts::contacts(state, req).await),
                Method::POST => ("/contacts", accounts::add_contact(state, req).await),
                _ => ("/contacts", Err(method_not_allowed())),
            },
            ["contacts", id] => on!(
                "/contacts/{id}",
                m == Method::DELETE,
                accounts::remove_contact(state, req, id)
            ),
            ["rooms"] => match m {
                Method::GET => ("/rooms", rooms::list(state, req).await),
                Method::POST => ("/rooms", rooms::create(state, req).await),
                _ => ("/rooms", Err(method_not_allowed())),
            },
            ["rooms", id] => on!("/rooms/{id}", get, rooms::get(state, req, id)),
            ["rooms", id, "export"] => on!("/rooms/{id}/export", get, export::room(state, req, id)),
            ["rooms", id, "members"] => {
                on!(
                    "/rooms/{id}/members",
                    m == Method::POST,
                    rooms::add_member(state, req, id)
                )
            }
            ["rooms", id, "members", uid] => on!(
                "/rooms/{id}/members/{user}",
                m == Method::DELETE,
                rooms::remove_member(state, req, id, uid)
            ),
            ["rooms", id, "messages"] => match m {
                Method::GET => (
                    "/rooms/{id}/messages",
                    messages::history(state, req, id).await,
                ),
                Method::POST => ("/rooms/{id}/messages", messages::post(state, req, id).await),
                _ => ("/rooms/{id}/messages", Err(method_not_allowed())),
            },
            ["ws"] => on!("/ws", get, ws::upgrade(state, req)),
            ["status"] => on!("/status", get, status::get(state, req, peer)),
            ["status", "ws"] => on!("/status/ws", get, status::stream(state, req, peer)),
            _ => ("other", Err(no_such_endpoint(&path))),
        },
        ["api", ..] => ("other", Err(no_such_endpoint(&path))),
        ["cluster", "v1", rest @ ..] if state.cluster.is_some() => {
            crate::cluster::node::route(state, req, rest).await
        }
        ["status"] => on!("/status", get, async {
            // Without a token only allowed addresses get the page; with one,
            // the page asks for it and the data checks it.
            if state.config.server.status_token.is_empty() {
                status::check_access(state, &req, peer)?;
            }
            Ok(assets::serve("status.html"))
        }),
        _ => on!("/ui", get, async { Ok(assets::serve(&path)) }),
    }
}

/// `GET /readyz`: 200 while the store takes writes; 507 `storage_full` or
/// 503 `storage_error` (with the state and since when) while it does not.
/// `/healthz` stays liveness: the process answers.
fn readiness(state: &AppState) -> Result<Response<Body>, ApiError> {
    let health = &state.storage.health();
    match health.refusal() {
        None => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Some(e) => {
            let body = serde_json::json!({
                "error": {"code": e.code, "message": e.message},
                "storage": health.state().as_str(),
                "since": health.since_ms(),
                "detail": health.detail(),
            });
            let mut resp = json(e.status, &body)?;
            if let Some(secs) = e.retry_after
                && let Ok(v) = HeaderValue::from_str(&secs.to_string())
            {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Ok(resp)
        }
    }
}

fn metrics_page(state: &AppState) -> Response<Body> {
    if let Some(ix) = &state.search {
        // The index's lag and health as of now, even while its indexer
        // waits out a back-off.
        ix.update_gauges(state.storage.committed());
    }
    let mut resp = Response::new(Body::full(Bytes::from(crate::telemetry::render(
        &state.metrics,
        &state.config.server.data_dir,
    ))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
