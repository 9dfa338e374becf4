//! Command line of the target agent.

use crate::admin;
use crate::commands::{RetentionRules, StoreCommand};
use crate::server::{Server, ServerConfig};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use understudy_common::cli::{GlobalArgs, IdentityCommand};
use understudy_common::metrics::Metrics;
use understudy_common::store::{Store, StoreInUse};

/// Understudy target agent: keeps recovery points of replicated groups and fails over to them.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    #[command(flatten)]
    Identity(IdentityCommand),
    /// Receive replication sessions (store commands then reach the store through this process).
    Serve(ServeArgs),
    /// Apply a bundle of manifests to a cluster, transformed, in dependency order.
    Apply(crate::apply::ApplyArgs),
    /// Grant a writer one volume of a point, through the running `serve`, and write its
    /// ticket (for `write` on another machine, or a populator's pod).
    Ticket(crate::ticket::TicketArgs),
    /// Rebuild one volume of a point from a running target agent into a device or an image,
    /// verifying every chunk and the digest of what was written.
    Write(crate::writer::WriteArgs),
    /// After a failover, bring the old primary's PVCs to a point of the standby, fetching only
    /// the blocks that differ (basis writer pods on its cluster).
    Failback(crate::failback::FailbackArgs),
    /// The archive tier in an S3 bucket: its snapshots, and a store rebuilt from it.
    #[command(subcommand)]
    Archive(crate::archive::ArchiveCommand),
    #[command(flatten)]
    Store(StoreCommand),
}

/// `serve` arguments.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// Directory holding this agent's identity as `cert.pem`, `key.pem` and `peers.json` (in a
    /// cluster, the mounted identity Secret); default: `identity/` and `peers.json` of --dir.
    #[arg(long, env = "UNDERSTUDY_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// UDP address for QUIC.
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Address for Prometheus metrics (/metrics); off when not given.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Write the bound QUIC address to this file once listening (for scripts using port 0).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Make received chunks durable (fsync, then catalog commit) every this many MiB. Chunks
    /// received since the last flush are lost by a crash and sent again; smaller values lose less
    /// and fsync more often.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub flush_every_mib: u64,
    #[command(flatten)]
    pub retention: RetentionRules,
    #[command(flatten)]
    pub archive: crate::archive::ArchiveArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// The standby's Kubernetes controllers: the volume populator (PVCs whose dataSourceRef names a
/// PointVolume are rebuilt from this agent's points) and Failovers.
#[derive(clap::Args, Debug)]
pub struct KubeArgs {
    /// Run the populator and the Failover controller, with the cluster of --kubeconfig
    /// (default: in-cluster).
    #[arg(long)]
    pub kube: bool,
    /// Kubeconfig of the standby cluster.
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// Image of the writer pods (holds /bin/target-agent: this agent's image).
    #[arg(long, required_if_eq("kube", "true"))]
    pub writer_image: Option<String>,
    /// Where writer pods reach this agent, HOST:PORT (its UDP Service); default: the address
    /// it listens on, when that is not a wildcard.
    #[arg(long, requires = "kube")]
    pub advertise: Option<String>,
}

impl KubeArgs {
    /// The populator's settings, once the server is bound at `bound`.
    fn config(&self, bound: SocketAddr) -> Result<Option<crate::populator::PopulatorConfig>> {
        if !self.kube {
            return Ok(None);
        }
        let advertise = match &self.advertise {
            Some(a) => a.clone(),
            None if !bound.ip().is_unspecified() => bound.to_string(),
            None => anyhow::bail!(
                "--kube needs --advertise HOST:PORT (the agent's UDP Service) when it listens on {bound}: writer pods must know where to reach it"
            ),
        };
        Ok(Some(crate::populator::PopulatorConfig {
            writer_image: self.writer_image.clone().unwrap_or_default(),
            advertise,
        }))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    understudy_common::cli::run_main(|c: &Cli| &c.global, run)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Identity(c) => c.run()?,
        Command::Serve(a) => serve(a)?,
        Command::Store(c) => return store_command(c),
        Command::Apply(a) => return crate::apply::run(a),
        Command::Ticket(a) => ticket(a)?,
        Command::Write(a) => return crate::writer::run(a),
        Command::Failback(a) => return crate::failback::run(a),
        Command::Archive(c) => return c.run(),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a store command on the store directly, or through the running `serve` that holds it.
fn store_command(mut cmd: StoreCommand) -> Result<ExitCode> {
    let dir = cmd.dir().to_path_buf();
    let path = dir.join("store");
    anyhow::ensure!(
        path.exists(),
        "no store in {}: is --dir the target agent's directory?",
        dir.display()
    );
    let reply = match Store::open(&path) {
        Ok(store) => cmd.run(&store, true)?,
        Err(e) if e.downcast_ref::<StoreInUse>().is_some() => {
            // Only a socket that cannot be reached is about the store being in use; an error the
            // running server answered (a missing point, say) is shown as it is.
            let conn = admin::connect(&dir).with_context(|| format!("{e:#}"))?;
            cmd.absolutize()?;
            admin::request(conn, &admin::AdminRequest::Store(cmd))?
        }
        Err(e) => return Err(e),
    };
    print!("{}", reply.output);
    Ok(ExitCode::from(reply.code))
}

/// Asks the running `serve` for a writer's ticket and writes it, owner-only.
fn ticket(mut a: crate::ticket::TicketArgs) -> Result<()> {
    let conn = admin::connect(&a.dir).context(
        "a writer reads from the running target agent: start `target-agent serve` on this directory first",
    )?;
    a.out = std::path::absolute(&a.out)
        .with_context(|| format!("cannot resolve {}", a.out.display()))?;
    let out = a.out.clone();
    let reply = admin::request(conn, &admin::AdminRequest::Ticket(a))?;
    understudy_common::files::write_private(&out, reply.output.as_bytes())?;
    eprintln!(
        "wrote the writer's ticket to {} (it holds a private key)",
        out.display()
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let cfg = ServerConfig {
            dir: a.dir.clone(),
            identity: a.identity.clone(),
            listen: a.listen,
            retention: a.retention.policy(),
            flush_bytes: a.flush_every_mib << 20,
        };
        let server = Server::bind(&cfg, metrics.clone())?;
        let addr = server.local_addr()?;
        if let Some(m) = a.metrics_addr {
            let bound = metrics.clone().serve(m).await?;
            tracing::info!(%bound, "serving metrics");
        }
        if let Some(f) = &a.ready_file {
            understudy_common::files::write_atomic(f, addr.to_string().as_bytes())?;
        }
        tracing::info!(%addr, "target agent listening");
        crate::archive::start(&a.archive, a.dir.clone(), server.context(), metrics.clone())?;
        if let Some(cfg) = a.kube.config(addr)? {
            let client = understudy_kube::connect(a.kube.kubeconfig.as_deref()).await?;
            start_controllers(client, server.context(), cfg, metrics.clone());
        }
        server.run(stop_signal()).await?;
        eprintln!("target-agent stopped by a signal; every committed point is kept");
        Ok(())
    })
}

/// Starts the populator, the Failover and the DrillSchedule controllers beside the server; a controller that stops
/// is logged (the server goes on: replication does not depend on them).
fn start_controllers(
    client: kube::Client,
    sessions: Arc<crate::session::SessionContext>,
    cfg: crate::populator::PopulatorConfig,
    metrics: Arc<Metrics>,
) {
    let (c, s) = (client.clone(), sessions.clone());
    tokio::spawn(async move {
        if let Err(e) = crate::populator::run(c, s, cfg, std::future::pending()).await {
            tracing::error!(error = %format!("{e:#}"), "the volume populator stopped; PVCs from PointVolumes wait until the agent restarts");
        }
    });
    let c = client.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::standby::run(c, sessions, std::future::pending()).await {
            tracing::error!(error = %format!("{e:#}"), "the Failover controller stopped; Failovers wait until the agent restarts");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = crate::standby::schedule::run(client, metrics, std::future::pending()).await
        {
            tracing::error!(error = %format!("{e:#}"), "the DrillSchedule controller stopped; scheduled drills wait until the agent restarts");
        }
    });
    tracing::info!("running the volume populator, the Failover and the DrillSchedule controllers");
}

/// Completes at the first SIGTERM or SIGINT; a second one exits the process at once (the store
/// is crash-safe: chunks received since the last flush are sent again by the source).
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM and SIGINT; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    let first = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
    tracing::info!(
        signal = first,
        "stopping: ending the sessions under way (send the signal again to exit at once)"
    );
    tokio::spawn(async move {
        let no =
            tokio::select! { _ = term.recv() => libc::SIGTERM, _ = int.recv() => libc::SIGINT };
        tracing::warn!("second signal: exiting now");
        std::process::exit(128 + no);
    });
}

#[cfg(test)]
mod tests {
    /// Every subcommand's flags are consistent: unique ids, valid conflicts and defaults (clap
    /// checks these only when a command is parsed, so a clash would stop that command at run time).
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
