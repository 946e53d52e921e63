//! Which node serves what, as the proxy sees the cluster: [`Nodes`] holds
//! the cluster's ring and the link to each node. Every node reads and
//! writes the one database, so any node *can* serve anything; the ring
//! picks, among the nodes whose link is up, the one that serves each room
//! (it sequences and fans out the room's messages), each user's requests,
//! each username's signup and login, and the wallet's transfers. A node
//! whose link goes down hands exactly its share to the others, and gets
//! exactly that share back when its link is up again. A new group goes to
//! the next node that is up, in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::link::Link;
use crate::cluster::{Cluster, ring};
use crate::error::ApiError;
use crate::ids::{RoomId, UserId};

/// The cluster's nodes and the proxy's link to each (by the same index).
pub struct Nodes {
    pub cluster: Arc<Cluster>,
    pub links: Vec<Arc<Link>>,
    next_group_node: AtomicUsize,
}

impl Nodes {
    pub fn new(cluster: Arc<Cluster>, links: Vec<Arc<Link>>) -> Nodes {
        Nodes {
            cluster,
            links,
            next_group_node: AtomicUsize::new(0),
        }
    }

    /// The node serving ring key `key`: its owner among the nodes whose
    /// link is up (when none is, its owner on the whole ring, whose link
    /// then waits briefly and answers `node_unavailable`).
    pub fn serving(&self, key: u64) -> usize {
        let ring = &self.cluster.ring;
        ring.live_owner_index(key, |i| self.links[i].is_up())
            .unwrap_or_else(|| ring.owner_index(key))
    }

    /// Whether node `node` would serve `key` if its link were up (what moved
    /// off it when its link went down, and comes back when it is up).
    pub fn served_by_when_up(&self, key: u64, node: usize) -> bool {
        self.cluster
            .ring
            .live_owner_index(key, |i| i == node || self.links[i].is_up())
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

/// The next node that is up, in turn (where a new group goes).
pub(super) fn pick_node(p: &Nodes) -> Result<usize, ApiError> {
    let n = p.links.len();
    for _ in 0..n {
        let i = p.next_group_node.fetch_add(1, Ordering::Relaxed) % n;
        if p.links[i].is_up() {
            return Ok(i);
        }
    }
    Err(ApiError::busy("no node is available"))
}
