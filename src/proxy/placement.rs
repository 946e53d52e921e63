//! Which node serves what, as the proxy sees the cluster: [`Nodes`] holds
//! the node list (the ring over its ids) and the link to each node. Every
//! node reads and writes the one database, so any node *can* serve
//! anything; the ring picks, among the listed nodes whose link is up, the
//! one that serves each room (it sequences and fans out the room's
//! messages), each user's requests, each username's signup and login, and
//! the wallet's transfers. A node whose link goes down hands exactly its
//! share to the others, and gets exactly that share back when its link is
//! up again; a node added to the list (a reload) takes its share once its
//! link is up, and one removed hands its share on at once. A new group
//! goes to the next node that is up, in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use super::link::{AttachCmd, Link, LinkToken};
use crate::cluster::{Cluster, Ring, ring};
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};

/// The node list in force: the ring over its ids, and for each of them (by
/// the ring's index) the index of its link.
struct Members {
    ring: Ring,
    links: Vec<usize>,
}

/// The cluster's nodes and the proxy's link to each.
pub struct Nodes {
    /// Every link this proxy made, by [`Link::index`]: a node removed from
    /// the list keeps its index (its link is drained, then stopped).
    links: RwLock<Vec<Arc<Link>>>,
    members: RwLock<Arc<Members>>,
    token: Arc<LinkToken>,
    next_group_node: AtomicUsize,
}

/// Links made for nodes added to the list: each with its attach queue, to
/// be started by the caller ([`super::link::run`], `attach_loop`).
pub type NewLinks = Vec<(Arc<Link>, mpsc::UnboundedReceiver<AttachCmd>)>;

impl Nodes {
    /// The nodes of `cluster`, with a link each (not started yet).
    pub fn new(cluster: &Cluster, token: Arc<LinkToken>) -> (Nodes, NewLinks) {
        let nodes = Nodes {
            links: RwLock::new(Vec::new()),
            members: RwLock::new(Arc::new(Members {
                ring: Ring::new(&[]),
                links: Vec::new(),
            })),
            token,
            next_group_node: AtomicUsize::new(0),
        };
        let (added, _) = nodes.set_list(cluster);
        (nodes, added)
    }

    fn members(&self) -> Arc<Members> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Link `i` (see [`Link::index`]).
    pub fn link(&self, i: usize) -> Arc<Link> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        links[i.min(links.len().saturating_sub(1))].clone()
    }

    /// The links of the nodes in the list now, in its order.
    pub fn current(&self) -> Vec<Arc<Link>> {
        let m = self.members();
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        m.links.iter().map(|&i| links[i].clone()).collect()
    }

    /// Applies a node list: a node that is new (or moved to another
    /// address) gets a new link, returned to be started; the links of nodes
    /// no longer listed are returned to be drained and stopped. The other
    /// links, and so the rooms their nodes serve, stay as they are.
    pub fn set_list(&self, cluster: &Cluster) -> (NewLinks, Vec<Arc<Link>>) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        let old = self.members();
        let mut added = Vec::new();
        let mut member_links = Vec::with_capacity(cluster.nodes.len());
        for n in &cluster.nodes {
            let existing = old
                .links
                .iter()
                .map(|&i| &links[i])
                .find(|l| l.node.id == n.id && l.node.addr == n.addr);
            match existing {
                Some(l) => member_links.push(l.index),
                None => {
                    let (l, rx) = Link::new(links.len(), n.clone(), self.token.clone());
                    member_links.push(l.index);
                    links.push(l.clone());
                    added.push((l, rx));
                }
            }
        }
        let removed = old
            .links
            .iter()
            .filter(|i| !member_links.contains(i))
            .map(|&i| links[i].clone())
            .collect();
        let ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Members {
            ring: Ring::new(&ids),
            links: member_links,
        });
        (added, removed)
    }

    /// The link index of the node serving ring key `key`: its owner among
    /// the listed nodes whose link is up (when none is, its owner on the
    /// whole ring, whose link then waits briefly and answers
    /// `node_unavailable`).
    pub fn serving(&self, key: u64) -> usize {
        let m = self.members();
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        let at = m
            .ring
            .live_owner_index(key, |r| links[m.links[r]].is_up())
            .unwrap_or_else(|| m.ring.owner_index(key));
        m.links.get(at).copied().unwrap_or(0)
    }

    /// Whether link `node` would serve `key` if it were up (what moved off
    /// it when its link went down, and comes back when it is up).
    pub fn served_by_when_up(&self, key: u64, node: usize) -> bool {
        let m = self.members();
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        m.ring
            .live_owner_index(key, |r| m.links[r] == node || links[m.links[r]].is_up())
            .map(|r| m.links[r])
            == Some(node)
    }

    pub fn room_node(&self, room: RoomId) -> usize {
        self.serving(room.0)
    }

    pub fn user_node(&self, user: UserId) -> usize {
        self.serving(user.0)
    }

    pub fn name_node(&self, name: &str) -> usize {
        self.serving(ring::username_key(name))
    }

    pub fn wallet_node(&self) -> usize {
        self.serving(ring::wallet_key())
    }
}

/// The next listed node that is up, in turn (where a new group goes).
pub(super) fn pick_node(p: &Nodes) -> Result<usize, ApiError> {
    let current = p.current();
    let n = current.len();
    for _ in 0..n {
        let i = p.next_group_node.fetch_add(1, Ordering::Relaxed) % n;
        if current[i].is_up() {
            return Ok(current[i].index);
        }
    }
    Err(ApiError::busy("no node is available"))
}
