//! The replication session protocol (docs/protocol.md), free of I/O: messages and their codec,
//! and the source and target session state machines. The agents move bytes between these and
//! QUIC streams; tests drive the two machines against each other in memory.

pub mod codec;
pub mod messages;
pub mod source_session;
pub mod target_session;

pub use messages::*;
