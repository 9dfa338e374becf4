//! Mutual-TLS QUIC between paired agents: identities, pinned peers, endpoints, stream framing.

pub mod connect;
pub mod grants;
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

/// Explains why a connection closed in words an operator can act on: a TLS alert from the peer
/// means it refused this agent's certificate.
pub fn explain_close(conn: &quinn::Connection) -> Option<String> {
    use quinn::ConnectionError;
    match conn.close_reason()? {
        ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            (0x100..0x200).contains(&code).then(|| match code - 0x100 {
                45 => "the peer refused this agent's certificate because it has expired (TLS alert 45): make a new identity with `init` and pair it again on both sides".to_string(),
                alert => format!(
                    "the peer refused this agent's certificate (TLS alert {alert}): pin this agent's fingerprint on the peer with `pair --peer <fingerprint>` (see `identity`)"
                ),
            })
        }
        ConnectionError::ApplicationClosed(a) => Some(format!(
            "the peer closed the session: {}",
            String::from_utf8_lossy(&a.reason)
        )),
        ConnectionError::TimedOut => Some("the peer stopped answering (timed out)".into()),
        ConnectionError::Reset => Some("the peer restarted (connection reset)".into()),
        _ => None,
    }
}

/// Fingerprint of the certificate the peer of `conn` presented (pinned, since it got this far).
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of(c))
}
