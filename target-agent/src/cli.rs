//! Command line of the target agent.

use crate::failover::{FailoverRequest, PointSelector, failover, select_point};
use crate::server::{Server, ServerConfig};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use understudy_common::cli::{GlobalArgs, IdentityArgs, InitArgs, PairArgs};
use understudy_common::manifest::{Transform, parse_map};
use understudy_common::metrics::Metrics;
use understudy_common::store::Store;
use understudy_common::store::retention::RetentionPolicy;

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
    /// Create this agent's identity (certificate and key) and print its fingerprint.
    Init(InitArgs),
    /// Print this agent's fingerprint.
    Identity(IdentityArgs),
    /// Pin a source agent's fingerprint: only pinned peers may connect.
    Pair(PairArgs),
    /// Receive replication sessions.
    Serve(ServeArgs),
    /// List recovery points.
    Points(PointsArgs),
    /// Show one recovery point in detail.
    Inspect(InspectArgs),
    /// Re-read and re-hash every chunk, and re-derive every volume digest.
    Verify(StoreArgs),
    /// Drop expired points now and garbage-collect unreferenced chunks.
    Retention(RetentionArgs),
    /// Garbage-collect chunks no point references.
    Gc(StoreArgs),
    /// Rebuild a recovery point's volumes and manifests (or show the plan with --dry-run).
    Failover(FailoverArgs),
}

/// A store directory.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Retention rules.
#[derive(clap::Args, Debug, Clone)]
pub struct RetentionRules {
    /// Keep the newest N points of each group.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Keep points younger than this (e.g. 7d, 12h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_age: Option<std::time::Duration>,
}

impl RetentionRules {
    fn policy(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            max_age: self.max_age,
        }
    }
}

/// `serve` arguments.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// UDP address for QUIC.
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Address for Prometheus metrics (/metrics); off when not given.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Write the bound QUIC address to this file once listening (for scripts using port 0).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    #[command(flatten)]
    pub retention: RetentionRules,
}

/// `points` arguments.
#[derive(clap::Args, Debug)]
pub struct PointsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Only this group.
    #[arg(long)]
    pub group: Option<String>,
}

/// `inspect` arguments.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Group.
    #[arg(long)]
    pub group: String,
    /// latest, a point number, or a time (the newest point at or before it).
    #[arg(long, default_value = "latest")]
    pub point: PointSelector,
}

/// `retention` arguments.
#[derive(clap::Args, Debug)]
pub struct RetentionArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Group (all groups when not given).
    #[arg(long)]
    pub group: Option<String>,
    #[command(flatten)]
    pub rules: RetentionRules,
}

/// `failover` arguments.
#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// Group to fail over.
    #[arg(long)]
    pub group: String,
    /// latest, a point number, or a time (the newest point at or before it).
    #[arg(long, default_value = "latest")]
    pub point: PointSelector,
    /// Output directory: volumes/<name>.img, manifests/, report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Write volume NAME to an existing device or file instead of an image (NAME=PATH, repeatable).
    #[arg(long = "device", value_name = "NAME=PATH")]
    pub devices: Vec<String>,
    /// Map a namespace (FROM=TO, repeatable).
    #[arg(long = "namespace-map", value_name = "FROM=TO")]
    pub namespace_map: Vec<String>,
    /// Map a storage class (FROM=TO, repeatable).
    #[arg(long = "storage-class-map", value_name = "FROM=TO")]
    pub storage_class_map: Vec<String>,
    /// Show what would be done; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip re-reading written volumes (the digest is then checked from the chunks written).
    #[arg(long)]
    pub no_read_back: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    understudy_common::cli::run_main(|c: &Cli| &c.global, run)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init(a) => understudy_common::cli::init(&a)?,
        Command::Identity(a) => understudy_common::cli::identity(&a)?,
        Command::Pair(a) => understudy_common::cli::pair(&a)?,
        Command::Serve(a) => serve(a)?,
        Command::Points(a) => points(&a)?,
        Command::Inspect(a) => inspect(&a)?,
        Command::Verify(a) => return verify(&a),
        Command::Retention(a) => retention(&a)?,
        Command::Gc(a) => {
            let r = open_store(&a.dir)?.gc()?;
            print(&r, a.json, || {
                format!(
                    "removed {} chunks, deleted {} packs, compacted {}, freed {} bytes",
                    r.chunks_removed, r.packs_deleted, r.packs_compacted, r.bytes_freed
                )
            });
        }
        Command::Failover(a) => return failover_cmd(&a),
    }
    Ok(ExitCode::SUCCESS)
}

fn open_store(dir: &Path) -> Result<Store> {
    let path = dir.join("store");
    anyhow::ensure!(
        path.exists(),
        "no store in {}: is --dir the target agent's directory?",
        dir.display()
    );
    Store::open(&path)
}

fn print<T: serde::Serialize>(v: &T, json: bool, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
    } else {
        println!("{}", text());
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let cfg = ServerConfig {
            dir: a.dir.clone(),
            listen: a.listen,
            retention: a.retention.policy(),
        };
        let server = Server::bind(&cfg, metrics.clone())?;
        let addr = server.local_addr()?;
        if let Some(m) = a.metrics_addr {
            let bound = metrics.serve(m).await?;
            tracing::info!(%bound, "serving metrics");
        }
        if let Some(f) = &a.ready_file {
            understudy_common::source::state::write_atomic(f, addr.to_string().as_bytes())?;
        }
        tracing::info!(%addr, "target agent listening");
        tokio::select! {
            r = server.run() => r,
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; stopping"); Ok(()) }
        }
    })
}

fn points(a: &PointsArgs) -> Result<()> {
    let store = open_store(&a.store.dir)?;
    let groups = match &a.group {
        Some(g) => vec![g.clone()],
        None => store.groups()?,
    };
    let mut all = Vec::new();
    for g in groups {
        all.extend(store.points(&g)?);
    }
    print(&all, a.store.json, || {
        let mut s = format!(
            "{:<16} {:>5}  {:<20}  {:>7}  {:>14}  {}\n",
            "GROUP", "POINT", "CUT TIME", "VOLUMES", "CHANGED BLOCKS", "CUT ID"
        );
        for p in &all {
            s += &format!(
                "{:<16} {:>5}  {:<20}  {:>7}  {:>14}  {}\n",
                p.group,
                p.seq,
                understudy_common::format_ms(p.cut.created_ms),
                p.cut.volumes.len(),
                p.stats.blocks_changed,
                p.cut.cut_id
            );
        }
        s.trim_end().to_string()
    });
    Ok(())
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let store = open_store(&a.store.dir)?;
    let p = select_point(&store, &a.group, &a.point)?;
    print(&p, a.store.json, || {
        let mut s = format!(
            "group {} point {}\n  cut id      {}\n  source      {}\n",
            p.group, p.seq, p.cut.cut_id, p.cut.source
        );
        s += &format!(
            "  cut time    {}\n  committed   {}\n  block size  {}\n",
            understudy_common::format_ms(p.cut.created_ms),
            understudy_common::format_ms(p.committed_ms),
            p.cut.block_size
        );
        s += &format!(
            "  changed     {} blocks, {} chunks / {} bytes received\n",
            p.stats.blocks_changed, p.stats.chunks_received, p.stats.bytes_received
        );
        s += &format!(
            "  manifests   {} files, {} bytes, digest {}\n",
            p.cut.manifests.files, p.cut.manifests.len, p.cut.manifests.digest
        );
        for v in &p.cut.volumes {
            s += &format!(
                "  volume {:<12} {:>14} bytes  digest {}\n",
                v.name, v.size, v.digest
            );
        }
        s.trim_end().to_string()
    });
    Ok(())
}

fn verify(a: &StoreArgs) -> Result<ExitCode> {
    let store = open_store(&a.dir)?;
    let pb = understudy_common::progress::bytes(store.packed_bytes()?, "verify");
    let report = store.verify(&|b| pb.set_position(b))?;
    pb.finish_and_clear();
    print(&report, a.json, || {
        let mut s = format!(
            "checked {} chunks ({} bytes) and {} points\n",
            report.chunks_checked, report.bytes_checked, report.points_checked
        );
        for p in &report.problems {
            s += &format!("PROBLEM: {}\n", p.what);
            if let (Some(f), Some(o)) = (&p.pack_file, p.offset) {
                s += &format!("  in {f} at offset {o}\n");
            }
            for u in &p.used_by {
                s += &format!("  used by {u}\n");
            }
        }
        s += if report.ok() {
            "store is sound"
        } else {
            "store is DAMAGED: points using the chunks above cannot be restored exactly"
        };
        s
    });
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn retention(a: &RetentionArgs) -> Result<()> {
    let store = open_store(&a.store.dir)?;
    let policy = a.rules.policy();
    anyhow::ensure!(!policy.keeps_all(), "give --keep-last and/or --max-age");
    let groups = match &a.group {
        Some(g) => vec![g.clone()],
        None => store.groups()?,
    };
    let mut dropped = Vec::new();
    for g in &groups {
        for seq in store.apply_retention(g, policy, understudy_common::now_ms())? {
            dropped.push((g.clone(), seq));
        }
    }
    let gc = store.gc()?;
    print(
        &serde_json::json!({"dropped": dropped, "gc": gc}),
        a.store.json,
        || {
            format!(
                "dropped {} point(s) {:?}; gc removed {} chunks and freed {} bytes",
                dropped.len(),
                dropped,
                gc.chunks_removed,
                gc.bytes_freed
            )
        },
    );
    Ok(())
}

fn failover_cmd(a: &FailoverArgs) -> Result<ExitCode> {
    let store = open_store(&a.dir)?;
    let devices = parse_map(&a.devices, "device")?
        .into_iter()
        .map(|(k, v)| (k, PathBuf::from(v)))
        .collect();
    let req = FailoverRequest {
        group: a.group.clone(),
        point: a.point.clone(),
        out: a.out.clone(),
        devices,
        transform: Transform {
            namespaces: parse_map(&a.namespace_map, "namespace")?,
            storage_classes: parse_map(&a.storage_class_map, "storage class")?,
        },
        dry_run: a.dry_run,
        read_back: !a.no_read_back,
    };
    let bars =
        std::sync::Mutex::new(std::collections::HashMap::<String, indicatif::ProgressBar>::new());
    let report = failover(&store, &req, &|vol, done, total| {
        let mut b = bars.lock().expect("bars");
        let pb = b
            .entry(vol.to_string())
            .or_insert_with(|| understudy_common::progress::bytes(total, vol));
        pb.set_position(done);
        if done >= total {
            pb.finish_and_clear();
        }
    })
    .context("failover failed")?;
    print(&report, a.json, || report.render());
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
