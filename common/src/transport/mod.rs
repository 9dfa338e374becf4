//! Mutual-TLS QUIC between paired agents: identities, pinned peers, endpoints, stream framing.

pub mod identity;
pub mod pinning;
pub mod quic;
pub mod stream;

pub use identity::{Fingerprint, Identity, Peers};

/// Installs the process-wide rustls crypto provider (ring). Call first thing in `main`: several
/// dependencies enable different providers and rustls then refuses to pick one on its own.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
