//! What the proxy does with its nodes' event streams ([`NodeEvents`] for
//! [`Proxy`]): a room event goes to the local sessions of its users, in
//! seq order per room (the sessions' cursors); a node's answer to one
//! session's frame goes to that session; a revocation kicks the sessions
//! of the token; a node's `hello` (its link is up) re-attaches this
//! proxy's users there and then catches their sessions up on what the node
//! committed meanwhile. A link that goes down fails the sends on their way
//! to its node.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::link::{AttachCmd, Link, NodeEvents};
use super::session::PSession;
use super::state::Proxy;
use crate::hub::close;
use crate::ids::{RoomId, UserId};

impl NodeEvents for Proxy {
    fn line(self: &Arc<Self>, link: &Arc<Link>, line: Bytes) {
        on_line(self, link, line);
    }

    fn down(self: &Arc<Self>, node: usize) {
        self.fail_inflight(node);
        // The node's rooms are served by others now. What it committed and
        // could not send any more is in the database: fetch it, once the
        // commits it had under way have settled.
        let proxy = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            proxy.catch_up_node(node);
        });
    }
}

/// How long after a link went down the sessions fetch what its node
/// committed last (a commit it sent just before it died still lands).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

impl Proxy {
    pub fn revoke(&self, jti: String, exp: i64) {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        for s in sessions.values().flatten().filter(|s| s.jti == jti) {
            s.outbox.kick(close::UNAUTHORIZED);
        }
        drop(sessions);
        self.auth.revoke(jti, exp);
    }

    /// Delivers one node event to the local sessions of `to`.
    pub fn fan_out(
        self: &Arc<Self>,
        to: &[UserId],
        skip: Option<u64>,
        frame: Bytes,
        room_seq: Option<(RoomId, u64)>,
    ) {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        let mut n = 0u64;
        for u in to {
            for s in sessions.get(u).into_iter().flatten() {
                if Some(s.id) == skip {
                    continue;
                }
                n += 1;
                match room_seq {
                    Some((room, seq)) => s.deliver(&self.nodes, room, seq, Some(frame.clone())),
                    None => s.push_other(frame.clone()),
                }
            }
        }
        metrics::counter!("confab_proxy_frames_delivered_total").increment(n);
    }

    /// A node's answer to the frame of one session (`session`, a user of `to`).
    pub fn answer(self: &Arc<Self>, to: &[UserId], session: u64, frame: Bytes) {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        for u in to {
            if let Some(s) = sessions
                .get(u)
                .into_iter()
                .flatten()
                .find(|s| s.id == session)
            {
                s.answer(&self.nodes, frame);
                return;
            }
        }
    }

    /// The link to node `node` went down: every send on its way there is
    /// answered `node_unavailable` (it may have been stored: a resend with
    /// the same client_id answers its seq).
    pub fn fail_inflight(&self, node: usize) {
        let sessions: Vec<Arc<PSession>> = {
            let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            map.values().flatten().cloned().collect()
        };
        for s in sessions {
            s.fail_inflight(&self.nodes, node);
        }
    }

    /// After the link to node `index` came back or went down: every session
    /// fetches what it missed in the rooms that node serves when it is up.
    pub fn catch_up_node(self: &Arc<Self>, index: usize) {
        let sessions: Vec<Arc<PSession>> = {
            let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
            map.values().flatten().cloned().collect()
        };
        for s in sessions {
            s.catch_up_node(&self.nodes, index);
        }
    }
}

#[derive(Deserialize)]
struct Head {
    to: Vec<UserId>,
    skip: Option<u64>,
    only: Option<u64>,
    room: Option<RoomId>,
    seq: Option<u64>,
}

#[derive(Deserialize)]
struct Control {
    hello: Option<Hello>,
    revoke: Option<Revoke>,
}

#[derive(Deserialize)]
struct Hello {
    /// The id the node was started with (`--node`).
    node: Option<String>,
    #[serde(default)]
    revoked: Vec<(String, i64)>,
}

#[derive(Deserialize)]
struct Revoke {
    jti: String,
    exp: i64,
}

fn on_line(proxy: &Arc<Proxy>, link: &Arc<Link>, line: Bytes) {
    link.events.fetch_add(1, Ordering::Relaxed);
    if let Some(tab) = line.iter().position(|&b| b == b'\t') {
        let Ok(head) = serde_json::from_slice::<Head>(&line[..tab]) else {
            tracing::warn!(node = %link.node.id, "unreadable event from node");
            return;
        };
        let frame = line.slice(tab + 1..);
        if let Some(session) = head.only {
            proxy.answer(&head.to, session, frame);
            return;
        }
        let room_seq = head.room.zip(head.seq);
        if room_seq.is_none() && !proxy.announces_presence(link.index, &frame) {
            return;
        }
        proxy.fan_out(&head.to, head.skip, frame, room_seq);
        return;
    }
    let Ok(c) = serde_json::from_slice::<Control>(&line) else {
        return;
    };
    if let Some(r) = c.revoke {
        proxy.revoke(r.jti, r.exp);
    }
    if let Some(h) = c.hello {
        if h.node.as_deref() != Some(link.node.id.as_str()) {
            // Two nodes started with one id (or a list that names the wrong
            // address): serving its rooms there would split them.
            let why = format!(
                "the node at {} says it is {:?}, not {}: a duplicate or misplaced node id; not using it",
                link.node.addr,
                h.node.as_deref().unwrap_or("?"),
                link.node.id
            );
            tracing::error!(node = %link.node.id, "{why}");
            link.refuse(&why);
            return;
        }
        for (jti, exp) in h.revoked {
            proxy.revoke(jti, exp);
        }
        let first = link.reconnects.fetch_add(1, Ordering::Relaxed) == 0;
        link.up.store(true, Ordering::Release);
        metrics::gauge!("confab_proxy_node_up", "node" => link.node.id.clone()).set(1.0);
        tracing::info!(node = %link.node.id, "link to node up");
        // Re-attach this proxy's users, then catch their sessions up on
        // what the node committed while the link was down.
        let users = proxy.attached_users();
        if !users.is_empty() || !first {
            let (tx, rx) = oneshot::channel();
            link.attach(AttachCmd {
                ops: users.into_iter().map(|u| (true, u)).collect(),
                reply: Some(tx),
            });
            let proxy = proxy.clone();
            let index = link.index;
            tokio::spawn(async move {
                let _ = rx.await;
                proxy.catch_up_node(index);
            });
        }
    }
}
