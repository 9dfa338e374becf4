//! quinn endpoint configuration: TLS 1.3 with pinned mutual authentication, windows sized for
//! bulk transfer over WAN links (a 16 MiB receive window per connection covers 1 Gbit/s at
//! 125 ms RTT) while bounding memory, keep-alives so an idle control stream survives a long cut.

use super::grants::Grants;
use super::identity::{Fingerprint, Identity};
use super::pinning::PinnedPeers;
use crate::protocol::ALPN;
use anyhow::{Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// UDP payload size on a loopback path. Its MTU (64 KiB) is known, so nothing is discovered: the
/// size is the largest at which quinn's batch of 10 datagrams still fits one 64 KiB GSO send. That
/// is four times fewer packets, and so about half the CPU per byte, than the 1452 bytes path MTU
/// discovery settles on over Ethernet.
pub const LOOPBACK_DATAGRAM: u16 = 6400;

/// The transport settings for a connection to `peer` (`None` on the target, which answers whoever
/// connects: its own packets are mostly acknowledgements).
fn transport(peer: Option<SocketAddr>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(64u32.into())
        .max_concurrent_bidi_streams(4u32.into())
        .stream_receive_window((4u32 << 20).into())
        .receive_window((16u32 << 20).into())
        .send_window(8 << 20)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("60 s fits")));
    if peer.is_some_and(|p| p.ip().is_loopback()) {
        fixed_datagram_size(&mut t, LOOPBACK_DATAGRAM);
    }
    Arc::new(t)
}

/// Sends every packet at `size`, with no path MTU discovery, and starts Cubic at 10 packets of
/// that size (its default first window, 14,720 bytes, would not hold two).
fn fixed_datagram_size(t: &mut quinn::TransportConfig, size: u16) {
    t.initial_mtu(size).min_mtu(size).mtu_discovery_config(None);
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(10 * u64::from(size));
    t.congestion_controller_factory(Arc::new(cubic));
}

/// Endpoint settings shared by both agents: datagrams up to [`LOOPBACK_DATAGRAM`] are accepted
/// (quinn's default, 1472 bytes, would drop them).
fn endpoint_config(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    config
        .max_udp_payload_size(LOOPBACK_DATAGRAM)
        .expect("6400 lies within QUIC's 1200..=65527");
    config
}

/// Server (target) configuration accepting only `peers`, and the movers `grants` holds while
/// their grants are in force.
pub fn server_config(
    id: &Identity,
    peers: Vec<Fingerprint>,
    grants: Arc<Grants>,
) -> Result<quinn::ServerConfig> {
    let p = provider();
    let verifier = Arc::new(PinnedPeers::new(peers, p.clone()).with_grants(grants));
    let mut tls = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("the agent's certificate or key is not usable")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    sc.transport_config(transport(None));
    Ok(sc)
}

/// Client (source) configuration for connections to `target`, accepting only `peers` as the server.
pub fn client_config(
    id: &Identity,
    peers: Vec<Fingerprint>,
    target: SocketAddr,
) -> Result<quinn::ClientConfig> {
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
    cc.transport_config(transport(Some(target)));
    Ok(cc)
}

/// The target's QUIC endpoint on `listen`. Its stateless-reset key and connection-id key are
/// derived from the agent's private key, so a target restarted after a crash recognises the
/// connection ids it issued before and answers a source's packets for the old connection with a
/// reset the source accepts: the source learns at once that the session is gone and starts a new
/// one, instead of waiting out the idle timeout.
pub fn server_endpoint(
    id: &Identity,
    peers: Vec<Fingerprint>,
    grants: Arc<Grants>,
    listen: std::net::SocketAddr,
) -> Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("cannot listen on {listen}: is the port in use?"))?;
    let socket = with_buffers(socket);
    let runtime = quinn::default_runtime().context("no async runtime to run QUIC on")?;
    let secret = blake3::derive_key(
        "understudy 2026-11 QUIC stateless reset key",
        id.key.secret_der(),
    );
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let cid_key = u64::from_le_bytes(secret[..8].try_into().expect("8 of 32 bytes"));
    let mut config = endpoint_config(quinn::EndpointConfig::new(Arc::new(reset_key)));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(quinn::Endpoint::new(
        config,
        Some(server_config(id, peers, grants)?),
        socket,
        runtime,
    )?)
}

/// A client (source) endpoint bound to `bind`, with the socket buffers of [`with_buffers`].
pub fn client_endpoint(bind: std::net::SocketAddr) -> Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)
        .with_context(|| format!("cannot open a UDP socket on {bind}"))?;
    let socket = with_buffers(socket);
    let runtime = quinn::default_runtime().context("no async runtime to run QUIC on")?;
    Ok(quinn::Endpoint::new(
        endpoint_config(quinn::EndpointConfig::default()),
        None,
        socket,
        runtime,
    )?)
}

/// Socket buffer size asked for in each direction. The kernel's default (about 208 KiB) holds
/// fewer than 150 full-size packets: a receiver busy for a millisecond drops the rest, and QUIC
/// takes the drops for congestion.
const SOCKET_BUFFER: usize = 8 << 20;

/// Raises the socket's receive and send buffers to [`SOCKET_BUFFER`] where the kernel allows
/// (it caps them at net.core.rmem_max / wmem_max); warns once when it got less.
fn with_buffers(socket: std::net::UdpSocket) -> std::net::UdpSocket {
    let s = socket2::Socket::from(socket);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice the size set (the doubling covers its bookkeeping).
    let got = s.recv_buffer_size().unwrap_or(0) / 2;
    if got < SOCKET_BUFFER / 2 {
        tracing::warn!(
            receive_buffer = got,
            wanted = SOCKET_BUFFER,
            "the UDP receive buffer is small, so bursts are dropped and transfers slow down; \
             raise it with `sysctl -w net.core.rmem_max=8388608 net.core.wmem_max=8388608`"
        );
    }
    s.into()
}

/// Server name the source presents; identity comes from the pinned fingerprint, not the name.
pub const SERVER_NAME: &str = "understudy-target";
