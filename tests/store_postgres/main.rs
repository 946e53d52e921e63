//! The PostgreSQL backend beyond the store contract that both backends
//! pass (`tests/store_contract.rs`), against a real server
//! (`tests/common/pg.rs`): its reads against rows written with SQL
//! (`reads`), and its wallet against the embedded one's, answer for answer,
//! plus what only a shared database has — two nodes running the same due
//! transfers at once (`wallet`).

#[path = "../common/pg.rs"]
mod pg;

mod blobs;
mod faults;
mod reads;
mod wallet;
