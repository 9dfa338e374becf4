//! Understudy source agent: cuts a group of volumes and manifests, detects changed blocks and
//! ships them to the target over mutual-TLS QUIC, on a schedule. The binary only parses arguments
//! ([`cli`]).

pub mod capture;
pub mod cli;
pub mod controller;
pub mod cycle;
pub mod link;
pub mod mover;
pub mod schedule;
pub mod ship;
pub mod staged;
pub mod stop;
/// Connecting to the target agent (in the common crate: writers connect to it too).
pub use understudy_common::transport::connect as target;
