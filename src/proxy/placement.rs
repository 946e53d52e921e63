//! Which node owns what, as the proxy sees the cluster: [`Nodes`] holds
//! the cluster's ring and the link to each node, and answers for a user, a
//! room, a username or the wallet which node owns it; a new group goes to
//! the next node that is up, in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::link::Link;
use crate::cluster::Cluster;
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

    pub fn node_index(&self, id: &str) -> usize {
        self.cluster
            .nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or(0)
    }

    pub fn room_node(&self, room: RoomId) -> usize {
        self.cluster.ring.owner_index(room.0)
    }

    pub fn user_node(&self, user: UserId) -> usize {
        self.cluster.ring.owner_index(user.0)
    }

    pub fn wallet_node(&self) -> usize {
        self.cluster
            .ring
            .owner_index(crate::cluster::ring::wallet_key())
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
