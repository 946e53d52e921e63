//! A node's side of the proxy links (docs/SCALEOUT.md, "The proxy").
//!
//! Every request here carries a link token (`x-confab-link`):
//! - `GET /cluster/v1/events`: the proxy's event stream. One line per event:
//!   a small JSON header, a tab, and the frame exactly as a client gets it
//!   (`{"to":[users],"skip":session,"room":…,"seq":…}\t{frame}`); or a
//!   control line (`{"hello":…}`, `{"revoke":…}`, `{"ping":…}`).
//! - `POST /cluster/v1/attach`: `{"ops":[["a",user],["d",user],…]}` attaches
//!   (the proxy has a session of the user) or detaches users, in order.
//!   For each attached user it answers `user\tP\tpresence-frame` lines (the
//!   peers of their direct chats here) and `user\tH\troom\tseq` lines: each
//!   of their rooms here with its highest seq, read after the attach, so
//!   every later message reaches the proxy as an event.
//! - `POST /cluster/v1/frames`: the proxy's stream of client frames
//!   (`send`, `read`, `typing`), one line each: `session\tuser\tframe`. Each
//!   runs as the node runs its own sessions' frames; the answer (ack, error)
//!   goes down the event stream with `"only":session`, in order with the
//!   receipts and messages it precedes on a single node.
//!
//! Link requests may also use the public API for a user by id
//! (`x-confab-user` instead of a bearer token; see [`crate::api::caller`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;

use crate::api::shared::{AppState, Body};
use crate::api::ws::{ClientFrame, execute, explain_bad_frame, presence_of, went_offline};
use crate::error::ApiError;
use crate::frames;
use crate::hub::{LinkEvent, ProxyLink, SessionOutbox};
use crate::ids::UserId;

/// Events queued for one proxy before its stream counts as stuck and is
/// closed (the proxy reconnects and catches its sessions up).
const LINK_QUEUE: usize = 1 << 17;
/// An idle event stream carries a ping line this often, so both ends notice
/// a dead (or stopped) peer within a few seconds.
pub const PING_EVERY: Duration = Duration::from_secs(1);

pub async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    rest: &[&str],
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let proxy = match super::link::link_proxy(state.cluster.as_deref(), &req) {
        Ok(p) => p,
        Err(e) => return ("/cluster", Err(e)),
    };
    let post = req.method() == Method::POST;
    match rest {
        ["events"] if req.method() == Method::GET => {
            ("/cluster/v1/events", Ok(events(state, proxy)))
        }
        ["attach"] if post => ("/cluster/v1/attach", attach(state, &proxy, req).await),
        ["frames"] if post => ("/cluster/v1/frames", frames(state, &proxy, req)),
        _ => (
            "/cluster",
            Err(ApiError::not_found("not_found", "no such cluster endpoint")),
        ),
    }
}

fn ndjson(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

fn events(state: &Arc<AppState>, proxy: String) -> Response<Body> {
    let link = ProxyLink::new(
        state.next_link.fetch_add(1, Ordering::Relaxed),
        proxy,
        LINK_QUEUE,
    );
    tracing::info!(proxy = %link.proxy, link = link.id, "proxy event stream opened");
    if let Some(old) = state.hub.add_link(link.clone()) {
        drop_link(state, &old);
    }
    metrics::gauge!("confab_cluster_proxy_links").increment(1.0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let hello = serde_json::json!({"hello": {
        "node": state.cluster.as_ref().and_then(|c| c.me.clone()),
        "revoked": state.auth.revoked_list(),
    }});
    let mut first = serde_json::to_vec(&hello).unwrap_or_default();
    first.push(b'\n');
    tokio::spawn(pump(state.clone(), link, tx, first));
    ndjson(Body::stream(rx))
}

/// Link queue → event stream, a batch per chunk, until either end goes.
async fn pump(
    state: Arc<AppState>,
    link: Arc<ProxyLink>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    hello: Vec<u8>,
) {
    let mut buf = hello;
    'stream: loop {
        if !buf.is_empty() {
            let chunk = Bytes::from(std::mem::take(&mut buf));
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        let events = link.take();
        if events.is_empty() {
            if link.is_closed() {
                break;
            }
            tokio::select! {
                _ = link.ready.notified() => {}
                _ = tx.closed() => break 'stream,
                _ = tokio::time::sleep(PING_EVERY) => buf.extend_from_slice(b"{\"ping\":1}\n"),
            }
            continue;
        }
        for e in events {
            encode(&mut buf, &e);
        }
        metrics::counter!("confab_cluster_link_bytes_total").increment(buf.len() as u64);
    }
    drop_link(&state, &link);
}

fn encode(buf: &mut Vec<u8>, e: &LinkEvent) {
    use std::io::Write;
    match e {
        LinkEvent::Frame {
            frame,
            to,
            skip,
            only,
        } => {
            buf.extend_from_slice(b"{\"to\":[");
            for (i, u) in to.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                let _ = write!(buf, "\"{u}\"");
            }
            buf.push(b']');
            if let Some(s) = skip {
                let _ = write!(buf, ",\"skip\":{s}");
            }
            if let Some(s) = only {
                let _ = write!(buf, ",\"only\":{s}");
            }
            if let Some((room, seq)) = frame.room_seq {
                let _ = write!(buf, ",\"room\":\"{room}\",\"seq\":{seq}");
            }
            buf.extend_from_slice(b"}\t");
            buf.extend_from_slice(&frame.bytes);
            buf.push(b'\n');
        }
        LinkEvent::Revoke { jti, exp } => {
            let line = serde_json::json!({"revoke": {"jti": jti, "exp": exp}});
            let _ = serde_json::to_writer(&mut *buf, &line);
            buf.push(b'\n');
        }
    }
}

/// A proxy's stream ended: its users are offline here unless another proxy
/// (or a local session) has them.
fn drop_link(state: &Arc<AppState>, link: &ProxyLink) {
    let gone = state.hub.remove_link(link);
    metrics::gauge!("confab_cluster_proxy_links").decrement(1.0);
    tracing::info!(proxy = %link.proxy, link = link.id, offline = gone.len(), "proxy event stream closed");
    let state = state.clone();
    tokio::spawn(async move {
        for user in gone {
            went_offline(&state, user).await;
        }
    });
}

/// The proxy's current event stream (attach and frames need it).
fn current_link(state: &AppState, proxy: &str) -> Result<Arc<ProxyLink>, ApiError> {
    state.hub.link(proxy).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_link",
            "open the event stream (/cluster/v1/events) first",
        )
    })
}

#[derive(Deserialize)]
struct AttachBody {
    ops: Vec<(String, UserId)>,
}

async fn attach(
    state: &AppState,
    proxy: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: AttachBody = crate::api::shared::read_json(state, req).await?;
    let link = current_link(state, proxy)?;
    let mut out = Vec::new();
    for (op, user) in body.ops {
        match op.as_str() {
            "a" => {
                if state.hub.attach(user, &link) {
                    crate::api::ws::went_online(state, user).await;
                }
                let peers = state.storage.direct_peers(user).await.unwrap_or_default();
                for f in presence_of(state, user, &peers).await {
                    out.extend_from_slice(format!("{user}\tP\t").as_bytes());
                    out.extend_from_slice(&f);
                    out.push(b'\n');
                }
                for (room, seq) in state.storage.room_heads(user).await? {
                    out.extend_from_slice(format!("{user}\tH\t{room}\t{seq}\n").as_bytes());
                }
            }
            "d" => {
                if state.hub.detach(user, link.id) {
                    went_offline(state, user).await;
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!("unknown attach op `{other}`"),
                ));
            }
        }
    }
    Ok(ndjson(Body::full(out)))
}

/// The proxy's stream of client frames: one line per frame,
/// `session\tuser\tframe`, run in order as the node runs its own sessions'
/// frames; what each answers (ack, error, pong) goes down the proxy's event
/// stream to that session. The response stays open (and empty) as long as
/// the stream.
fn frames(
    state: &Arc<AppState>,
    proxy: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let link = current_link(state, proxy)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let state = state.clone();
    let mut body = req.into_body();
    tokio::spawn(async move {
        let _open = tx;
        let max = state.config.limits.max_frame_bytes.saturating_add(1024);
        let mut buf = bytes::BytesMut::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(nl + 1);
                run_line(&state, &link, &line[..nl]).await;
            }
            if buf.len() > max || link.is_closed() {
                break;
            }
        }
    });
    Ok(ndjson(Body::stream(rx)))
}

async fn run_line(state: &AppState, link: &Arc<ProxyLink>, line: &[u8]) {
    let mut parts = line.splitn(3, |&b| b == b'\t');
    let (Some(session), Some(user), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let parse = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_string);
    let (Some(session), Some(user)) = (
        parse(session).and_then(|s| s.parse::<u64>().ok()),
        parse(user).and_then(|u| u.parse::<UserId>().ok()),
    ) else {
        return;
    };
    let outbox = SessionOutbox::forwarding(session, user, link.clone());
    match serde_json::from_slice::<ClientFrame>(text) {
        Ok(f) => execute(state, &outbox, None, user, f).await,
        Err(_) => {
            let (code, message, client_id) = explain_bad_frame(text);
            outbox.push_bytes(frames::error(code, &message, client_id.as_deref(), None));
        }
    }
}
