//! The binary's subcommand runners, by group (binary-private: declared by
//! `main.rs`, which parses the command line and calls them): the data
//! commands (backup, restore, export, check), `migrate`, the wallet's, the
//! server's (serve, proxy, reindex), and what they print.

pub mod data;
pub mod migrate;
pub mod output;
pub mod server;
pub mod wallet;
