//! Client WebSocket sessions on a proxy. The client sees exactly the
//! protocol of a single node (docs/PROTOCOL.md); behind it:
//! - `auth` is checked here (signature and the revoked set every node
//!   pushes), the profile comes from the user's node, and the user is
//!   attached on every node (which answers with the presence of their
//!   direct-chat peers and where their rooms stand);
//! - the reader (paced as on a node) sends `send`, `read` and `typing` to
//!   the room's node on the link's frame stream; the answer (ack or error)
//!   comes back on the node's event stream;
//! - the session writer is the node's own (`api::ws`); what it delivers is
//!   ordered by the session's cursors (`session.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::WebSocket;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::link::Attached;
use super::session::{Cursor, PSession, catch_up};
use super::state::Proxy;
use crate::api::Body;
use crate::api::ws::{
    ClientFrame, FramePacer, FrameWriter, Reassembler, accept, auth_first, next_frame, reject,
    send_budget, write_loop,
};
use crate::error::ApiError;
use crate::frames::{self, ServerFrame};
use crate::hub::{SessionOutbox, close};
use crate::ids::RoomId;

type Io = TokioIo<Upgraded>;

pub async fn upgrade(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (resp, fut) = accept(&proxy.config.server.allowed_origins, req)?;
    let slot = proxy.connections.take();
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let _slot = slot;
        if let Ok(ws) = fut.await {
            metrics::gauge!("confab_ws_connections").increment(1.0);
            session(proxy, ws).await;
            metrics::gauge!("confab_ws_connections").decrement(1.0);
        }
    });
    Ok(resp)
}

async fn session(proxy: Arc<Proxy>, mut ws: WebSocket<Io>) {
    let Some((caller, resume, asm)) =
        Box::pin(auth_first(&mut ws, &proxy.auth, &proxy.config.limits)).await
    else {
        return;
    };
    let me = match proxy.profile(caller.user).await {
        Ok(Some(me)) => me,
        Ok(None) => {
            return reject(
                &mut ws,
                "unauthorized",
                "the token's user does not exist",
                close::UNAUTHORIZED,
            )
            .await;
        }
        Err(e) => return reject(&mut ws, e.code, &e.message, 1013).await,
    };
    if proxy.sessions_of(caller.user) >= proxy.config.limits.max_sessions_per_user {
        return reject(
            &mut ws,
            "too_many_sessions",
            "you have too many connections open; close some",
            close::TOO_MANY_SESSIONS,
        )
        .await;
    }

    let raw_write = std::cell::Cell::new(None);
    let (mut rx, _) = ws.split(|s| {
        let (r, w) = tokio::io::split(s);
        raw_write.set(Some(w));
        (r, tokio::io::sink())
    });
    let Some(raw_write) = raw_write.into_inner() else {
        return;
    };
    let mut tx = FrameWriter {
        io: raw_write,
        buf: Vec::new(),
    };
    let mut ready = b"{\"type\":\"ready\",\"user\":".to_vec();
    ready.extend_from_slice(&me);
    ready.push(b'}');
    tx.push_text(&ready);

    let outbox = SessionOutbox::new(
        0,
        caller.user,
        caller.jti.clone(),
        proxy.config.limits.outbox_frames,
    );
    let s = Arc::new(PSession {
        id: rand::random::<u64>() >> 2,
        user: caller.user,
        jti: caller.jti.clone(),
        outbox: outbox.clone(),
        rooms: Mutex::new(HashMap::new()),
        starting: std::sync::atomic::AtomicBool::new(true),
        inflight: Mutex::new(HashMap::new()),
    });
    let mut resumed = Vec::new();
    {
        let mut rooms = s.rooms.lock().unwrap_or_else(|e| e.into_inner());
        for (room, &after) in &resume {
            match room.parse::<RoomId>() {
                Ok(r) => {
                    let mut c = Cursor::at(after);
                    c.fetching = true;
                    rooms.insert(r, c);
                    resumed.push(r);
                }
                Err(_) => {
                    let e = ApiError::bad_id();
                    tx.push_text(&frames::error(e.code, &e.message, None, None));
                }
            }
        }
    }
    // Registered before attaching, so no event is missed; presence of the
    // peers comes back from every node.
    proxy.register(&s);
    let mut heads = Vec::new();
    for a in proxy.attach_everywhere(caller.user).await {
        match a {
            Attached::Presence(frame) => tx.push_text(&frame),
            Attached::Head(room, seq) => heads.push((room, seq)),
        }
    }
    s.started(&proxy.nodes, &heads);
    if tx.flush().await.is_err() {
        proxy.unregister(&s);
        return;
    }
    for room in resumed {
        tokio::spawn(catch_up(proxy.nodes.clone(), s.clone(), room));
    }
    let expiry = crate::api::ws::close_at_expiry(&outbox, caller.exp);
    let mut writer = tokio::spawn(write_loop(tx, outbox.clone(), HashMap::new()));
    let reader = read_loop(&proxy, &s, &mut rx, asm);
    tokio::select! {
        _ = reader => {
            outbox.kick(close::NORMAL);
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        }
        _ = &mut writer => {}
    }
    expiry.abort();
    outbox.kick(close::NORMAL);
    proxy.unregister(&s);
}

async fn read_loop(
    proxy: &Arc<Proxy>,
    s: &Arc<PSession>,
    rx: &mut fastwebsockets::WebSocketRead<tokio::io::ReadHalf<Io>>,
    mut asm: Reassembler,
) {
    let mut budget = send_budget(&proxy.config.limits);
    let mut pacer = FramePacer::new(&proxy.config.limits);
    let error = |code: &str, message: &str, client_id: Option<&str>, room: Option<RoomId>| {
        s.outbox
            .push_bytes(frames::error(code, message, client_id, room));
    };
    while let Some((frame, text)) = next_frame(rx, &mut asm, &mut pacer, &s.outbox).await {
        let (room, client_id) = match &frame {
            ClientFrame::Auth {} => {
                error(
                    "already_authenticated",
                    "this connection is already authenticated",
                    None,
                    None,
                );
                continue;
            }
            ClientFrame::Ping {} => {
                s.outbox.push_bytes(ServerFrame::Pong.to_bytes());
                continue;
            }
            ClientFrame::Send {
                room,
                client_id,
                text,
            } => {
                if let Err(e) = crate::api::validate_send_limits(
                    &proxy.config.limits,
                    client_id.as_deref(),
                    text,
                ) {
                    error(e.code, &e.message, client_id.as_deref(), room.parse().ok());
                    continue;
                }
                if budget.take().is_err() {
                    error(
                        "rate_limited",
                        "too many messages; slow down",
                        client_id.as_deref(),
                        room.parse().ok(),
                    );
                    continue;
                }
                (room.as_str(), client_id.clone())
            }
            ClientFrame::Read { room, .. } | ClientFrame::Typing { room } => (room.as_str(), None),
        };
        let Ok(room) = room.parse::<RoomId>() else {
            let e = ApiError::bad_id();
            error(e.code, &e.message, client_id.as_deref(), None);
            continue;
        };
        forward(proxy, s, room, client_id.as_deref(), text);
    }
}

/// Sends a client frame to the node serving the room, on the link's frame
/// stream; the answer comes back as an event ([`PSession::answer`]).
fn forward(
    proxy: &Arc<Proxy>,
    s: &Arc<PSession>,
    room: RoomId,
    client_id: Option<&str>,
    text: Vec<u8>,
) {
    use std::io::Write;
    let node = proxy.nodes.room_node(room);
    let link = proxy.nodes.link(node);
    let mut line = Vec::with_capacity(text.len() + 48);
    let _ = write!(line, "{}\t{}\t", s.id, s.user);
    line.extend_from_slice(&text);
    line.push(b'\n');
    if let Some(c) = client_id {
        s.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c.to_string(), (room, node));
    }
    if let Err(e) = link.send_frame(Bytes::from(line)) {
        if let Some(c) = client_id {
            s.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(c);
        }
        s.outbox
            .push_bytes(frames::error(e.code, &e.message, client_id, Some(room)));
    }
}
