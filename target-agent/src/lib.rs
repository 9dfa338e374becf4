//! Understudy target agent: receives sessions into the recovery-point store, lists, verifies and
//! prunes points, fails over, serves writers that rebuild a point's volumes elsewhere, and applies
//! manifests to a cluster. The binary only parses arguments
//! ([`cli`]).

pub mod admin;
pub mod apply;
pub mod archive;
pub mod cli;
pub mod commands;
pub mod failback;
pub mod failover;
pub mod fetch;
pub mod populator;
pub mod server;
pub mod session;
pub mod standby;
pub mod ticket;
pub mod writer;
