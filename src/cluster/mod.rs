//! Scale-out: a node's side of the cluster — link tokens, the endpoints the
//! proxies and other nodes call, and the outbox of what one node owes
//! another. The design, and what of it is built, is in docs/SCALEOUT.md;
//! placement (the ring, who owns what) is `placement/`.

pub mod link;
pub mod node;
pub mod outbox;

pub use crate::placement::{Cluster, Node, Ring, ring};
