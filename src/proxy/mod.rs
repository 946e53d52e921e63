//! `confab proxy`: the front of a cluster (docs/SCALEOUT.md). It terminates
//! client HTTP and WebSockets, serves the UI, checks tokens, and sends each
//! operation to the node that owns its user or room over one multiplexed
//! HTTP/2 link per node. Lists and searches are asked of every node and
//! merged. It stores nothing durable.
//!
//! This file only declares the parts; each imports only those below it:
//! - `link`: one HTTP/2 connection per node, its requests and streams;
//! - `placement`: which node owns what ([`placement::Nodes`]);
//! - `session`: delivery to one client session, in seq order per room;
//! - `state`: what the proxy holds ([`state::Proxy`]) and its sessions;
//! - `events`, `profiles`, `forward`, `gather`, `status`, `ws`,
//!   `cross_node`: what the proxy does — the nodes' event streams,
//!   profiles across nodes, forwarding, scatter-gather, its own status and
//!   metrics, client WebSocket sessions, requests prepared across nodes;
//! - `routes`: the route table; `serve`: startup and the accept loop.

mod cross_node;
mod events;
mod forward;
mod gather;
mod link;
mod placement;
mod profiles;
mod routes;
mod serve;
mod session;
mod state;
mod status;
mod ws;

pub use serve::serve;
