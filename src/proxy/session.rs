//! WebSocket sessions on a proxy. The client sees exactly the protocol of a
//! single node (docs/PROTOCOL.md); behind it:
//! - `auth` is checked here (signature and the revoked set every node
//!   pushes), the profile comes from the user's node, and the user is
//!   attached on every node (which answers with the presence of their
//!   direct-chat peers);
//! - `send`, `read` and `typing` go to the room's node as one HTTP/2 stream
//!   each; the answer (ack or error) comes back on it;
//! - room events arrive on the nodes' event streams, once per proxy, and are
//!   delivered here per session, **in seq order per room with no gaps and
//!   no duplicates**: a session keeps, per room, the highest seq it has
//!   delivered; a frame past a gap waits while the gap is fetched from the
//!   room's node (after `resume`, after a link came back, or after 1 s if
//!   the missing frame never came).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{WebSocket, WebSocketError};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::Proxy;
use super::link::{Attached, read_all};
use crate::api::Body;
use crate::api::ws::{
    ClientFrame, FramePacer, FrameWriter, Reassembler, accept, auth_first, explain_bad_frame,
    reject, send_budget, text_of, write_loop,
};
use crate::cluster::link::USER_HEADER;
use crate::error::ApiError;
use crate::frames::{self, ServerFrame};
use crate::hub::{OutFrame, SessionOutbox, close};
use crate::ids::{RoomId, UserId};

type Io = TokioIo<Upgraded>;

/// How long a gap may stay open before it is fetched from the store.
const GAP_WAIT: Duration = Duration::from_secs(1);
/// Frames one session may hold back behind a gap before it is closed (4008;
/// it resumes on reconnect).
const MAX_PENDING: usize = 10_000;
/// Messages per history request of a catch-up.
const FETCH: usize = 200;

/// One room's delivery state in a session.
struct Cursor {
    /// The highest seq delivered (or acked to this session).
    high: u64,
    /// Frames past a gap; None: the session's own message (its ack went out).
    pending: BTreeMap<u64, Option<Bytes>>,
    fetching: bool,
    /// A gap timer is armed: the `high` it saw. When it fires it fetches only
    /// if nothing moved since (a gap that keeps closing by itself is not a
    /// stuck one).
    timer: Option<u64>,
    /// Created by an event while the session was starting: held until the
    /// nodes say where the room stood when the session attached.
    held: bool,
}

impl Cursor {
    fn at(high: u64) -> Cursor {
        Cursor {
            high,
            pending: BTreeMap::new(),
            fetching: false,
            timer: None,
            held: false,
        }
    }
}

pub struct PSession {
    pub id: u64,
    pub user: UserId,
    pub jti: String,
    pub outbox: Arc<SessionOutbox>,
    rooms: Mutex<HashMap<RoomId, Cursor>>,
    /// Until the attach answers are in (see [`Cursor::held`]).
    starting: std::sync::atomic::AtomicBool,
    /// This session's sends on their way to a node: client_id → room. A
    /// catch-up that meets one before its ack does not deliver it as a
    /// `message`; a link that goes down answers them `node_unavailable`.
    inflight: Mutex<HashMap<String, RoomId>>,
}

impl PSession {
    /// A frame that is not a room message.
    pub fn push_other(&self, bytes: Bytes) {
        self.outbox.push_bytes(bytes);
    }

    /// The node's answer to one of this session's frames (an ack, an
    /// error, a pong), in order with the room's other events.
    pub fn answer(self: &Arc<Self>, proxy: &Arc<Proxy>, frame: Bytes) {
        let a: Answer = serde_json::from_slice(&frame).unwrap_or_default();
        if let Some(c) = &a.client_id {
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(c);
        }
        self.outbox.push_bytes(frame);
        if a.kind == "ack"
            && let (Some(room), Some(seq)) = (a.room, a.seq)
        {
            self.deliver(proxy, room, seq, None);
        }
    }

    /// The link to `node` went down: its sends in flight get no ack.
    pub fn fail_inflight(&self, proxy: &Proxy, node: usize) {
        let failed: Vec<(String, RoomId)> = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extract_if(|_, r| proxy.room_node(*r) == node)
            .collect();
        let e = super::link::node_unavailable(&proxy.links[node].node.id);
        for (c, room) in failed {
            self.outbox
                .push_bytes(frames::error(e.code, &e.message, Some(&c), Some(room)));
        }
    }

    fn push(&self, bytes: Bytes, room_seq: Option<(RoomId, u64)>) {
        self.outbox.push(OutFrame {
            bytes,
            room_seq,
            pong: false,
        });
    }

    /// Delivers message `seq` of `room` (None: the session's own, acked).
    pub fn deliver(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        room: RoomId,
        seq: u64,
        frame: Option<Bytes>,
    ) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let starting = self.starting.load(std::sync::atomic::Ordering::Acquire);
        let c = rooms.entry(room).or_insert_with(|| {
            if starting {
                let mut c = Cursor::at(0);
                c.fetching = true;
                c.held = true;
                c
            } else {
                // A room the session did not know (new, or just joined):
                // live from here.
                Cursor::at(seq.saturating_sub(1))
            }
        });
        if seq <= c.high || c.pending.contains_key(&seq) {
            return;
        }
        if !c.fetching && seq == c.high + 1 {
            if let Some(f) = frame {
                self.push(f, Some((room, seq)));
            }
            c.high = seq;
            self.drain(room, c);
            return;
        }
        c.pending.insert(seq, frame);
        if c.pending.len() > MAX_PENDING {
            self.outbox.kick(close::TOO_SLOW);
            return;
        }
        if !c.fetching {
            self.arm(proxy, room, c);
        }
    }

    /// Arms the room's gap timer (once).
    fn arm(self: &Arc<Self>, proxy: &Arc<Proxy>, room: RoomId, c: &mut Cursor) {
        if c.timer.is_none() {
            c.timer = Some(c.high);
            let (s, p) = (self.clone(), proxy.clone());
            tokio::spawn(async move {
                tokio::time::sleep(GAP_WAIT).await;
                s.gap_timer(&p, room);
            });
        }
    }

    /// The attach answers are in: each room the user had on a node starts at
    /// its highest seq then (resumed rooms keep their resume position).
    fn started(self: &Arc<Self>, proxy: &Arc<Proxy>, heads: &[(RoomId, u64)]) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        for &(room, head) in heads {
            match rooms.get_mut(&room) {
                Some(c) if c.held => c.high = c.high.max(head),
                Some(_) => {}
                None => {
                    rooms.insert(room, Cursor::at(head));
                }
            }
        }
        for (&room, c) in rooms.iter_mut().filter(|(_, c)| c.held) {
            c.held = false;
            c.fetching = false;
            self.drain(room, c);
            if !c.pending.is_empty() {
                self.arm(proxy, room, c);
            }
        }
        self.starting
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Delivers the pending frames that now follow without a gap.
    fn drain(&self, room: RoomId, c: &mut Cursor) {
        while let Some(entry) = c.pending.first_entry() {
            let seq = *entry.key();
            if seq <= c.high {
                entry.remove();
            } else if seq == c.high + 1 {
                if let Some(f) = entry.remove() {
                    self.push(f, Some((room, seq)));
                }
                c.high = seq;
            } else {
                break;
            }
        }
    }

    fn gap_timer(self: &Arc<Self>, proxy: &Arc<Proxy>, room: RoomId) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = rooms.get_mut(&room) else {
            return;
        };
        let armed = c.timer.take();
        if c.fetching || c.pending.is_empty() {
            return;
        }
        if armed == Some(c.high) {
            // Stuck for a whole GAP_WAIT: fetch the gap.
            c.fetching = true;
            tokio::spawn(catch_up(proxy.clone(), self.clone(), room));
        } else {
            // It moved; a newer gap gets its own full wait.
            self.arm(proxy, room, c);
        }
    }

    /// Fetches what the session missed in every room `node` owns.
    pub fn catch_up_node(self: &Arc<Self>, proxy: &Arc<Proxy>, node: usize) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        for (&room, c) in rooms.iter_mut() {
            if proxy.room_node(room) == node && !c.fetching {
                c.fetching = true;
                tokio::spawn(catch_up(proxy.clone(), self.clone(), room));
            }
        }
    }
}

#[derive(Deserialize)]
struct History {
    messages: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Fills the room's gap from its node's store, then delivers what waited.
async fn catch_up(proxy: Arc<Proxy>, s: Arc<PSession>, room: RoomId) {
    loop {
        if s.outbox.is_kicked() {
            return;
        }
        let after = {
            let rooms = s.rooms.lock().unwrap_or_else(|e| e.into_inner());
            rooms.get(&room).map(|c| c.high).unwrap_or(0)
        };
        let fetched = proxy.history(s.user, room, after).await;
        let mut rooms = s.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = rooms.get_mut(&room) else {
            return;
        };
        match fetched {
            Ok(messages) => {
                let n = messages.len();
                let inflight = s.inflight.lock().unwrap_or_else(|e| e.into_inner()).clone();
                for (seq, own_id, frame) in messages {
                    if seq <= c.high {
                        continue;
                    }
                    let mine = own_id.as_ref().is_some_and(|c| inflight.contains_key(c));
                    if c.pending.remove(&seq) != Some(None) && !mine {
                        s.push(frame, Some((room, seq)));
                    }
                    c.high = seq;
                }
                s.drain(room, c);
                if n < FETCH {
                    c.fetching = false;
                    if !c.pending.is_empty() {
                        s.arm(&proxy, room, c);
                    }
                    return;
                }
            }
            Err(e) => {
                // The room's node is unreachable: say so, deliver what waited
                // (the client can `resume` the room later).
                s.push(frames::error(e.code, &e.message, None, Some(room)), None);
                c.fetching = false;
                let pending = std::mem::take(&mut c.pending);
                for (seq, f) in pending {
                    if seq > c.high {
                        if let Some(f) = f {
                            s.push(f, Some((room, seq)));
                        }
                        c.high = seq;
                    }
                }
                return;
            }
        }
    }
}

impl Proxy {
    /// Messages of `room` after `after`, as `message` frames, each with its
    /// `client_id` when `user` sent it.
    async fn history(
        &self,
        user: UserId,
        room: RoomId,
        after: u64,
    ) -> Result<Vec<(u64, Option<String>, Bytes)>, ApiError> {
        let link = &self.links[self.room_node(room)];
        let resp = link
            .request(
                self,
                Method::GET,
                &format!("/api/v1/rooms/{room}/messages?after={after}&limit={FETCH}"),
                &[(USER_HEADER, user.to_string())],
                Bytes::new(),
            )
            .await?;
        let (status, _, body) = read_all(resp).await?;
        if status != StatusCode::OK {
            return Err(ApiError::new(
                status,
                "catch_up_failed",
                format!("could not fetch the room's history ({status})"),
            ));
        }
        let h: History = serde_json::from_slice(&body).map_err(ApiError::internal)?;
        let me = user.to_string();
        let mut out = Vec::with_capacity(h.messages.len());
        for mut m in h.messages {
            let seq = m.get("seq").and_then(|v| v.as_u64()).unwrap_or(0);
            let own = (m.get("from").and_then(|v| v.as_str()) == Some(me.as_str()))
                .then(|| {
                    m.get("client_id")
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                })
                .flatten();
            let mut obj = serde_json::Map::new();
            obj.insert("type".into(), "message".into());
            obj.append(&mut m);
            out.push((
                seq,
                own,
                Bytes::from(serde_json::to_vec(&obj).unwrap_or_default()),
            ));
        }
        Ok(out)
    }
}

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
    s.started(&proxy, &heads);
    if tx.flush().await.is_err() {
        proxy.unregister(&s);
        return;
    }
    for room in resumed {
        tokio::spawn(catch_up(proxy.clone(), s.clone(), room));
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
    loop {
        let frame = rx
            .read_frame::<_, WebSocketError>(&mut |_| async { Ok(()) })
            .await;
        let Some(msg) = asm.feed(frame) else { continue };
        pacer.pace().await;
        let text = match text_of(msg, &s.outbox) {
            Some(Some(t)) => t,
            Some(None) => continue,
            None => return,
        };
        let frame: ClientFrame = match serde_json::from_slice(&text) {
            Ok(f) => f,
            Err(_) => {
                let (code, message, client_id) = explain_bad_frame(&text);
                error(code, &message, client_id.as_deref(), None);
                continue;
            }
        };
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

/// The parts of a node's answer a session looks at.
#[derive(Deserialize, Default)]
struct Answer {
    #[serde(rename = "type", default)]
    kind: String,
    room: Option<RoomId>,
    seq: Option<u64>,
    client_id: Option<String>,
}

/// Sends a client frame to the room's node, on the link's frame stream; the
/// answer comes back as an event ([`PSession::answer`]).
fn forward(
    proxy: &Arc<Proxy>,
    s: &Arc<PSession>,
    room: RoomId,
    client_id: Option<&str>,
    text: Vec<u8>,
) {
    use std::io::Write;
    let link = &proxy.links[proxy.room_node(room)];
    let mut line = Vec::with_capacity(text.len() + 48);
    let _ = write!(line, "{}\t{}\t", s.id, s.user);
    line.extend_from_slice(&text);
    line.push(b'\n');
    if let Some(c) = client_id {
        s.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c.to_string(), room);
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
