//! `understudy-csi`: the test bed's CSI driver (see the library's docs). Test component only.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use understudy_csi_driver::{Driver, server, state::State};

/// Serves the test bed's CSI driver (controller, node, group snapshots, snapshot metadata).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The CSI socket the sidecars and the kubelet call.
    #[arg(long)]
    endpoint: PathBuf,
    /// Where volume and snapshot images and records are kept.
    #[arg(long)]
    state_dir: PathBuf,
    /// The driver name (the StorageClass provisioner).
    #[arg(long, default_value = "csi.understudy.test")]
    name: String,
    /// This node's name.
    #[arg(long)]
    node_id: String,
    /// The kubelet's plugin registration directory (`<kubelet root>/plugins_registry`); without
    /// it the driver does not register with a kubelet.
    #[arg(long)]
    registration_dir: Option<PathBuf>,
    /// The freezer cgroup holding the node's pods, to stop Block-volume writers for snapshots.
    #[arg(long)]
    freezer_root: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let state = State::open(&args.state_dir)
        .with_context(|| format!("opening {}", args.state_dir.display()))?;
    let driver = Driver::new(args.name.clone(), args.node_id, state, args.freezer_root);
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        let _ = tx.send(true);
    });
    let csi = server::serve_csi(driver, &args.endpoint, stopped(rx.clone()));
    match &args.registration_dir {
        Some(dir) => {
            let inner = args.state_dir.join("registration.sock");
            let reg = server::serve_registration(
                args.name,
                args.endpoint.clone(),
                dir,
                &inner,
                stopped(rx),
            );
            tokio::try_join!(csi, reg).map(drop)
        }
        None => csi.await,
    }
}

/// Completes when SIGTERM or SIGINT arrived.
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
