//! Request forwarding: a client request relayed as it is to the node that
//! owns it (method, path and query, the caller's token, the client's
//! address) and the node's answer relayed back — whole, or streamed for
//! exports. The token is checked here first: the nodes trust the proxy's
//! check of revocations.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response};
use serde_json::Value;

use super::link::read_all;
use super::state::Proxy;
use crate::api::Body;
use crate::error::ApiError;

/// A request with its whole body (within `max_body_bytes`).
pub(super) async fn whole_request(
    p: &Proxy,
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes), ApiError> {
    let (parts, incoming) = req.into_parts();
    Ok((
        parts,
        crate::api::read_body(&p.config.server, incoming).await?,
    ))
}

/// [`whole_request`] whose body must be JSON (400 `invalid_json`).
pub(super) async fn json_request(
    p: &Proxy,
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, Bytes, Value), ApiError> {
    let (parts, body) = whole_request(p, req).await?;
    let v = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?;
    Ok((parts, body, v))
}

/// Forwards after checking the caller's token here (the nodes trust the
/// proxy's check of revocations).
pub(super) async fn forward_checked(
    p: &Arc<Proxy>,
    node: usize,
    req: Request<Incoming>,
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    p.caller(&req)?;
    forward(p, node, req, stream).await
}

/// Sends the request to node `node` as it is and answers with its answer.
pub(super) async fn forward(
    p: &Arc<Proxy>,
    node: usize,
    req: Request<Incoming>,
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = whole_request(p, req).await?;
    forward_parts(p, node, &parts, body, stream).await
}

pub(super) async fn forward_parts(
    p: &Arc<Proxy>,
    node: usize,
    parts: &hyper::http::request::Parts,
    body: Bytes,
    stream: bool,
) -> Result<Response<Body>, ApiError> {
    let path = parts
        .uri
        .path_and_query()
        .map(|x| x.as_str())
        .unwrap_or("/");
    let mut headers = Vec::new();
    if let Some(a) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        headers.push(("authorization", a.to_string()));
    }
    if let Some(a) = parts
        .headers
        .get(crate::cluster::link::CLIENT_IP_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        headers.push((crate::cluster::link::CLIENT_IP_HEADER, a.to_string()));
    }
    let resp = p
        .nodes
        .link(node)
        .request(parts.method.clone(), path, &headers, body)
        .await?;
    let status = resp.status();
    let mut out_headers = hyper::HeaderMap::new();
    for h in [
        header::CONTENT_TYPE,
        header::CONTENT_DISPOSITION,
        header::RETRY_AFTER,
        header::CACHE_CONTROL,
    ] {
        if let Some(v) = resp.headers().get(&h) {
            out_headers.insert(h, v.clone());
        }
    }
    let body = if stream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let mut upstream = resp.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = upstream.frame().await {
                if let Ok(data) = frame.into_data()
                    && tx.send(data).await.is_err()
                {
                    return;
                }
            }
        });
        Body::stream(rx)
    } else {
        let (_, _, bytes) = read_all(resp).await?;
        Body::full(bytes)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = out_headers;
    Ok(r)
}
