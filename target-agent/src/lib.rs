//! Understudy target agent: receives sessions into the recovery-point store, lists, verifies and
//! prunes points, and fails over. The binary only parses arguments ([`cli`]).

pub mod admin;
pub mod cli;
pub mod commands;
pub mod failover;
pub mod server;
pub mod session;
