//! `confab proxy`: the front of a cluster (docs/SCALEOUT.md). It terminates
//! client HTTP and WebSockets, serves the UI, checks tokens, and sends each
//! operation to the live node that serves its room or its user over one
//! multiplexed HTTP/2 link per node. Every node reads and writes the one
//! shared database, so lists and searches are one node's answer. It stores
//! nothing durable.
//!
//! This file only declares the parts; each imports only those below it:
//! - `link`: one HTTP/2 connection per node, its requests and streams;
//! - `placement`: which live node serves what ([`placement::Nodes`]);
//! - `session`: delivery to one client session, in seq order per room;
//! - `state`: what the proxy holds ([`state::Proxy`]) and its sessions;
//! - `events`, `profiles`, `forward`, `status`, `ws`, `cross_node`: what
//!   the proxy does — the nodes' event streams, a new session's profile,
//!   forwarding, its own status and metrics, client WebSocket sessions,
//!   requests placed by their body;
//! - `routes`: the route table; `serve`: startup and the accept loop.

mod cross_node;
mod events;
mod forward;
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
