//! The QUIC server: accepts authenticated connections and runs one session per connection.

use crate::session::{SessionContext, run_session};
use anyhow::Result;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use understudy_common::metrics::Metrics;
use understudy_common::protocol::target_session::FlushPolicy;
use understudy_common::store::Store;
use understudy_common::store::retention::RetentionPolicy;
use understudy_common::transport::grants::Grants;
use understudy_common::transport::quic;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Agent directory (identity, peers, store/).
    pub dir: PathBuf,
    /// Where the identity and peers are kept instead of `dir` (a mounted Secret).
    pub identity: Option<PathBuf>,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Retention applied after every commit.
    pub retention: RetentionPolicy,
    /// Received chunk bytes after which they are made durable (fsync and catalog commit).
    pub flush_bytes: u64,
}

/// A running server.
pub struct Server {
    admin: crate::admin::AdminSocket,
    endpoint: quinn::Endpoint,
    ctx: Arc<SessionContext>,
}

impl Server {
    /// Opens the store and binds the endpoint.
    pub fn bind(cfg: &ServerConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let (identity, peers) =
            understudy_common::cli::credentials(&cfg.dir, cfg.identity.as_deref())?;
        let store = Arc::new(Store::open(&cfg.dir.join("store"))?);
        let grants = Arc::new(Grants::new());
        let endpoint = quic::server_endpoint(&identity, peers.clone(), grants.clone(), cfg.listen)?;
        let ctx = Arc::new(SessionContext {
            store,
            busy: Mutex::new(HashMap::new()),
            gc_gate: tokio::sync::RwLock::new(()),
            retention: cfg.retention,
            flush: FlushPolicy {
                // At least 64 KiB: smaller only adds fsyncs.
                bytes: cfg.flush_bytes.max(64 << 10),
                ..FlushPolicy::default()
            },
            metrics,
            peers,
            grants,
            fingerprint: identity.fingerprint.clone(),
        });
        Ok(Server {
            admin: crate::admin::AdminSocket::bind(&cfg.dir)?,
            endpoint,
            ctx,
        })
    }

    /// What its sessions share (the store, the grants): the populator works on them too.
    pub fn context(&self) -> Arc<SessionContext> {
        self.ctx.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Accepts connections until `stop` completes (or the endpoint closes), and serves the admin
    /// socket meanwhile. On `stop`, the endpoint is closed with a reason sources log, the
    /// sessions under way end (each makes what it received durable first) and are waited for,
    /// up to [`DRAIN_LIMIT`]. Dropping this future stops everything at once; the store is
    /// crash-safe either way.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        let Server {
            admin,
            endpoint,
            ctx,
        } = self;
        let sessions = tokio_util::task::TaskTracker::new();
        let admin_ctx = ctx.clone();
        let admin = async move {
            if let Err(e) = admin.serve(admin_ctx).await {
                tracing::error!(error = %format!("{e:#}"), "admin socket stopped; store commands need `serve` stopped");
            }
            std::future::pending::<()>().await
        };
        let r = tokio::select! {
            _ = admin => unreachable!("the admin future never completes"),
            r = accept(&endpoint, &ctx, &sessions) => r,
            _ = stop => Ok(()),
        };
        endpoint.close(4u32.into(), b"target stopping; try again once it is back");
        sessions.close();
        if !sessions.is_empty() {
            tracing::info!(
                sessions = sessions.len(),
                "waiting for the sessions under way to end"
            );
        }
        if tokio::time::timeout(DRAIN_LIMIT, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "sessions did not end within {DRAIN_LIMIT:?}; stopping anyway (what they received since their last flush is sent again)"
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        r
    }
}

/// How long a stopping server waits for its sessions to end.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(20);

async fn accept(
    endpoint: &quinn::Endpoint,
    ctx: &Arc<SessionContext>,
    sessions: &tokio_util::task::TaskTracker,
) -> Result<()> {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        sessions.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused connection (TLS handshake failed: unpinned or invalid peer certificate?)");
                    return;
                }
            };
            if let Err(e) = run_session(conn, ctx).await {
                tracing::warn!(%remote, error = %format!("{e:#}"), "session ended with an error");
            }
        });
    }
    Ok(())
}
