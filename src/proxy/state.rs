//! What one proxy holds, shared by the parts of the proxy above the links
//! and the sessions' delivery: [`Proxy`] (its configuration, the nodes and
//! their links, the token check, the public-profile cache, its counters)
//! and the registry of the client sessions on this proxy by user —
//! registering a session, forgetting it (detaching its user on every node
//! after their last one), attaching a new session's user everywhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Request;
use hyper::body::Incoming;
use hyper::header;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;

use super::link::{AttachCmd, Attached};
use super::placement::Nodes;
use super::session::PSession;
use crate::auth::{Auth, Caller};
use crate::config::Config;
use crate::error::ApiError;
use crate::ids::UserId;

/// How long a new session waits for each node's answer to its attach.
pub(super) const ATTACH_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Proxy {
    pub config: Config,
    /// The nodes, the link to each, and which of them owns what (shared
    /// with the sessions' delivery, which fetches from the rooms' nodes).
    pub nodes: Arc<Nodes>,
    pub auth: Auth,
    /// This proxy's name on its links (unique per process).
    pub name: String,
    pub(super) sessions: RwLock<HashMap<UserId, Vec<Arc<PSession>>>>,
    /// Public profiles by id (they never change), for room creation.
    pub(super) profiles: Mutex<HashMap<UserId, Bytes>>,
    pub(super) metrics: PrometheusHandle,
    pub(super) started: Instant,
    /// Open client connections (`max_connections`, `max_connections_per_ip`).
    pub(crate) connections: Arc<crate::limits::Connections>,
}

impl Proxy {
    /// `user`'s sessions on this proxy now.
    pub(super) fn sessions_of(&self, user: UserId) -> usize {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.get(&user).map_or(0, Vec::len)
    }

    pub(super) fn register(&self, s: &Arc<PSession>) {
        let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
        map.entry(s.user).or_default().push(s.clone());
        metrics::gauge!("confab_sessions_online").increment(1.0);
    }

    /// Forgets a session; the user's last here is detached on every node.
    pub(super) fn unregister(&self, s: &PSession) {
        let last = {
            let mut map = self.sessions.write().unwrap_or_else(|e| e.into_inner());
            let Some(list) = map.get_mut(&s.user) else {
                return;
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
        };
        if last {
            for l in self.nodes.current() {
                l.attach(AttachCmd {
                    ops: vec![(false, s.user)],
                    reply: None,
                });
            }
        }
    }

    /// Users with a session here.
    pub fn attached_users(&self) -> Vec<UserId> {
        let map = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        map.keys().copied().collect()
    }

    /// Attaches `user` on every node; returns what the nodes that answered
    /// within 2 s said: presence frames of their peers (each peer's from
    /// the node that serves the peer), and their rooms' highest seqs.
    pub(super) async fn attach_everywhere(&self, user: UserId) -> Vec<Attached> {
        let mut waits = Vec::new();
        for l in self.nodes.current() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            l.attach(AttachCmd {
                ops: vec![(true, user)],
                reply: Some(tx),
            });
            waits.push(rx);
        }
        let mut out = Vec::new();
        for (node, rx) in waits.into_iter().enumerate() {
            if let Ok(Ok(lines)) = tokio::time::timeout(ATTACH_TIMEOUT, rx).await {
                out.extend(lines.into_iter().map(|(_, a)| a).filter(|a| match a {
                    Attached::Presence(f) => self.announces_presence(node, f),
                    Attached::Head(..) => true,
                }));
            }
        }
        out
    }

    /// Every node sees every proxy's users attach and detach, so every node
    /// announces each presence change; the one that serves the user speaks
    /// for them (false: a `presence` frame about a user node `node` does not
    /// serve, dropped). Other frames pass.
    pub fn announces_presence(&self, node: usize, frame: &[u8]) -> bool {
        match presence_user(frame) {
            Some(user) => self.nodes.user_node(user) == node,
            None => true,
        }
    }

    pub(super) fn caller(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        let value = req
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or_else(crate::auth::no_bearer_token)?;
        self.auth.verify(crate::auth::bearer_token(value)?)
    }
}

/// The user a `presence` frame is about (None: another frame).
fn presence_user(frame: &[u8]) -> Option<UserId> {
    #[derive(Deserialize)]
    struct Presence {
        #[serde(rename = "type")]
        kind: String,
        user: Option<UserId>,
    }
    if !frame.starts_with(b"{\"type\":\"presence\"") {
        return None;
    }
    let p: Presence = serde_json::from_slice(frame).ok()?;
    (p.kind == "presence").then_some(p.user).flatten()
}
