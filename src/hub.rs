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

/// Close codes the server uses (see docs/PROTOCOL.md).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const TOO_SLOW: u16 = 4008;
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
}

impl SessionOutbox {
    pub fn new(id: u64, user: UserId, jti: String, capacity: usize) -> Arc<Self> {
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
        })
    }

    /// Queues a frame without waiting. A full queue kicks the session (4008).
    /// Returns whether the frame was queued.
    pub fn push(&self, frame: OutFrame) -> bool {
        if self.kicked.load(Ordering::Relaxed) {
            return false;
        }
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= self.capacity {
                drop(q);
                metrics::counter!("confab_slow_client_disconnects_total").increment(1);
                crate::status::LiveStats::add(&crate::status::LIVE.slow_disconnects, 1);
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

    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    pub fn kick_code(&self) -> u16 {
        self.kick_code.load(Ordering::Acquire)
    }
}

#[derive(Default)]
pub struct Hub {
    sessions: RwLock<HashMap<UserId, Vec<Arc<SessionOutbox>>>>,
}

impl Hub {
    /// Adds a session; returns true if it is the user's first (now online).
    pub fn register(&self, s: Arc<SessionOutbox>) -> bool {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(s.user).or_default();
        list.push(s);
        metrics::gauge!("confab_sessions_online").increment(1.0);
        list.len() == 1
    }

    /// Sessions online now.
    pub fn online_sessions(&self) -> usize {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(Vec::len).sum()
    }

    /// Removes a session; returns true if it was the user's last (now offline).
    pub fn unregister(&self, s: &SessionOutbox) -> bool {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        let Some(list) = map.get_mut(&s.user) else {
            return false;
        };
        let before = list.len();
        list.retain(|x| x.id != s.id);
        if list.len() < before {
            metrics::gauge!("confab_sessions_online").decrement(1.0);
        }
        if list.is_empty() {
            map.remove(&s.user);
            true
        } else {
            false
        }
    }

    pub fn is_online(&self, user: UserId) -> bool {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.contains_key(&user)
    }

    /// Pushes `frame` to every session of `user` except `skip_session`.
    /// Returns whether at least one session took it.
    pub fn send_to_user(&self, user: UserId, frame: &OutFrame, skip_session: Option<u64>) -> bool {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        if let Some(list) = map.get(&user) {
            for s in list {
                if Some(s.id) != skip_session && s.push(frame.clone()) {
                    any = true;
                }
            }
        }
        any
    }

    /// Closes every session authenticated with token `jti` (logout).
    pub fn close_token(&self, user: UserId, jti: &str) {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = map.get(&user) {
            for s in list.iter().filter(|s| s.jti == jti) {
                s.kick(close::UNAUTHORIZED);
            }
        }
    }

    /// Closes every session (server shutdown).
    pub fn close_all(&self, code: u16) {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        for s in map.values().flatten() {
            s.kick(code);
        }
    }
}
