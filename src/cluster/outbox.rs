//! The cluster outbox: operations one node owes another, written in the
//! same transaction as what caused them and retried until the other node
//! confirms them (docs/SCALEOUT.md, "Operations that touch several owners").
//! Both kinds are idempotent on the receiving node, so a retry after a lost
//! confirmation changes nothing:
//! - a payment message (wallet node → the chat's node), keyed by its
//!   `client_id` `pay-<transfer id>` in the room;
//! - a signup bonus (user's node → wallet node), keyed `signup-<user id>`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::api::shared::AppState;
use crate::writes::Op;

pub use crate::writes::outbox::OutboxItem;

/// Sends one link request to another node over a short-lived HTTP/1.1
/// connection (outbox traffic is rare: payments and signups).
async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
    body: Vec<u8>,
) -> Result<StatusCode, String> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(crate::cluster::link::HEADER, token)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// Forwards outbox entries to their nodes, oldest first, until confirmed;
/// a node that is down is retried with back-off (0.5 s doubling to 10 s).
pub async fn run(state: Arc<AppState>, wake: Arc<tokio::sync::Notify>) {
    // Only a node with its own shard (the embedded store) has an outbox.
    let (Some(cluster), Some(store)) = (state.cluster.clone(), state.store.clone()) else {
        return;
    };
    let me = format!("node-{}", cluster.me.as_deref().unwrap_or("?"));
    let mut backoff = Duration::from_millis(500);
    let mut shutdown = state.shutdown.clone();
    loop {
        let items = store.outbox(256).unwrap_or_default();
        metrics::gauge!("confab_cluster_outbox_pending").set(items.len() as f64);
        let mut failed = false;
        for (key, bytes) in &items {
            let Ok(item) = serde_json::from_slice::<OutboxItem>(bytes) else {
                tracing::error!(key, "unreadable outbox entry; dropped");
                let _ = state.storage.submit(Op::OutboxDone { key: *key }).await;
                continue;
            };
            let (ring_key, path) = item.target();
            let owner = cluster.ring.owner(ring_key);
            let Some(node) = cluster.nodes.iter().find(|n| n.id == owner) else {
                continue;
            };
            let token = crate::cluster::link::issue(&cluster.secret, &me);
            match post(node.addr, path, &token, bytes.clone()).await {
                Ok(s) if s.is_success() => {
                    let _ = state.storage.submit(Op::OutboxDone { key: *key }).await;
                    metrics::counter!("confab_cluster_outbox_sent_total").increment(1);
                }
                Ok(s) if s.is_client_error() => {
                    // The other node will never accept it (a bug, not an
                    // outage): keep it, say so loudly, go on with the rest.
                    tracing::error!(key, status = %s, node = %node.id, "outbox entry refused");
                    failed = true;
                }
                other => {
                    tracing::warn!(key, node = %node.id, result = ?other, "outbox: node unavailable; will retry");
                    failed = true;
                    break;
                }
            }
        }
        let wait = if failed {
            backoff = (backoff * 2).min(Duration::from_secs(10));
            backoff
        } else {
            backoff = Duration::from_millis(500);
            if items.len() >= 256 {
                continue;
            }
            Duration::from_secs(30)
        };
        tokio::select! {
            _ = wake.notified(), if !failed => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
