//! Delivery to a client session on a proxy ([`PSession`]): room events
//! arrive on the nodes' event streams, once per proxy, and are delivered
//! here per session, **in seq order per room with no gaps and no
//! duplicates**: a session keeps, per room, the highest seq it has
//! delivered; a frame past a gap waits while the gap is fetched from the
//! room's node (after `resume`, after a link came back, or after 1 s if
//! the missing frame never came). A node's answer to one of the session's
//! frames (ack, error) goes out in order with the room's events; the
//! session's sends in flight are answered `node_unavailable` when their
//! node's link goes down.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::Deserialize;

use super::link::read_all;
use super::placement::Nodes;
use crate::cluster::link::USER_HEADER;
use crate::error::ApiError;
use crate::frames;
use crate::hub::{OutFrame, SessionOutbox, close};
use crate::ids::{RoomId, UserId};

/// How long a gap may stay open before it is fetched from the store.
const GAP_WAIT: Duration = Duration::from_secs(1);
/// Frames one session may hold back behind a gap before it is closed (4008;
/// it resumes on reconnect).
const MAX_PENDING: usize = 10_000;
/// Messages per history request of a catch-up.
const FETCH: usize = 200;

/// One room's delivery state in a session.
pub(super) struct Cursor {
    /// The highest seq delivered (or acked to this session).
    high: u64,
    /// Frames past a gap; None: the session's own message (its ack went out).
    pending: BTreeMap<u64, Option<Bytes>>,
    pub(super) fetching: bool,
    /// A gap timer is armed: the `high` it saw. When it fires it fetches only
    /// if nothing moved since (a gap that keeps closing by itself is not a
    /// stuck one).
    timer: Option<u64>,
    /// Created by an event while the session was starting: held until the
    /// nodes say where the room stood when the session attached.
    held: bool,
}

impl Cursor {
    pub(super) fn at(high: u64) -> Cursor {
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
    pub(super) rooms: Mutex<HashMap<RoomId, Cursor>>,
    /// Until the attach answers are in (see [`Cursor::held`]).
    pub(super) starting: std::sync::atomic::AtomicBool,
    /// This session's sends on their way to a node: client_id → (room, the
    /// node it went to). A catch-up that meets one before its ack does not
    /// deliver it as a `message`; a link that goes down answers the ones
    /// on their way to its node `node_unavailable`.
    pub(super) inflight: Mutex<HashMap<String, (RoomId, usize)>>,
}

impl PSession {
    /// A frame that is not a room message.
    pub fn push_other(&self, bytes: Bytes) {
        self.outbox.push_bytes(bytes);
    }

    /// The node's answer to one of this session's frames (an ack, an
    /// error, a pong), in order with the room's other events.
    pub fn answer(self: &Arc<Self>, nodes: &Arc<Nodes>, frame: Bytes) {
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
            self.deliver(nodes, room, seq, None);
        }
    }

    /// The link to `node` went down: its sends in flight get no ack.
    pub fn fail_inflight(&self, nodes: &Nodes, node: usize) {
        let failed: Vec<(String, (RoomId, usize))> = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extract_if(|_, (_, n)| *n == node)
            .collect();
        let e = super::link::node_unavailable(&nodes.link(node).node.id);
        for (c, (room, _)) in failed {
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
        nodes: &Arc<Nodes>,
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
            self.arm(nodes, room, c);
        }
    }

    /// Arms the room's gap timer (once).
    fn arm(self: &Arc<Self>, nodes: &Arc<Nodes>, room: RoomId, c: &mut Cursor) {
        if c.timer.is_none() {
            c.timer = Some(c.high);
            let (s, p) = (self.clone(), nodes.clone());
            tokio::spawn(async move {
                tokio::time::sleep(GAP_WAIT).await;
                s.gap_timer(&p, room);
            });
        }
    }

    /// The attach answers are in: each room the user had on a node starts at
    /// its highest seq then (resumed rooms keep their resume position).
    pub(super) fn started(self: &Arc<Self>, nodes: &Arc<Nodes>, heads: &[(RoomId, u64)]) {
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
                self.arm(nodes, room, c);
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

    fn gap_timer(self: &Arc<Self>, nodes: &Arc<Nodes>, room: RoomId) {
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
            tokio::spawn(catch_up(nodes.clone(), self.clone(), room));
        } else {
            // It moved; a newer gap gets its own full wait.
            self.arm(nodes, room, c);
        }
    }

    /// Fetches what the session missed in every room that node `node`
    /// serves when its link is up: after the link came back (what the node
    /// committed meanwhile), and after it went down (what it committed and
    /// could not send: the rooms' new nodes answer from the database).
    pub fn catch_up_node(self: &Arc<Self>, nodes: &Arc<Nodes>, node: usize) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        for (&room, c) in rooms.iter_mut() {
            if nodes.served_by_when_up(room.0, node) && !c.fetching {
                c.fetching = true;
                tokio::spawn(catch_up(nodes.clone(), self.clone(), room));
            }
        }
    }
}

#[derive(Deserialize)]
struct History {
    messages: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Fills the room's gap from the database (through the node that serves
/// the room now), then delivers what waited.
pub(super) async fn catch_up(nodes: Arc<Nodes>, s: Arc<PSession>, room: RoomId) {
    loop {
        if s.outbox.is_kicked() {
            return;
        }
        let after = {
            let rooms = s.rooms.lock().unwrap_or_else(|e| e.into_inner());
            rooms.get(&room).map(|c| c.high).unwrap_or(0)
        };
        let fetched = history(&nodes, s.user, room, after).await;
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
                        s.arm(&nodes, room, c);
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

/// Messages of `room` after `after`, as `message` frames, each with its
/// `client_id` when `user` sent it.
async fn history(
    nodes: &Nodes,
    user: UserId,
    room: RoomId,
    after: u64,
) -> Result<Vec<(u64, Option<String>, Bytes)>, ApiError> {
    let link = nodes.link(nodes.room_node(room));
    let resp = link
        .request(
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

/// The parts of a node's answer a session looks at.
#[derive(Deserialize, Default)]
struct Answer {
    #[serde(rename = "type", default)]
    kind: String,
    room: Option<RoomId>,
    seq: Option<u64>,
    client_id: Option<String>,
}
