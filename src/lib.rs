//! confab as a library: everything the `confab` binary runs, exposed so that
//! benchmarks (`benches/`) can drive the real hot-path code directly.
//! See docs/ARCHITECTURE.md for the map of these modules.

pub mod admin;
pub mod api;
pub mod auth;
pub mod backup;
pub mod bench;
pub mod cluster;
pub mod config;
pub mod error;
pub mod export;
pub mod frames;
pub mod hub;
pub mod ids;
pub mod limits;
pub mod media;
pub mod migrate;
pub mod placement;
pub mod proxy;
pub mod search;
pub mod server;
pub mod status;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod wallet;
pub mod writes;
