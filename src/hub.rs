//! Who is online, and fan-out to them.
//!
//! Every authenticated WebSocket session has a [`SessionOutbox`]: a bounded
//! queue of ready-to-write frames drained by the session's writer task. The
//! [`Hub`] maps users to their sessions. Fan-out never waits: a frame is
//! pushed with `try_send`, and a session whose queue is full is kicked
//! (closed with 4008) instead of slowing down the writer or other sessions —
//! it catches up with `resume` when it reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::ids::{RoomId, UserId};
use crate::telemetry::LiveStats;

/// Close codes the server uses (see docs/PROTOCOL.md).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const TOO_SLOW: u16 = 4008;
    pub const TOO_MANY_SESSIONS: u16 = 4029;
}

/// One frame queued for a session: the serialized JSON, shared between all
/// recipients, and for `message` frames their room and seq (so that the
/// session can drop live copies of what its catch-up already sent).
#[derive(Clone)]
pub struct OutFrame {
    pub bytes: Bytes,
    pub room_seq: Option<(RoomId, u64)>,
    /// A WebSocket pong (answering a ping) instead of a text frame.
    pub pong: bool,
}

impl OutFrame {
    pub fn text(bytes: Bytes) -> OutFrame {
        OutFrame {
            bytes,
            room_seq: None,
            pong: false,
        }
    }
}

/// A session's queue of frames to write. It is a `VecDeque` that the session
/// writer takes whole for each batch, so an idle session holds no queue
/// memory at all (a channel would keep a block of slots allocated).
pub struct SessionOutbox {
    pub id: u64,
    pub user: UserId,
    /// The token id the session authenticated with (logout closes it).
    pub jti: String,
    queue: Mutex<VecDeque<OutFrame>>,
    capacity: usize,
    kicked: AtomicBool,
    kick_code: AtomicU16,
    /// Wakes the session writer when frames were queued.
    pub ready: Notify,
    /// Wakes the session writer when the session must close.
    pub kick_notify: Notify,
    /// A proxy's session on a cluster node: frames go down the proxy's event
    /// stream, addressed to that session alone.
    forward: Option<Arc<ProxyLink>>,
    /// Where a kick for a full queue is counted besides the metrics (a
    /// node's sessions: its live totals; see [`Hub::outbox`]).
    live: Option<Arc<LiveStats>>,
}

impl SessionOutbox {
    pub fn new(id: u64, user: UserId, jti: String, capacity: usize) -> Arc<Self> {
        SessionOutbox::counted(id, user, jti, capacity, None)
    }

    /// [`SessionOutbox::new`], counting its kicks for a full queue in
    /// `live` too.
    fn counted(
        id: u64,
        user: UserId,
        jti: String,
        capacity: usize,
        live: Option<Arc<LiveStats>>,
    ) -> Arc<Self> {
        Arc::new(SessionOutbox {
            id,
            user,
            jti,
            queue: Mutex::new(VecDeque::new()),
            capacity,
            kicked: AtomicBool::new(false),
            kick_code: AtomicU16::new(close::NORMAL),
            ready: Notify::new(),
            kick_notify: Notify::new(),
            forward: None,
            live,
        })
    }

    /// The node-side stand-in of a proxy's session `id` (the proxy's own
    /// number, [`REMOTE_SESSION`] set): what is pushed to it (acks, errors,
    /// pongs) goes down `link` to that session only, in order with the
    /// link's other events.
    pub fn forwarding(id: u64, user: UserId, link: Arc<ProxyLink>) -> Arc<Self> {
        Arc::new(SessionOutbox {
            id: REMOTE_SESSION | id,
            user,
            jti: String::new(),
            queue: Mutex::new(VecDeque::new()),
            capacity: 0,
            kicked: AtomicBool::new(false),
            kick_code: AtomicU16::new(close::NORMAL),
            ready: Notify::new(),
            kick_notify: Notify::new(),
            forward: Some(link),
            live: None,
        })
    }

    /// Queues a frame without waiting. A full queue kicks the session (4008).
    /// Returns whether the frame was queued.
    pub fn push(&self, frame: OutFrame) -> bool {
        if let Some(link) = &self.forward {
            link.push(LinkEvent::Frame {
                frame,
                to: vec![self.user],
                skip: None,
                only: Some(self.id & !REMOTE_SESSION),
            });
            return !link.is_closed();
        }
        if self.kicked.load(Ordering::Relaxed) {
            return false;
        }
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= self.capacity {
                drop(q);
                metrics::counter!("confab_slow_client_disconnects_total").increment(1);
                if let Some(live) = &self.live {
                    LiveStats::add(&live.slow_disconnects, 1);
                }
                self.kick(close::TOO_SLOW);
                return false;
            }
            q.push_back(frame);
        }
        self.ready.notify_one();
        true
    }

    pub fn push_bytes(&self, bytes: Bytes) -> bool {
        self.push(OutFrame::text(bytes))
    }

    /// Everything queued so far (the writer's next batch).
    pub fn take(&self) -> VecDeque<OutFrame> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Asks the session to close with `code` (the first request wins).
    pub fn kick(&self, code: u16) {
        if !self.kicked.swap(true, Ordering::AcqRel) {
            self.kick_code.store(code, Ordering::Release);
            self.kick_notify.notify_one();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    pub fn kick_code(&self) -> u16 {
        self.kick_code.load(Ordering::Acquire)
    }
}

/// Session ids at or above this bit are a proxy's sessions (docs/SCALEOUT.md):
/// a node's own sessions count up from 1, a proxy's are its random 62-bit ids
/// with this bit set when they reach a node.
pub const REMOTE_SESSION: u64 = 1 << 63;

/// What goes down a proxy's event stream.
pub enum LinkEvent {
    /// A frame for `to` (the proxy's attached users), minus session `skip`;
    /// or, with `only`, for that one proxy session of `to` (its ack, error).
    Frame {
        frame: OutFrame,
        to: Vec<UserId>,
        skip: Option<u64>,
        only: Option<u64>,
    },
    /// A token was revoked (logout): every proxy must refuse it from now on.
    Revoke { jti: String, exp: i64 },
}

/// A proxy's event stream on this node: the frames for every user the proxy
/// has attached. Consecutive pushes of one frame (the same shared buffer) to
/// several users coalesce into one event, so a message crosses the link once
/// per proxy however many of its members sit behind that proxy.
pub struct ProxyLink {
    pub id: u64,
    pub proxy: String,
    queue: Mutex<Vec<LinkEvent>>,
    capacity: usize,
    closed: AtomicBool,
    pub ready: Notify,
}

impl ProxyLink {
    pub fn new(id: u64, proxy: String, capacity: usize) -> Arc<ProxyLink> {
        Arc::new(ProxyLink {
            id,
            proxy,
            queue: Mutex::new(Vec::new()),
            capacity,
            closed: AtomicBool::new(false),
            ready: Notify::new(),
        })
    }

    fn push_frame(&self, frame: &OutFrame, user: UserId, skip: Option<u64>) -> bool {
        if self.is_closed() {
            return false;
        }
        let skip = skip
            .filter(|s| s & REMOTE_SESSION != 0)
            .map(|s| s & !REMOTE_SESSION);
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(LinkEvent::Frame {
                frame: last,
                to,
                skip: last_skip,
                only: None,
            }) = q.last_mut()
                && last.bytes.as_ptr() == frame.bytes.as_ptr()
                && last.bytes.len() == frame.bytes.len()
                && last.pong == frame.pong
            {
                if !to.contains(&user) {
                    to.push(user);
                }
                if skip.is_some() {
                    *last_skip = skip;
                }
                return true;
            }
            if q.len() >= self.capacity {
                drop(q);
                // The proxy is not keeping up: end its stream; it reconnects,
                // re-attaches and catches its sessions up from the store.
                metrics::counter!("confab_cluster_link_overflows_total").increment(1);
                self.close();
                return false;
            }
            q.push(LinkEvent::Frame {
                frame: frame.clone(),
                to: vec![user],
                skip,
                only: None,
            });
        }
        self.ready.notify_one();
        true
    }

    pub fn push(&self, event: LinkEvent) {
        if self.is_closed() {
            return;
        }
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        self.ready.notify_one();
    }

    /// Everything queued so far.
    pub fn take(&self) -> Vec<LinkEvent> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Where a user is online: sessions on this server, and proxies that have
/// attached the user (cluster nodes only).
#[derive(Default)]
struct Present {
    local: Vec<Arc<SessionOutbox>>,
    remote: Vec<Arc<ProxyLink>>,
}

impl Present {
    fn is_empty(&self) -> bool {
        self.local.is_empty() && self.remote.is_empty()
    }
}

/// The server's online sessions. `Hub::default()` counts into live totals
/// of its own (for tools and benches that read none).
#[derive(Default)]
pub struct Hub {
    sessions: RwLock<HashMap<UserId, Present>>,
    /// The current event stream of each proxy, by proxy name.
    links: Mutex<HashMap<String, Arc<ProxyLink>>>,
    /// The server's live totals: its sessions count their kicks there.
    live: Arc<LiveStats>,
}

impl Hub {
    /// A hub whose sessions count into `live` (the server's totals).
    pub fn new(live: Arc<LiveStats>) -> Hub {
        Hub {
            live,
            ..Hub::default()
        }
    }

    /// A new session's outbox (see [`SessionOutbox::new`]) whose kicks for
    /// a full queue are counted in this hub's live totals too.
    pub fn outbox(
        &self,
        id: u64,
        user: UserId,
        jti: String,
        capacity: usize,
    ) -> Arc<SessionOutbox> {
        SessionOutbox::counted(id, user, jti, capacity, Some(self.live.clone()))
    }

    /// Adds a session; returns true if the user was offline until now.
    pub fn register(&self, s: Arc<SessionOutbox>) -> bool {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let p = map.entry(s.user).or_default();
        let first = p.is_empty();
        p.local.push(s);
        metrics::gauge!("confab_sessions_online").increment(1.0);
        first
    }

    /// `user`'s sessions on this server now.
    pub fn sessions_of(&self, user: UserId) -> usize {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.get(&user).map_or(0, |p| p.local.len())
    }

    /// Sessions online now.
    pub fn online_sessions(&self) -> usize {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(|p| p.local.len()).sum()
    }

    /// Removes a session; returns true if the user is now offline.
    pub fn unregister(&self, s: &SessionOutbox) -> bool {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let Some(p) = map.get_mut(&s.user) else {
            return false;
        };
        let before = p.local.len();
        p.local.retain(|x| x.id != s.id);
        if p.local.len() < before {
            metrics::gauge!("confab_sessions_online").decrement(1.0);
        }
        if p.is_empty() {
            map.remove(&s.user);
            true
        } else {
            false
        }
    }

    /// A proxy has `user` online; returns true if the user was offline.
    pub fn attach(&self, user: UserId, link: &Arc<ProxyLink>) -> bool {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let p = map.entry(user).or_default();
        let first = p.is_empty();
        if !p.remote.iter().any(|l| l.id == link.id) {
            p.remote.push(link.clone());
        }
        first
    }

    /// A proxy no longer has `user` online; returns true if now offline.
    pub fn detach(&self, user: UserId, link: u64) -> bool {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let Some(p) = map.get_mut(&user) else {
            return false;
        };
        let before = p.remote.len();
        p.remote.retain(|l| l.id != link);
        if before != p.remote.len() && p.is_empty() {
            map.remove(&user);
            true
        } else {
            false
        }
    }

    /// Makes `link` its proxy's current event stream; returns the one it
    /// replaces (closed here; the caller detaches its users).
    pub fn add_link(&self, link: Arc<ProxyLink>) -> Option<Arc<ProxyLink>> {
        let old = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(link.proxy.clone(), link);
        if let Some(o) = &old {
            o.close();
        }
        old
    }

    /// The proxy's current event stream, if `id` still is it.
    pub fn link(&self, proxy: &str) -> Option<Arc<ProxyLink>> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(proxy)
            .cloned()
    }

    /// Forgets a closed link; returns the users now offline.
    pub fn remove_link(&self, link: &ProxyLink) -> Vec<UserId> {
        link.close();
        {
            let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            if links.get(&link.proxy).is_some_and(|l| l.id == link.id) {
                links.remove(&link.proxy);
            }
        }
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        map.retain(|&user, p| {
            p.remote.retain(|l| l.id != link.id);
            if p.is_empty() {
                gone.push(user);
                false
            } else {
                true
            }
        });
        gone
    }

    /// Every proxy's current event stream.
    pub fn links(&self) -> Vec<Arc<ProxyLink>> {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn is_online(&self, user: UserId) -> bool {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.contains_key(&user)
    }

    /// Pushes `frame` to every session of `user` except `skip_session`, here
    /// and behind every proxy that has the user attached. Returns whether at
    /// least one session or proxy took it.
    pub fn send_to_user(&self, user: UserId, frame: &OutFrame, skip_session: Option<u64>) -> bool {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        if let Some(p) = map.get(&user) {
            for s in &p.local {
                if Some(s.id) != skip_session && s.push(frame.clone()) {
                    any = true;
                }
            }
            for l in &p.remote {
                any |= l.push_frame(frame, user, skip_session);
            }
        }
        any
    }

    /// Closes every session authenticated with token `jti` (logout), and
    /// tells every proxy that the token is revoked.
    pub fn close_token(&self, user: UserId, jti: &str, exp: i64) {
        {
            let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = map.get(&user) {
                for s in p.local.iter().filter(|s| s.jti == jti) {
                    s.kick(close::UNAUTHORIZED);
                }
            }
        }
        for l in self.links() {
            l.push(LinkEvent::Revoke {
                jti: jti.to_string(),
                exp,
            });
        }
    }

    /// Closes every session and proxy stream (server shutdown).
    pub fn close_all(&self, code: u16) {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        for s in map.values().flat_map(|p| p.local.iter()) {
            s.kick(code);
        }
        drop(map);
        for l in self.links() {
            l.close();
        }
    }
}
