//! Connecting to a target agent (sources, movers and writers do). Its address is given as the
//! user gives it (`host:port`: a name, an IPv4 address or a bracketed IPv6 one), resolved again
//! at every connect, so a Service name or a DNS record that
//! moves is followed. Every address the name resolves to is tried, staggered as in Happy
//! Eyeballs (RFC 8305): the first handshake to succeed wins and the others are dropped.

use super::{Fingerprint, Identity, quic};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// `host:port` of the target agent (UDP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl std::str::FromStr for TargetAddr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let hint = "give the target as HOST:PORT, e.g. standby.example.com:7443, 10.0.0.5:7443 or [fd00::5]:7443";
        let (host, port) = s
            .rsplit_once(':')
            .with_context(|| format!("target `{s}` has no port: {hint}"))?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .with_context(|| format!("target `{s}` has an unclosed `[`: {hint}"))?,
            None if host.contains(':') => {
                bail!("target `{s}` looks like an IPv6 address without brackets: {hint}")
            }
            None => host,
        };
        if host.is_empty() {
            bail!("target `{s}` has no host: {hint}");
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("target `{s}` has port `{port}`, not 1-65535: {hint}"))?;
        Ok(TargetAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl TargetAddr {
    /// The addresses the host resolves to now, each once, in the resolver's order.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>> {
        let found = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .with_context(|| {
                format!(
                    "cannot resolve target host `{}`: check the name (a Service name in Kubernetes) and this machine's DNS",
                    self.host
                )
            })?;
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in found {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        if out.is_empty() {
            bail!("target host `{}` resolves to no address", self.host);
        }
        Ok(out)
    }
}

/// Delay between starting attempts at successive addresses (RFC 8305's default).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Tries `attempt` on every address, the n-th started `n * ATTEMPT_DELAY` after the first, and
/// returns the first success with the address it used. When every attempt fails, the error names
/// each address and why.
pub async fn first_success<T: Send + 'static>(
    addrs: &[SocketAddr],
    attempt: impl Fn(SocketAddr) -> Result<Attempt<T>>,
) -> Result<(T, SocketAddr)> {
    let mut set = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    for (i, addr) in addrs.iter().copied().enumerate() {
        match attempt(addr) {
            Ok(fut) => {
                set.spawn(async move {
                    tokio::time::sleep(ATTEMPT_DELAY * i as u32).await;
                    (addr, fut.await)
                });
            }
            Err(e) => failures.push(format!("{addr}: {e:#}")),
        }
    }
    while let Some(done) = set.join_next().await {
        match done {
            Ok((addr, Ok(v))) => return Ok((v, addr)), // dropping `set` aborts the others
            Ok((addr, Err(e))) => failures.push(format!("{addr}: {e:#}")),
            Err(e) => failures.push(format!("an attempt failed: {e}")),
        }
    }
    bail!("{}", failures.join("; "))
}

/// One connection attempt, as [`first_success`] runs them.
pub type Attempt<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>;

/// How long the QUIC and TLS handshake with the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to targets with one identity, accepting only pinned target certificates. QUIC
/// client endpoints are made on first use: one for IPv4 targets, one for IPv6.
pub struct Connector {
    identity: Identity,
    peers: Vec<Fingerprint>,
    endpoints: Mutex<[Option<quinn::Endpoint>; 2]>,
}

impl Connector {
    /// A connector presenting `identity` and accepting targets whose certificates are `peers`.
    pub fn new(identity: Identity, peers: Vec<Fingerprint>) -> Self {
        Connector {
            identity,
            peers,
            endpoints: Mutex::new([None, None]),
        }
    }

    /// The identity it presents.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Resolves `target` and connects to the first of its addresses that answers.
    pub async fn connect(&self, target: &TargetAddr) -> Result<quinn::Connection> {
        let hint = "is it running, reachable over UDP, and are both agents paired with each other's fingerprint?";
        let addrs = target.resolve().await?;
        let (conn, used) = first_success(&addrs, |addr| {
            let connecting = self.endpoint(addr)?.connect_with(
                quic::client_config(&self.identity, self.peers.clone(), addr)?,
                addr,
                quic::SERVER_NAME,
            )?;
            Ok(Box::pin(async move {
                match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                    Ok(r) => Ok(r?),
                    Err(_) => bail!("no answer within {CONNECT_TIMEOUT:?}"),
                }
            }))
        })
        .await
        .with_context(|| format!("cannot connect to target {target}: {hint}"))?;
        tracing::info!(%target, address = %used, "connected to the target");
        Ok(conn)
    }

    /// The client endpoint for connections to `addr`'s address family, made on first use.
    fn endpoint(&self, addr: SocketAddr) -> Result<quinn::Endpoint> {
        let mut eps = self.endpoints.lock().expect("endpoints lock");
        let slot = &mut eps[usize::from(addr.is_ipv6())];
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let e = quic::client_endpoint(bind)?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// Waits for connections to close cleanly (call before exiting).
    pub async fn shutdown(&self) {
        let eps: Vec<quinn::Endpoint> = self
            .endpoints
            .lock()
            .expect("endpoints lock")
            .iter()
            .flatten()
            .cloned()
            .collect();
        for e in eps {
            e.wait_idle().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_addresses_parse() {
        let t: TargetAddr = "standby:7443".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("standby", 7443));
        let t: TargetAddr = "[::1]:9".parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert_eq!(t.to_string(), "[::1]:9");
        assert_eq!(
            "10.0.0.5:1".parse::<TargetAddr>().unwrap().to_string(),
            "10.0.0.5:1"
        );
        for bad in [
            "standby",
            "standby:0",
            "standby:x",
            ":7443",
            "::1:7443",
            "[::1:7443",
        ] {
            let e = bad.parse::<TargetAddr>().unwrap_err().to_string();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn localhost_resolves_and_the_first_success_wins() {
        let addrs = TargetAddr {
            host: "localhost".into(),
            port: 7,
        }
        .resolve()
        .await
        .unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 7));
        let two: Vec<SocketAddr> = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let (v, used) = first_success(&two, |a| {
            Ok(Box::pin(async move {
                if a.port() == 1 {
                    anyhow::bail!("refused")
                }
                Ok(a.port())
            }))
        })
        .await
        .unwrap();
        assert_eq!((v, used.port()), (2, 2));
        let e = first_success(&two, |_| {
            Ok(Box::pin(async { anyhow::bail!("no answer") as Result<()> }))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("127.0.0.1:1: no answer") && e.contains("127.0.0.1:2: no answer"),
            "{e}"
        );
    }
}
