//! What every part of the API uses: the application state ([`AppState`])
//! and the request helpers — the caller behind a token, JSON bodies and
//! answers, query strings, ids, the error response and security headers.
//! Below the handlers and the router (`api/mod.rs`), which import it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;

use crate::auth::{Auth, Caller};
use crate::config::Config;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::storage::Storage;
use crate::store::Store;

pub use super::body::Body;

/// Everything a request handler or session needs; one per server.
pub struct AppState {
    pub config: Config,
    /// Where everything is read and written: the storage interface
    /// (`storage/`). Handlers use nothing else of the store.
    pub storage: Arc<dyn Storage>,
    /// The embedded store underneath, for what only it has: backups,
    /// `confab check`, export snapshots, the scrub and the search indexer
    /// (the operator's surfaces and the services, not the handlers). None
    /// on a node whose storage is PostgreSQL (`database_url`).
    pub store: Option<Store>,
    pub hub: Arc<Hub>,
    pub auth: Auth,
    pub metrics: PrometheusHandle,
    /// Flips to true on shutdown; sessions watch it.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub next_session: std::sync::atomic::AtomicU64,
    /// The next request's number (its log span's `id`).
    pub next_request: std::sync::atomic::AtomicU64,
    /// The next proxy event stream's number (`cluster::node`).
    pub next_link: std::sync::atomic::AtomicU64,
    /// Open TCP connections, HTTP and upgraded WebSocket alike, bounded by
    /// `max_connections` in all and `max_connections_per_ip` per address.
    pub connections: Arc<crate::limits::Connections>,
    /// The message search index (None when `search_enabled` is off).
    pub search: Option<Arc<crate::search::SearchIndex>>,
    /// The running totals the hot path counts into (`/status`); the hub
    /// and the writer were given the same.
    pub live: Arc<crate::telemetry::LiveStats>,
    /// The last 15 minutes, one sample a second (`/status`).
    pub status: crate::status::StatusBoard,
    /// This node's cluster (None for a single node).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// What one user may do to the others through this node, over all of
    /// their sessions (docs/ARCHITECTURE.md, "Limits").
    pub budgets: UserBudgets,
    /// The exports running now, within `export_concurrency` and one per
    /// user (HTTP).
    pub exports: Arc<crate::export::Exports>,
    /// The one backup at a time (the operator's and the periodic ones).
    pub backups: crate::backup::Backups,
    /// What the store's background scrub found (None: it does not run).
    pub scrub: Option<Arc<crate::store::integrity::Scrub>>,
}

impl AppState {
    /// The embedded store, for what only it has (the server's own backups
    /// and `confab check`); on a PostgreSQL node, 501 `not_on_postgres`
    /// saying what to use instead.
    pub fn embedded(&self, what: &str) -> Result<&Store, ApiError> {
        self.store.as_ref().ok_or_else(|| {
            ApiError::new(
                hyper::StatusCode::NOT_IMPLEMENTED,
                "not_on_postgres",
                format!(
                    "{what} is not taken by a node whose storage is PostgreSQL: \
                     `confab backup` with the node's config reads the database itself; \
                     the database checks its own pages (docs/SCALEOUT.md, \"Backups\")"
                ),
            )
        })
    }
}

/// Per-user budgets, shared by all of a user's sessions (here and behind
/// proxies) and their HTTP requests.
pub struct UserBudgets {
    /// `user_send_rate_per_sec` / `user_send_burst`: messages a user stores.
    pub sends: crate::limits::KeyedBuckets<crate::ids::UserId>,
    /// `typing_interval_ms`: typing events a user's rooms get.
    pub typing: crate::limits::TypingGate,
    /// Read positions, merged before they reach the writer.
    pub reads: Arc<super::reads::ReadMerger>,
}

impl UserBudgets {
    pub fn new(
        limits: &crate::config::LimitsConfig,
        reads: Arc<super::reads::ReadMerger>,
    ) -> UserBudgets {
        UserBudgets {
            sends: crate::limits::KeyedBuckets::new(
                f64::from(limits.user_send_rate_per_sec),
                f64::from(limits.user_send_burst),
            ),
            typing: crate::limits::TypingGate::new(std::time::Duration::from_millis(
                limits.typing_interval_ms,
            )),
            reads,
        }
    }

    /// Takes one of `user`'s sends; 429 `rate_limited` past the budget.
    pub fn take_send(&self, user: crate::ids::UserId) -> Result<(), ApiError> {
        self.sends.take(&user).map_err(|wait| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many messages from your account; slow down",
            );
            e.retry_after = Some(wait.as_secs().max(1));
            e
        })
    }
}

/// The response to send for a routed request (errors as JSON, the security
/// headers), counted in the request metrics. Shared with the proxy.
pub(crate) fn finish(
    route: &'static str,
    method: &Method,
    started: Instant,
    result: Result<Response<Body>, ApiError>,
) -> Response<Body> {
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    secure_headers(&mut resp);
    let status = resp.status().as_u16().to_string();
    metrics::counter!("confab_http_requests_total", "route" => route, "method" => method.to_string(), "status" => status)
        .increment(1);
    metrics::histogram!("confab_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

pub(crate) fn no_such_endpoint(path: &str) -> ApiError {
    ApiError::not_found("not_found", format!("no such endpoint: {path}"))
}

pub(crate) fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
}

pub fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(ApiError::internal)?;
    let mut resp = Response::new(Body::full(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

pub fn no_content() -> Result<Response<Body>, ApiError> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut resp = Response::new(Body::full(Bytes::from(e.body().to_string())));
    *resp.status_mut() = e.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = e.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if e.status == StatusCode::REQUEST_TIMEOUT || e.status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body is not read: this connection is done.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn secure_headers(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; \
             script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
}

/// The caller, from `Authorization: Bearer <token>`; or, on a cluster node,
/// from a proxy's link request acting for a user (`x-confab-user`: the proxy
/// checked that user's token).
pub async fn caller(state: &AppState, req: &Request<Incoming>) -> Result<Caller, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        if state.cluster.is_some()
            && let Some(user) = req.headers().get(crate::cluster::link::USER_HEADER)
        {
            crate::cluster::link::link_proxy(state.cluster.as_deref(), req)?;
            let user = user
                .to_str()
                .ok()
                .and_then(|u| u.parse().ok())
                .ok_or_else(|| ApiError::unauthorized("x-confab-user is not a user id"))?;
            return Ok(Caller {
                user,
                jti: String::new(),
                exp: i64::MAX,
            });
        }
        return Err(crate::auth::no_bearer_token());
    };
    let caller = state.auth.verify(crate::auth::bearer_token(value)?)?;
    // A correctly signed token of a user this store does not have (a store
    // restored from an older backup, a token of another server with the
    // same secret) is not a login. A cluster node holds only some of the
    // users (the proxy checks tokens against every node's revocations).
    if state.cluster.is_none() && state.storage.user(caller.user).await?.is_none() {
        return Err(ApiError::unauthorized("the token's user no longer exists"));
    }
    Ok(caller)
}

/// Reads a whole request body: at most `max_body_bytes` (413 above), within
/// `request_body_timeout_secs` of the headers (408 and the connection is
/// closed after, so a client that sends one byte a minute holds nothing for
/// long). Shared with the proxy.
pub(crate) async fn read_body(
    server: &crate::config::ServerConfig,
    body: Incoming,
) -> Result<Bytes, ApiError> {
    let limit = server.max_body_bytes;
    let deadline = std::time::Duration::from_secs(server.request_body_timeout_secs);
    let collected = tokio::time::timeout(deadline, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            )
        })?;
    collected.map(|c| c.to_bytes()).map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request bodies are limited to {limit} bytes"),
            )
        } else {
            ApiError::bad_request("bad_request", "could not read the request body")
        }
    })
}

/// Reads a JSON body (see [`read_body`]).
pub async fn read_json<T: DeserializeOwned>(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let body = read_body(&state.config.server, req.into_body()).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
}

/// Query string parameters, percent-decoded.
pub fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, ApiError> {
    s.parse().map_err(|_| ApiError::bad_id())
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("a%20b+c"), "a b c");
        assert_eq!(super::percent_decode("%EC%B1%84"), "채");
        assert_eq!(super::percent_decode("100%"), "100%");
        assert_eq!(super::percent_decode("%zz"), "%zz");
    }
}
