//! quinn endpoint configuration: TLS 1.3 with pinned mutual authentication, windows sized for
//! bulk transfer over WAN links (32 MiB per connection covers 1 Gbit/s at 250 ms RTT) while
//! bounding memory, keep-alives so an idle control stream survives a long cut.

use super::identity::{Fingerprint, Identity};
use super::pinning::PinnedPeers;
use crate::protocol::ALPN;
use anyhow::{Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::sync::Arc;
use std::time::Duration;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(64u32.into())
        .max_concurrent_bidi_streams(4u32.into())
        .stream_receive_window((8u32 << 20).into())
        .receive_window((32u32 << 20).into())
        .send_window(16 << 20)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("60 s fits")));
    Arc::new(t)
}

/// Server (target) configuration accepting only `peers`.
pub fn server_config(id: &Identity, peers: Vec<Fingerprint>) -> Result<quinn::ServerConfig> {
    let p = provider();
    let verifier = Arc::new(PinnedPeers::new(peers, p.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("the agent's certificate or key is not usable")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    sc.transport_config(transport());
    Ok(sc)
}

/// Client (source) configuration accepting only `peers` as the server.
pub fn client_config(id: &Identity, peers: Vec<Fingerprint>) -> Result<quinn::ClientConfig> {
    let p = provider();
    let verifier = Arc::new(PinnedPeers::new(peers, p.clone()));
    let mut tls = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("the agent's certificate or key is not usable")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cc = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cc.transport_config(transport());
    Ok(cc)
}

/// Server name the source presents; identity comes from the pinned fingerprint, not the name.
pub const SERVER_NAME: &str = "understudy-target";
