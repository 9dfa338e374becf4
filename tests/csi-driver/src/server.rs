//! Serving the driver on its Unix sockets: the CSI endpoint, and the registration socket the
//! kubelet watches for.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::Driver;
use crate::identity::Registrar;
use crate::proto::csi::{
    controller_server::ControllerServer, group_controller_server::GroupControllerServer,
    identity_server::IdentityServer, node_server::NodeServer,
    snapshot_metadata_server::SnapshotMetadataServer,
};
use crate::proto::registration::registration_server::RegistrationServer;

/// Binds a Unix socket, replacing a stale one left by an earlier run.
pub fn listen(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing the stale socket {}", path.display()));
        }
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Serves every CSI service of `driver` on `endpoint` until `shutdown` completes.
pub async fn serve_csi(
    driver: Driver,
    endpoint: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let incoming = UnixListenerStream::new(listen(endpoint)?);
    Server::builder()
        .add_service(IdentityServer::new(driver.clone()))
        .add_service(ControllerServer::new(driver.clone()))
        .add_service(GroupControllerServer::new(driver.clone()))
        .add_service(NodeServer::new(driver.clone()))
        .add_service(SnapshotMetadataServer::new(driver))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving CSI")
}

/// Serves the kubelet's registration API on `<registration_dir>/<driver>-reg.sock`, through the
/// `:authority` relay of [`crate::authority`] (the gRPC server itself listens on `inner`, a
/// socket only the relay uses).
pub async fn serve_registration(
    name: String,
    endpoint: PathBuf,
    registration_dir: &Path,
    inner: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let socket = registration_dir.join(format!("{name}-reg.sock"));
    let incoming = UnixListenerStream::new(listen(inner)?);
    let outer = listen(&socket)?;
    let inner = inner.to_path_buf();
    let relay = async move {
        loop {
            let (conn, _) = match outer.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting on the registration socket: {e}");
                    continue;
                }
            };
            let inner = inner.clone();
            tokio::spawn(async move {
                let server = match tokio::net::UnixStream::connect(&inner).await {
                    Ok(s) => s,
                    Err(e) => return tracing::warn!("connecting to the registration server: {e}"),
                };
                let (cr, cw) = conn.into_split();
                let (mut sr, sw) = server.into_split();
                let up = crate::authority::relay_client(cr, sw);
                let down = async move {
                    let mut cw = cw;
                    tokio::io::copy(&mut sr, &mut cw).await
                };
                let _ = tokio::join!(up, down);
            });
        }
    };
    let server = Server::builder()
        .add_service(RegistrationServer::new(Registrar { name, endpoint }))
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        r = server => r.context("serving plugin registration"),
        () = relay => Ok(()),
    }
}
