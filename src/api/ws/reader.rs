//! A session's reader: reads client frames one at a time, paced
//! ([`FramePacer`]: every frame, of any kind, within the connection's frame
//! budget), and runs them ([`execute`]): sends to the writer within the
//! connection's and the account's send budgets, reads to the read merger,
//! typing through its gate to the room's other members. It never writes to
//! the socket: answers go to the session's outbox. fastwebsockets'
//! `read_frame` is not cancel-safe, so the reader is never raced against
//! anything in a `select!`; it is dropped as a whole when the session ends.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fastwebsockets::{WebSocketError, WebSocketRead};
use hyper::StatusCode;
use tokio::io::ReadHalf;

use super::handshake::Io;
use super::notify::send_to_others;
use super::parse::{ClientFrame, Incoming_, Reassembler, explain_bad_frame};
use crate::api::messages::validate_send;
use crate::api::shared::AppState;
use crate::error::ApiError;
use crate::frames::{self, ServerFrame};
use crate::hub::{OutFrame, SessionOutbox, close};
use crate::ids::{RoomId, UserId};
use crate::limits::TokenBucket;
use crate::writes::{Op, Origin};

type Reader = WebSocketRead<ReadHalf<Io>>;

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

/// The next client frame of a session (this node's or a proxy's): read,
/// reassembled, paced, parsed. A frame that does not parse is answered
/// with an `error` frame in `outbox` and skipped. Returns it with its text
/// (which a proxy forwards as it came); None: the session ends.
pub(crate) async fn next_frame<S: tokio::io::AsyncRead + Unpin>(
    rx: &mut WebSocketRead<S>,
    asm: &mut Reassembler,
    pacer: &mut FramePacer,
    outbox: &SessionOutbox,
) -> Option<(ClientFrame, Vec<u8>)> {
    loop {
        let frame = rx
            .read_frame::<_, WebSocketError>(&mut |_| async { Ok(()) })
            .await;
        let Some(msg) = asm.feed(frame) else { continue };
        pacer.pace().await;
        let text = match text_of(msg, outbox) {
            Some(Some(t)) => t,
            Some(None) => continue,
            None => return None,
        };
        // One typed parse on the hot path; a frame that fails it is parsed
        // again, loosely, only to say what is wrong with it.
        match serde_json::from_slice(&text) {
            Ok(f) => return Some((f, text)),
            Err(_) => {
                let (code, message, client_id) = explain_bad_frame(&text);
                outbox.push_bytes(frames::error(code, &message, client_id.as_deref(), None));
            }
        }
    }
}

pub(super) async fn read_loop(
    state: &AppState,
    mut rx: Reader,
    mut asm: Reassembler,
    outbox: &Arc<SessionOutbox>,
    user: UserId,
) {
    let mut budget = send_budget(&state.config.limits);
    let mut pacer = FramePacer::new(&state.config.limits);
    while let Some((frame, _)) = next_frame(&mut rx, &mut asm, &mut pacer, outbox).await {
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
        ClientFrame::Typing { room } => on_typing(state, user, &room).await,
        ClientFrame::Ping {} => {
            outbox.push_bytes(ServerFrame::Pong.to_bytes());
            Ok(())
        }
    };
    if let Err(e) = result {
        error(e.code, &e.message, None, None);
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
        .storage
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

async fn on_typing(state: &AppState, user: UserId, room: &str) -> Result<(), ApiError> {
    let room: RoomId = room.parse().map_err(|_| ApiError::bad_id())?;
    if !state.budgets.typing.allow(user, room) {
        // Within `typing_interval_ms` of the last one passed on: the
        // members' indicators are still showing it.
        return Ok(());
    }
    state.storage.check_member(room, user).await?;
    send_to_others(
        state,
        room,
        user,
        ServerFrame::Typing { room, user }.to_bytes(),
    )
    .await;
    Ok(())
}
