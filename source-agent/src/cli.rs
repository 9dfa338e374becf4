//! Command line of the source agent.

use crate::cycle::{SourceAgent, SourceConfig};
use crate::schedule::{self, Ended, Schedule};
use crate::stop::Stop;
use crate::target::TargetAddr;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use understudy_common::cli::{GlobalArgs, IdentityCommand};
use understudy_common::cut::{CutConfig, ManifestSource, NoManifests};
use understudy_common::hooks::{Hook, OnError};
use understudy_common::metrics::Metrics;
use understudy_common::volume::VolumeSpec;
use understudy_kube::capture::CaptureSpec;
use understudy_kube::{ClusterManifests, DirectoryManifests};

/// Understudy source agent: replicates a group of volumes and its manifests to a target agent.
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
    /// Replicate a group: one cycle every --interval (or one with --once).
    Run(Box<RunArgs>),
    /// Capture an application's objects from a cluster into a bundle directory.
    Capture(crate::capture::CaptureArgs),
    /// Run as the Kubernetes controller of ReplicationGroups.
    Controller(ControllerArgs),
    /// Print the project's CRDs (YAML), e.g. `source-agent crds | kubectl apply -f -`.
    Crds,
    /// Stage one volume of a cut on the target, as a data mover (the source agent starts these
    /// in pods, one per volume, with a ticket it made for the cut).
    Mover(MoverArgs),
    /// Write a mounted file system's cached writes to its device (syncfs), for each path: a
    /// migration runs it in a pod on each of the application's volumes once the application has
    /// stopped, before the final snapshot.
    Flush {
        /// A path on each file system to flush.
        #[arg(long = "path", required = true)]
        paths: Vec<std::path::PathBuf>,
    },
}

/// `controller` arguments.
#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Namespace of the agent: the Secrets named by spec.target.secretName live here.
    #[arg(long, env = "POD_NAMESPACE")]
    pub agent_namespace: String,
    /// Watch ReplicationGroups in this namespace only (default: all namespaces).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Image of the mover pods (it must hold /bin/source-agent of this version).
    #[arg(long, env = "UNDERSTUDY_MOVER_IMAGE")]
    pub mover_image: String,
    /// The agent's ServiceAccount (in --agent-namespace): movers get tokens of it for the
    /// CSI SnapshotMetadata API (it needs the changed-block tracking client role).
    #[arg(
        long,
        env = "UNDERSTUDY_SERVICE_ACCOUNT",
        default_value = "understudy-source"
    )]
    pub service_account: String,
    /// Scratch directory (the manifests' frames while a commit runs).
    #[arg(long, default_value = "/tmp/understudy-source")]
    pub state_dir: PathBuf,
    /// Kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address for Prometheus metrics (/metrics); off when not given.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
}

/// `mover` arguments.
#[derive(clap::Args, Debug)]
pub struct MoverArgs {
    /// The ticket the source agent wrote (JSON: what to stage, the target, the mover's key).
    #[arg(long, env = "UNDERSTUDY_MOVER_TICKET")]
    pub ticket: PathBuf,
    /// The volume to read (a block device or an image file).
    #[arg(long)]
    pub device: PathBuf,
    /// Where the report goes (JSON), e.g. the pod's termination message path.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// `run` arguments.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Agent state directory (identity, peers, per-group cut state).
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// Protection group name.
    #[arg(long)]
    pub group: String,
    /// Target agent address, HOST:PORT (UDP): a host name (resolved at every connect; every
    /// address it has is tried), an IPv4 address or a bracketed IPv6 one.
    #[arg(long)]
    pub target: TargetAddr,
    /// A volume of the group, NAME=PATH (block device or image file); repeat for each volume.
    #[arg(long = "volume", value_name = "NAME=PATH", required = true)]
    pub volumes: Vec<VolumeSpec>,
    /// Directory of the group's YAML manifests (standalone mode).
    #[arg(long, conflicts_with = "kube_namespaces")]
    pub manifests: Option<PathBuf>,
    /// Capture the application's objects from this namespace at every cut (repeatable).
    #[arg(long = "kube-namespace", value_name = "NAMESPACE")]
    pub kube_namespaces: Vec<String>,
    /// Label selector narrowing the captured namespaced objects.
    #[arg(long, requires = "kube_namespaces")]
    pub kube_selector: Option<String>,
    /// Kubeconfig of the source cluster (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, requires = "kube_namespaces")]
    pub kubeconfig: Option<PathBuf>,
    /// Time between cycle starts (at least 10s).
    #[arg(long, default_value = "5m", value_parser = schedule::parse_interval)]
    pub interval: Duration,
    /// Run one cycle and exit (non-zero if it failed after retries).
    #[arg(long)]
    pub once: bool,
    /// Retries of a failed cycle, with exponential backoff.
    #[arg(long, default_value_t = 5)]
    pub max_retries: usize,
    /// Block size in bytes (power of two, 4 KiB to 4 MiB). Fixed for the life of a group.
    #[arg(long, default_value_t = understudy_common::DEFAULT_BLOCK_SIZE)]
    pub block_size: u32,
    /// zstd level for changed blocks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,
    /// Threads reading and hashing volumes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Parallel QUIC data streams.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Cap on chunk data sent, in megabits per second (QUIC and TLS add about 3% on the link);
    /// unlimited when not given. For links shared with other traffic.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub bandwidth_limit_mbit: Option<u32>,
    /// Command run (sh -c) before the cut, e.g. a freeze.
    #[arg(long)]
    pub pre_hook: Option<String>,
    /// Command run after the cut, e.g. a thaw (also when the cut failed).
    #[arg(long)]
    pub post_hook: Option<String>,
    /// Time limit of each hook.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub hook_timeout: Duration,
    /// What a failing hook does to the cycle.
    #[arg(long, value_enum, default_value = "fail")]
    pub hook_on_error: OnError,
    /// Address for Prometheus metrics (/metrics); off when not given.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Print each cycle's report as a JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `flush`: syncfs on the file system of every path.
fn flush(paths: &[std::path::PathBuf]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    for p in paths {
        let f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        rustix::fs::syncfs(&f).with_context(|| format!("syncfs on {} failed", p.display()))?;
        eprintln!("flushed the file system of {}", p.display());
    }
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    understudy_common::cli::run_main(
        |c: &Cli| &c.global,
        |cli| {
            match cli.command {
                Command::Identity(c) => c.run()?,
                Command::Run(a) => return run(a),
                Command::Capture(a) => crate::capture::run(a)?,
                Command::Mover(a) => mover(a)?,
                Command::Controller(a) => controller(a)?,
                Command::Crds => print!("{}", understudy_kube::crd::yaml()?),
                Command::Flush { paths } => flush(&paths)?,
            }
            Ok(ExitCode::SUCCESS)
        },
    )
}

impl RunArgs {
    fn manifest_source(&self) -> Arc<dyn ManifestSource> {
        if let Some(dir) = &self.manifests {
            return Arc::new(DirectoryManifests(dir.clone()));
        }
        if self.kube_namespaces.is_empty() {
            return Arc::new(NoManifests);
        }
        Arc::new(ClusterManifests {
            kubeconfig: self.kubeconfig.clone(),
            spec: CaptureSpec {
                namespaces: self.kube_namespaces.clone(),
                label_selector: self.kube_selector.clone(),
            },
        })
    }

    fn hook(&self, cmd: &Option<String>) -> Option<Hook> {
        cmd.as_ref().map(|c| Hook {
            command: c.clone(),
            timeout: self.hook_timeout,
            on_error: self.hook_on_error,
        })
    }

    /// The agent configuration these arguments describe.
    pub fn config(&self) -> Result<SourceConfig> {
        understudy_common::volume::check_name(&self.group)?;
        understudy_common::check_block_size(self.block_size)?;
        let mut names = std::collections::HashSet::new();
        for v in &self.volumes {
            anyhow::ensure!(
                names.insert(&v.name),
                "volume name {} is given twice",
                v.name
            );
        }
        Ok(SourceConfig {
            dir: self.dir.clone(),
            group: self.group.clone(),
            target: self.target.clone(),
            streams: self.streams.max(1),
            bandwidth_limit_mbit: self.bandwidth_limit_mbit,
            cut: CutConfig {
                volumes: self.volumes.clone(),
                manifests: self.manifest_source(),
                block_size: self.block_size,
                zstd_level: self.zstd_level,
                workers: self.workers.max(1),
                pre_hook: self.hook(&self.pre_hook),
                post_hook: self.hook(&self.post_hook),
                source_id: String::new(),
            },
        })
    }
}

/// Runs the schedule. Exit codes: 0 when done or stopped between cycles, 1 on failure, and
/// 128 + the signal's number when a signal stopped a cycle part-way (its cut is kept).
fn run(a: Box<RunArgs>) -> Result<ExitCode> {
    let cfg = a.config()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let stop = Stop::on_signals()?;
        let metrics = serve_metrics(a.metrics_addr).await?;
        let agent = SourceAgent::new(cfg, metrics, stop.clone())?;
        agent.preflight()?;
        let s = Schedule {
            interval: a.interval,
            max_retries: a.max_retries,
            once: a.once,
        };
        let json = a.json;
        let r = schedule::run(&agent, s, &stop, |r| {
            if json {
                println!("{}", serde_json::to_string(r).expect("serialisable"));
            }
        })
        .await;
        agent.shutdown().await;
        let code = match r? {
            Ended::Done => ExitCode::SUCCESS,
            Ended::StoppedBetweenCycles => {
                eprintln!("source-agent stopped by a signal between cycles; nothing was under way");
                ExitCode::SUCCESS
            }
            Ended::StoppedDuringCycle => {
                eprintln!("source-agent stopped by a signal during a cycle: the application was thawed, and the cut is resumed (or made again) at the next start");
                ExitCode::from(128 + stop.signal().unwrap_or(libc::SIGTERM) as u8)
            }
        };
        Ok(code)
    })
}

/// The agent's metrics, served on `addr` when given.
async fn serve_metrics(addr: Option<std::net::SocketAddr>) -> Result<Arc<Metrics>> {
    let metrics = Arc::new(Metrics::new());
    if let Some(m) = addr {
        let bound = metrics.clone().serve(m).await?;
        tracing::info!(%bound, "serving metrics");
    }
    Ok(metrics)
}

/// Runs a mover: stages the device's volume, prints and writes the report.
fn mover(a: MoverArgs) -> Result<()> {
    use anyhow::Context;
    let raw = std::fs::read(&a.ticket)
        .with_context(|| format!("cannot read the mover's ticket {}", a.ticket.display()))?;
    let ticket: crate::mover::MoverTicket = serde_json::from_slice(&raw).with_context(|| {
        format!(
            "{} is not a mover ticket; the source agent writes these",
            a.ticket.display()
        )
    })?;
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(crate::mover::run(&ticket, &a.device))?;
    let json = serde_json::to_string(&report)?;
    println!("{json}");
    if let Some(p) = &a.report {
        std::fs::write(p, &json)
            .with_context(|| format!("cannot write the report to {}", p.display()))?;
    }
    Ok(())
}

/// Runs the controller until SIGINT or SIGTERM.
fn controller(a: ControllerArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let stop = Stop::on_signals()?;
        let metrics = serve_metrics(a.metrics_addr).await?;
        let client = understudy_kube::connect(a.kubeconfig.as_deref()).await?;
        let cfg = crate::controller::ControllerConfig {
            namespace: a.namespace,
            agent_namespace: a.agent_namespace,
            mover_image: a.mover_image,
            service_account: a.service_account,
            state_dir: a.state_dir,
        };
        let stopped = async move { stop.requested_wait().await };
        crate::controller::run(client, cfg, metrics, stopped).await
    })
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
