//! The replication session protocol (docs/protocol.md), free of I/O: messages and their codec,
//! the source and target session state machines, the fetch sessions that read a point back, the target's over a [`SessionStore`]
//! trait. The agents move bytes between these and QUIC streams; tests drive the two machines
//! against each other in memory, the target over a [`session_store::MemoryStore`] that can fail
//! on demand.

pub mod codec;
pub mod fetch;
pub mod messages;
pub mod session_store;
pub mod source_session;
pub mod target_session;

pub use messages::*;
pub use session_store::SessionStore;
