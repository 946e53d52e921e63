//! A node's WebSocket session from upgrade to end: after the `auth`, the
//! user's sessions limit, registration in the hub before any history is
//! read (so nothing committed meanwhile is missed), the greeting (`ready`,
//! the catch-up of every resumed room, the peers' presence), then the
//! reader here and the session writer beside it until either ends or the
//! token expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fastwebsockets::WebSocket;
use hyper::body::Incoming;
use hyper::{Request, Response};

use super::handshake::{Io, accept, auth_first, reject};
use super::notify::{announce_presence, presence_of, send_to_others, went_offline};
use super::reader::read_loop;
use super::writer::{FrameWriter, write_loop};
use crate::api::shared::{AppState, Body};
use crate::error::ApiError;
use crate::frames::{self, ServerFrame};
use crate::hub::{SessionOutbox, close};
use crate::ids::{RoomId, UserId};

pub async fn upgrade(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (resp, fut) = accept(&state.config.server.allowed_origins, req)?;
    let slot = state.connections.take();
    let state = state.clone();
    let task = async move {
        let _slot = slot;
        match fut.await {
            Ok(ws) => {
                metrics::gauge!("confab_ws_connections").increment(1.0);
                session(state, ws).await;
                metrics::gauge!("confab_ws_connections").decrement(1.0);
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    };
    tokio::spawn(tracing::Instrument::instrument(
        task,
        tracing::Span::current(),
    ));
    Ok(resp)
}

async fn session(state: Arc<AppState>, mut ws: WebSocket<Io>) {
    // 1. The first message must be a valid `auth`.
    let Some((caller, resume, asm)) =
        Box::pin(auth_first(&mut ws, &state.auth, &state.config.limits)).await
    else {
        return;
    };
    let user = match state.storage.user(caller.user).await {
        Ok(Some(u)) => u,
        _ => {
            return reject(
                &mut ws,
                "unauthorized",
                "the token's user does not exist",
                close::UNAUTHORIZED,
            )
            .await;
        }
    };
    if state.hub.sessions_of(user.id) >= state.config.limits.max_sessions_per_user {
        return reject(
            &mut ws,
            "too_many_sessions",
            "you have too many connections open; close some",
            close::TOO_MANY_SESSIONS,
        )
        .await;
    }
    metrics::counter!("confab_sessions_authenticated_total").increment(1);

    // The reader keeps fastwebsockets' read half; the write half is taken
    // raw, and frames are encoded by `FrameWriter` into one buffer per batch.
    let raw_write = std::cell::Cell::new(None);
    let (rx, _) = ws.split(|s| {
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

    // 2. Register before reading history, so nothing committed in between is
    //    missed; the session writer drops live copies of caught-up messages.
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let outbox = state.hub.outbox(
        id,
        user.id,
        caller.jti.clone(),
        state.config.limits.outbox_frames,
    );
    let first_online = state.hub.register(outbox.clone());
    let peers = state
        .storage
        .direct_peers(user.id)
        .await
        .unwrap_or_default();
    let caught_up = match Box::pin(greet(&state, &mut tx, &user, &resume, &peers)).await {
        Ok(high) => high,
        Err(_) => {
            end_session(&state, &outbox).await;
            return;
        }
    };
    if first_online {
        announce_presence(&state, &peers, user.id, true, None).await;
    }
    drop(peers);

    // 3. Run the reader here and the session writer beside it, until the
    //    token expires at the latest.
    let expiry = close_at_expiry(&outbox, caller.exp);
    let mut writer = tokio::spawn(write_loop(tx, outbox.clone(), caught_up));
    let reader = read_loop(&state, rx, asm, &outbox, user.id);
    tokio::select! {
        _ = reader => {
            // The reader ended (close, EOF, fatal frame): let the writer send
            // its close frame and stop.
            outbox.kick(close::NORMAL);
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        }
        _ = &mut writer => {}
    }
    expiry.abort();
    end_session(&state, &outbox).await;
}

/// Closes the session (4001) when its token expires: a token is a login for
/// its lifetime only, also on a connection opened before the end.
pub(crate) fn close_at_expiry(
    outbox: &Arc<SessionOutbox>,
    exp_secs: i64,
) -> tokio::task::JoinHandle<()> {
    let outbox = outbox.clone();
    let left = u64::try_from(exp_secs.saturating_sub(crate::auth::now_secs())).unwrap_or(0);
    tokio::spawn(async move {
        // A link session's caller never expires (i64::MAX): no timer.
        if left > 10 * 365 * 24 * 3600 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(left)).await;
        outbox.kick(close::UNAUTHORIZED);
    })
}

async fn end_session(state: &AppState, outbox: &SessionOutbox) {
    // No more frames are accepted for this session.
    outbox.kick(close::NORMAL);
    if state.hub.unregister(outbox) {
        went_offline(state, outbox.user).await;
    }
}

/// Sends `ready`, the catch-up of every resumed room and the presence of
/// `peers` (the user's direct-chat peers). Returns the highest seq sent per room.
async fn greet(
    state: &AppState,
    tx: &mut FrameWriter,
    user: &crate::store::User,
    resume: &HashMap<String, u64>,
    peers: &[UserId],
) -> std::io::Result<HashMap<RoomId, u64>> {
    tx.push_text(&ServerFrame::Ready { user }.to_bytes());
    let mut high = HashMap::new();
    for (room_str, &after) in resume {
        let room: RoomId = match room_str.parse() {
            Ok(r) => r,
            Err(_) => {
                let e = ApiError::bad_id();
                tx.push_text(&frames::error(e.code, &e.message, None, None));
                continue;
            }
        };
        let mut cursor = after;
        loop {
            let batch = match state
                .storage
                .history(room, user.id, Some(cursor), None, 500)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tx.push_text(&frames::error(e.code, &e.message, None, Some(room)));
                    break;
                }
            };
            let Some(last) = batch.last().map(|m| m.seq) else {
                break;
            };
            for m in &batch {
                tx.push_text(&frames::message(m));
            }
            cursor = last;
            tx.flush().await?;
        }
        high.insert(room, cursor);
        if cursor > after {
            send_to_others(
                state,
                room,
                user.id,
                ServerFrame::Receipt {
                    room,
                    user: user.id,
                    seq: cursor,
                    kind: "delivered",
                }
                .to_bytes(),
            )
            .await;
        }
    }
    for frame in presence_of(state, user.id, peers).await {
        tx.push_text(&frame);
    }
    tx.flush().await?;
    Ok(high)
}
