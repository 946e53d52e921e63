//! WebSocket sessions at `/api/v1/ws`.
//!
//! A session is two tasks over one socket: the *reader* (this task) parses
//! client frames and hands sends to the writer thread; the *session writer*
//! drains the session's [`SessionOutbox`] in batches into a buffered socket
//! and flushes once per batch. The reader never writes to the socket: it
//! queues error frames in the outbox and control replies (pong, close) on a
//! small control channel. fastwebsockets' `read_frame` is not cancel-safe, so
//! the reader is never raced against anything in a `select!`; it is dropped
//! as a whole when the session ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketRead};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use super::messages::validate_send;
use super::{AppState, Body};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::frames::{self, ServerFrame};
use crate::hub::{OutFrame, SessionOutbox, close};
use crate::ids::{RoomId, UserId};
use crate::limits::TokenBucket;
use crate::store::now_ms;
use crate::store::writer::{Op, Origin};

type Io = TokioIo<Upgraded>;
type Reader = WebSocketRead<ReadHalf<Io>>;

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

/// A complete client message, after reassembling fragments.
pub(crate) enum Incoming_ {
    Text(Vec<u8>),
    Binary,
    Ping(Vec<u8>),
    Close,
    BadUtf8,
    TooBig,
    Gone,
}

/// Joins fragmented frames and enforces `max_frame_bytes` on the whole.
pub(crate) struct Reassembler {
    max: usize,
    buf: Vec<u8>,
    /// Some(is_text) while a fragmented message is being collected.
    open: Option<bool>,
}

impl Reassembler {
    pub(crate) fn new(max: usize) -> Reassembler {
        Reassembler {
            max,
            buf: Vec::new(),
            open: None,
        }
    }
}

impl Reassembler {
    pub(crate) fn feed(&mut self, frame: Result<Frame<'_>, WebSocketError>) -> Option<Incoming_> {
        let frame = match frame {
            Ok(f) => f,
            Err(WebSocketError::InvalidUTF8) => return Some(Incoming_::BadUtf8),
            Err(WebSocketError::FrameTooLarge) => return Some(Incoming_::TooBig),
            Err(_) => return Some(Incoming_::Gone),
        };
        match frame.opcode {
            OpCode::Text | OpCode::Binary if frame.fin => {
                if self.open.is_some() {
                    return Some(Incoming_::Gone);
                }
                if frame.opcode == OpCode::Binary {
                    return Some(Incoming_::Binary);
                }
                Some(Incoming_::Text(frame.payload.to_vec()))
            }
            OpCode::Text | OpCode::Binary => {
                if self.open.is_some() {
                    return Some(Incoming_::Gone);
                }
                self.open = Some(frame.opcode == OpCode::Text);
                self.buf.clear();
                self.buf.extend_from_slice(&frame.payload);
                None
            }
            OpCode::Continuation => {
                let Some(is_text) = self.open else {
                    return Some(Incoming_::Gone);
                };
                if self.buf.len() + frame.payload.len() > self.max {
                    return Some(Incoming_::TooBig);
                }
                self.buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return None;
                }
                self.open = None;
                let data = std::mem::take(&mut self.buf);
                if !is_text {
                    Some(Incoming_::Binary)
                } else if std::str::from_utf8(&data).is_err() {
                    Some(Incoming_::BadUtf8)
                } else {
                    Some(Incoming_::Text(data))
                }
            }
            OpCode::Close => Some(Incoming_::Close),
            OpCode::Ping => Some(Incoming_::Ping(frame.payload.to_vec())),
            OpCode::Pong => None,
        }
    }
}

#[derive(Deserialize)]
struct AuthFrame {
    token: String,
    #[serde(default)]
    resume: HashMap<String, u64>,
}

/// A client → server frame (docs/PROTOCOL.md). Public for the benches.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Auth {},
    Send {
        room: String,
        client_id: Option<String>,
        text: String,
    },
    Read {
        room: String,
        seq: u64,
    },
    Typing {
        room: String,
    },
    Ping {},
}

const CLIENT_TYPES: [&str; 5] = ["auth", "send", "read", "typing", "ping"];

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

async fn session(state: Arc<AppState>, mut ws: WebSocket<Io>) {
    // 1. The first message must be a valid `auth`.
    let Some((caller, resume, asm)) =
        Box::pin(auth_first(&mut ws, &state.auth, &state.config.limits)).await
    else {
        return;
    };
    let user = match state.store.user(caller.user) {
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
    let peers = state.store.direct_peers(user.id).unwrap_or_default();
    let caught_up = match Box::pin(greet(&state, &mut tx, &user, &resume, &peers)).await {
        Ok(high) => high,
        Err(_) => {
            end_session(&state, &outbox);
            return;
        }
    };
    if first_online {
        announce_presence(&state, &peers, user.id, true, None);
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
    end_session(&state, &outbox);
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

fn end_session(state: &AppState, outbox: &SessionOutbox) {
    // No more frames are accepted for this session.
    outbox.kick(close::NORMAL);
    if state.hub.unregister(outbox) {
        went_offline(state, outbox.user);
    }
}

/// A user's last session (here or behind a proxy) ended: tell the peers of
/// their direct chats on this node and record when.
pub(crate) fn went_offline(state: &AppState, user: UserId) {
    let ts = now_ms();
    let peers = state.store.direct_peers(user).unwrap_or_default();
    announce_presence(state, &peers, user, false, Some(ts));
    let writer = state.writer.clone();
    tokio::spawn(async move {
        let _ = writer.submit(Op::LastSeen { user, ts }).await;
    });
}

/// A user's first session (here or behind a proxy) began.
pub(crate) fn went_online(state: &AppState, user: UserId) {
    let peers = state.store.direct_peers(user).unwrap_or_default();
    announce_presence(state, &peers, user, true, None);
}

/// The `presence` frames of `peers` as this node sees them, for `viewer`:
/// only of the peers whose privacy settings let `viewer` see it.
pub(crate) fn presence_of(state: &AppState, viewer: UserId, peers: &[UserId]) -> Vec<Bytes> {
    let visible = state
        .store
        .presences_seen_by(viewer, peers)
        .unwrap_or_default();
    visible
        .iter()
        .map(|&peer| {
            let online = state.hub.is_online(peer);
            let last_seen = if online {
                None
            } else {
                state.store.last_seen(peer).ok().flatten()
            };
            ServerFrame::Presence {
                user: peer,
                online,
                last_seen,
            }
            .to_bytes()
        })
        .collect()
}

/// `user` changed who sees their presence: the peers who see it get it
/// again, the others get "offline, last seen unknown" (the frame a peer
/// who never saw it would have had nothing of).
pub(crate) fn privacy_changed(state: &AppState, user: UserId) {
    let peers = state.store.direct_peers(user).unwrap_or_default();
    let seeing = state
        .store
        .presence_audience(user, &peers)
        .unwrap_or_default();
    let online = state.hub.is_online(user);
    let last_seen = if online {
        None
    } else {
        state.store.last_seen(user).ok().flatten()
    };
    for &peer in &peers {
        let (online, last_seen) = if seeing.contains(&peer) {
            (online, last_seen)
        } else {
            (false, None)
        };
        let frame = OutFrame::text(
            ServerFrame::Presence {
                user,
                online,
                last_seen,
            }
            .to_bytes(),
        );
        state.hub.send_to_user(peer, &frame, None);
    }
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
            let batch = match state.store.history(room, user.id, Some(cursor), None, 500) {
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
            );
        }
    }
    for frame in presence_of(state, user.id, peers) {
        tx.push_text(&frame);
    }
    tx.flush().await?;
    Ok(high)
}

/// Tells those of `peers` whom `user`'s privacy settings let see it that
/// `user` went online or offline.
fn announce_presence(
    state: &AppState,
    peers: &[UserId],
    user: UserId,
    online: bool,
    last_seen: Option<i64>,
) {
    let frame = OutFrame {
        bytes: ServerFrame::Presence {
            user,
            online,
            last_seen,
        }
        .to_bytes(),
        room_seq: None,
        pong: false,
    };
    for peer in state
        .store
        .presence_audience(user, peers)
        .unwrap_or_default()
    {
        state.hub.send_to_user(peer, &frame, None);
    }
}

fn send_to_others(state: &AppState, room: RoomId, user: UserId, bytes: Bytes) {
    let frame = OutFrame {
        bytes,
        room_seq: None,
        pong: false,
    };
    for m in state.store.members(room).unwrap_or_default() {
        if m != user {
            state.hub.send_to_user(m, &frame, None);
        }
    }
}

/// The session's write side: frames are encoded into one buffer and written
/// with a single `write_all` per batch (fastwebsockets' own writer does a
/// syscall per frame). The buffer is dropped after large batches, so an idle
/// session holds no write buffer at all.
pub(crate) struct FrameWriter {
    pub(crate) io: WriteHalf<Io>,
    pub(crate) buf: Vec<u8>,
}

/// Largest batch buffer kept between batches.
const KEEP_BUFFER: usize = 16 * 1024;
/// A batch stops growing past this many bytes.
const BATCH_BYTES: usize = 256 * 1024;

impl FrameWriter {
    fn push(&mut self, mut frame: Frame<'_>) {
        let mut head = [0u8; 14];
        let n = frame.fmt_head(&mut head);
        self.buf.extend_from_slice(&head[..n]);
        self.buf.extend_from_slice(&frame.payload);
    }

    pub(crate) fn push_text(&mut self, payload: &[u8]) {
        self.push(Frame::text(Payload::Borrowed(payload)));
    }

    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.io.flush().await?;
        }
        self.buf.clear();
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

/// The session writer: outbox → socket, batched, one flush per batch.
pub(crate) async fn write_loop(
    mut tx: FrameWriter,
    outbox: Arc<SessionOutbox>,
    caught_up: HashMap<RoomId, u64>,
) {
    let stale = |f: &OutFrame| match f.room_seq {
        Some((room, seq)) => caught_up.get(&room).is_some_and(|&h| seq <= h),
        None => false,
    };
    let code = 'session: loop {
        if outbox.is_kicked() {
            break outbox.kick_code();
        }
        let mut batch = outbox.take();
        if !batch.is_empty() {
            metrics::histogram!("confab_outbox_depth_frames").record(batch.len() as f64);
        }
        if batch.is_empty() {
            tokio::select! {
                biased;
                _ = outbox.kick_notify.notified() => break outbox.kick_code(),
                _ = outbox.ready.notified() => continue,
            }
        }
        while let Some(f) = batch.pop_front() {
            if f.pong {
                tx.push(Frame::pong(Payload::Borrowed(&f.bytes)));
            } else if !stale(&f) {
                tx.push_text(&f.bytes);
            }
            if tx.buf.len() >= BATCH_BYTES {
                match finish_or_kick(tx.flush(), &outbox).await {
                    Ok(()) => {}
                    Err(Some(code)) => break 'session code,
                    Err(None) => return,
                }
            }
        }
        drop(batch);
        match finish_or_kick(tx.flush(), &outbox).await {
            Ok(()) => {}
            Err(Some(code)) => break code,
            Err(None) => return,
        }
    };
    let reason: &[u8] = match code {
        close::TOO_SLOW => b"too slow: resume from your last seq",
        close::UNAUTHORIZED => b"log in again (logged out or token expired)",
        close::GOING_AWAY => b"server shutting down",
        close::TOO_BIG => b"frame too large",
        _ => b"",
    };
    tx.buf.clear();
    tx.push(Frame::close(code, reason));
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.flush()).await;
}

/// Runs a socket write. A client that stops reading blocks it; when the
/// session is kicked meanwhile (outbox overflow, logout, shutdown), the write
/// gets one more second: if it completes, Err(Some(code)) lets the caller send
/// the close frame on a clean stream; if not, Err(None): drop the connection.
async fn finish_or_kick(
    write: impl std::future::Future<Output = std::io::Result<()>>,
    outbox: &SessionOutbox,
) -> Result<(), Option<u16>> {
    tokio::pin!(write);
    tokio::select! {
        r = &mut write => r.map_err(|_| None),
        _ = outbox.kick_notify.notified() => {
            match tokio::time::timeout(Duration::from_secs(1), &mut write).await {
                Ok(Ok(())) => Err(Some(outbox.kick_code())),
                _ => Err(None),
            }
        }
    }
}

/// Per-connection token bucket for sends (`send_rate_per_sec`,
/// `send_burst`): past it a send is answered `rate_limited`.
pub(crate) fn send_budget(limits: &crate::config::LimitsConfig) -> TokenBucket {
    TokenBucket::new(
        f64::from(limits.send_rate_per_sec),
        f64::from(limits.send_burst),
    )
}

/// A connection's budget for client frames of every kind
/// (`frame_rate_per_sec`, `frame_burst`). Past it, the reader waits before
/// it reads on: the client's frames back up in its own socket and nobody
/// else notices. And after every frame the reader gives its worker thread
/// up when tokio's cooperative budget is spent: frames already in the read
/// buffer never make the socket wait, so without it one flooding session
/// could hold a worker thread and delay other sessions' acks.
pub(crate) struct FramePacer(TokenBucket);

impl FramePacer {
    pub(crate) fn new(limits: &crate::config::LimitsConfig) -> FramePacer {
        FramePacer(TokenBucket::new(
            f64::from(limits.frame_rate_per_sec),
            f64::from(limits.frame_burst),
        ))
    }

    /// Called once per complete client message, before it is handled.
    pub(crate) async fn pace(&mut self) {
        let wait = self.0.take_or_wait();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        tokio::task::coop::consume_budget().await;
    }
}

/// What a session's reader does with a complete client message: Some(Some
/// (text)) to handle, Some(None) when answered already (ping, a binary or
/// invalid frame: an error frame), None when the session ends.
pub(crate) fn text_of(msg: Incoming_, outbox: &SessionOutbox) -> Option<Option<Vec<u8>>> {
    let error = |code: &str, message: &str| {
        outbox.push_bytes(frames::error(code, message, None, None));
    };
    match msg {
        Incoming_::Text(t) => Some(Some(t)),
        Incoming_::Binary => {
            error("binary_not_supported", "send JSON in text frames");
            Some(None)
        }
        Incoming_::BadUtf8 => {
            error("invalid_utf8", "text frames must be valid UTF-8");
            Some(None)
        }
        Incoming_::Ping(p) => {
            outbox.push(OutFrame {
                bytes: Bytes::from(p),
                room_seq: None,
                pong: true,
            });
            Some(None)
        }
        Incoming_::TooBig => {
            outbox.kick(close::TOO_BIG);
            None
        }
        Incoming_::Close => {
            outbox.kick(close::NORMAL);
            None
        }
        Incoming_::Gone => None,
    }
}

async fn read_loop(
    state: &AppState,
    mut rx: Reader,
    mut asm: Reassembler,
    outbox: &Arc<SessionOutbox>,
    user: UserId,
) {
    let mut budget = send_budget(&state.config.limits);
    let mut pacer = FramePacer::new(&state.config.limits);
    let error = |code: &str, message: &str, client_id: Option<&str>, room: Option<RoomId>| {
        outbox.push_bytes(frames::error(code, message, client_id, room));
    };
    loop {
        let frame = rx
            .read_frame::<_, WebSocketError>(&mut |_| async { Ok(()) })
            .await;
        let Some(msg) = asm.feed(frame) else { continue };
        pacer.pace().await;
        let text = match text_of(msg, outbox) {
            Some(Some(t)) => t,
            Some(None) => continue,
            None => return,
        };
        // One typed parse on the hot path; a frame that fails it is parsed
        // again, loosely, only to say what is wrong with it.
        let frame: ClientFrame = match serde_json::from_slice(&text) {
            Ok(f) => f,
            Err(_) => {
                let (code, message, client_id) = explain_bad_frame(&text);
                error(code, &message, client_id.as_deref(), None);
                continue;
            }
        };
        // Boxed: the reader future lives as long as the connection, and this
        // await point would otherwise size it.
        Box::pin(execute(state, outbox, Some(&mut budget), user, frame)).await;
    }
}

/// Runs one client frame of an authenticated session: this node's own, or a
/// proxy's forwarded to the room's node (`budget` None: the proxy limits
/// the rate). Acks, pongs and errors go to `outbox`.
pub(crate) async fn execute(
    state: &AppState,
    outbox: &Arc<SessionOutbox>,
    budget: Option<&mut TokenBucket>,
    user: UserId,
    frame: ClientFrame,
) {
    let error = |code: &str, message: &str, client_id: Option<&str>, room: Option<RoomId>| {
        outbox.push_bytes(frames::error(code, message, client_id, room));
    };
    let result = match frame {
        ClientFrame::Auth {} => Err(ApiError::bad_request(
            "already_authenticated",
            "this connection is already authenticated",
        )),
        ClientFrame::Send {
            room,
            client_id,
            text,
        } => {
            let r = on_send(
                state,
                outbox,
                budget,
                user,
                &room,
                client_id.as_deref(),
                text,
            )
            .await;
            if let Err(e) = r {
                crate::telemetry::LiveStats::add(&state.live.rejected, 1);
                metrics::counter!("confab_messages_rejected_total", "reason" => e.code)
                    .increment(1);
                error(e.code, &e.message, client_id.as_deref(), room.parse().ok());
            }
            return;
        }
        ClientFrame::Read { room, seq } => match room.parse::<RoomId>() {
            Ok(room) => {
                state.budgets.reads.add(user, room, seq);
                Ok(())
            }
            Err(_) => Err(ApiError::bad_id()),
        },
        ClientFrame::Typing { room } => on_typing(state, user, &room),
        ClientFrame::Ping {} => {
            outbox.push_bytes(ServerFrame::Pong.to_bytes());
            Ok(())
        }
    };
    if let Err(e) = result {
        error(e.code, &e.message, None, None);
    }
}

/// Why a client frame did not parse: (code, message, its client_id if any).
pub(crate) fn explain_bad_frame(text: &[u8]) -> (&'static str, String, Option<String>) {
    let value: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return ("invalid_json", format!("not JSON: {e}"), None),
    };
    let client_id = value
        .get("client_id")
        .and_then(|c| c.as_str())
        .map(str::to_owned);
    let Some(kind) = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    else {
        return (
            "invalid_json",
            "a frame is a JSON object with a string `type`".into(),
            client_id,
        );
    };
    if !CLIENT_TYPES.contains(&kind.as_str()) {
        return (
            "unknown_type",
            format!("unknown frame type `{kind}`"),
            client_id,
        );
    }
    match serde_json::from_value::<ClientFrame>(value) {
        Err(e) => (
            "invalid_json",
            format!("bad `{kind}` frame: {e}"),
            client_id,
        ),
        Ok(_) => ("invalid_json", "unparseable frame".into(), client_id),
    }
}

async fn on_send(
    state: &AppState,
    outbox: &Arc<SessionOutbox>,
    budget: Option<&mut TokenBucket>,
    user: UserId,
    room: &str,
    client_id: Option<&str>,
    text: String,
) -> Result<(), ApiError> {
    let room: RoomId = room.parse().map_err(|_| ApiError::bad_id())?;
    validate_send(state, client_id, &text)?;
    if budget.is_some_and(|b| b.take().is_err()) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many messages; slow down",
        ));
    }
    state.budgets.take_send(user)?;
    metrics::counter!("confab_messages_received_total").increment(1);
    crate::telemetry::LiveStats::add(&state.live.received, 1);
    state
        .writer
        .submit(Op::Send {
            room,
            from: user,
            client_id: client_id.unwrap_or_default().to_owned(),
            text,
            origin: Origin::Session(outbox.clone()),
            received: Instant::now(),
        })
        .await
}

fn on_typing(state: &AppState, user: UserId, room: &str) -> Result<(), ApiError> {
    let room: RoomId = room.parse().map_err(|_| ApiError::bad_id())?;
    if !state.budgets.typing.allow(user, room) {
        // Within `typing_interval_ms` of the last one passed on: the
        // members' indicators are still showing it.
        return Ok(());
    }
    state.store.check_member(room, user)?;
    send_to_others(
        state,
        room,
        user,
        ServerFrame::Typing { room, user }.to_bytes(),
    );
    Ok(())
}
