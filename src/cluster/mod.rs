//! Scale-out: a node's side of the cluster — link tokens and the endpoints
//! the proxies call. Every node keeps its data in the one PostgreSQL
//! database they share; the design is in docs/SCALEOUT.md, and placement
//! (the ring, which live node serves a room) is `placement/`.

pub mod link;
pub mod node;

pub use crate::placement::{Cluster, Node, Ring, ring};
