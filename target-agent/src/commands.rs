//! Commands that work on the store: points, inspect, verify, retention, gc, failover. Each returns
//! its output instead of printing it, so the same code runs in the CLI (store opened directly) and
//! in a running `serve` (reached through its admin socket, see [`crate::admin`]).

use crate::failover::{AgeGuard, FailoverRequest, PointSelector, RpoGuard, failover, select_point};
use anyhow::{Context, Result};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use understudy_common::store::Store;
use understudy_common::store::retention::RetentionPolicy;
use understudy_kube::bundle::parse_map;
use understudy_kube::transform::Rules;

/// A store directory.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct StoreArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Retention rules.
#[derive(clap::Args, Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetentionRules {
    /// Keep the newest N points of each group.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Keep points younger than this (e.g. 7d, 12h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_age: Option<std::time::Duration>,
}

impl RetentionRules {
    /// The policy these rules describe.
    pub fn policy(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            max_age: self.max_age,
        }
    }
}

/// `points` arguments.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct PointsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Only this group.
    #[arg(long)]
    pub group: Option<String>,
}

/// `inspect` arguments.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
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
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
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
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct FailoverArgs {
    /// Agent state directory.
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// What to fail over, and where to.
    #[command(flatten)]
    #[serde(flatten)]
    pub spec: FailoverSpec,
}

/// A failover's choices, whatever store it reads (the agent's, or one staged from the archive).
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct FailoverSpec {
    /// Group to fail over.
    #[arg(long)]
    pub group: String,
    /// latest, a point number, or a time (the newest point at or before it).
    #[arg(long, default_value = "latest")]
    pub point: PointSelector,
    /// Output directory: volumes/<name>.img, manifests/, report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// RPO guard: the chosen point's cut may be at most this old, e.g. `15m` (a drill or a
    /// migration to an older point means replication has stopped).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_point_age: Option<std::time::Duration>,
    /// What a point older than --max-point-age does: refuse (nothing written) or warn.
    #[arg(long, value_enum, default_value = "refuse", requires = "max_point_age")]
    pub rpo_guard: RpoGuard,
    /// Write volume NAME to an existing device or file instead of an image (NAME=PATH, repeatable).
    #[arg(long = "device", value_name = "NAME=PATH")]
    pub devices: Vec<String>,
    /// Manifest transforms.
    #[command(flatten)]
    pub transform: TransformArgs,
    /// Show what would be done; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also re-read each written volume after its fsync and hash it again. Every chunk is
    /// verified against its hash as it is written and the volume's digest is derived from
    /// them, so this second pass only re-checks what the page cache holds, at the cost of
    /// reading and hashing the volume once more (about half again the rebuild time).
    #[arg(long)]
    pub read_back: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How manifests are transformed for the standby: a rules file and command-line maps.
#[derive(clap::Args, Debug, Clone, Default, Serialize, Deserialize)]
pub struct TransformArgs {
    /// Transform rules file (YAML; see docs/operations.md, "Transform rules").
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Map a namespace (FROM=TO, repeatable; added to the rules file's map).
    #[arg(long = "namespace-map", value_name = "FROM=TO")]
    pub namespace_map: Vec<String>,
    /// Map a storage class (FROM=TO, repeatable; added to the rules file's map).
    #[arg(long = "storage-class-map", value_name = "FROM=TO")]
    pub storage_class_map: Vec<String>,
    /// An inert standby copy: nothing of the application runs (workloads scaled to zero, jobs
    /// suspended, bare pods left out, webhooks failing open) until an apply without it.
    #[arg(long)]
    pub inert: bool,
}

impl TransformArgs {
    /// Loads the rules file (if any) and adds the command-line maps.
    pub fn rules(&self) -> Result<Rules> {
        let mut r = match &self.rules {
            Some(p) => Rules::load(p)?,
            None => Rules::default(),
        };
        r.namespaces
            .extend(parse_map(&self.namespace_map, "namespace")?);
        r.storage_classes
            .extend(parse_map(&self.storage_class_map, "storage class")?);
        r.inert |= self.inert;
        Ok(r)
    }
}

/// The store commands.
#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum StoreCommand {
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

/// A command's output and exit code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// What to print on stdout.
    pub output: String,
    /// Process exit code (0 ok, 2 damage found or a volume failed).
    pub code: u8,
}

impl Reply {
    fn ok(output: String) -> Self {
        Reply { output, code: 0 }
    }
}

impl StoreCommand {
    /// The agent directory it names.
    pub fn dir(&self) -> &Path {
        match self {
            StoreCommand::Points(a) => &a.store.dir,
            StoreCommand::Inspect(a) => &a.store.dir,
            StoreCommand::Verify(a) | StoreCommand::Gc(a) => &a.dir,
            StoreCommand::Retention(a) => &a.store.dir,
            StoreCommand::Failover(a) => &a.dir,
        }
    }

    /// True for commands that delete data and so must not run beside a session.
    pub fn needs_store_alone(&self) -> bool {
        matches!(self, StoreCommand::Retention(_) | StoreCommand::Gc(_))
    }

    /// Makes every path absolute, so another process (the running server) reads them the same way.
    pub fn absolutize(&mut self) -> Result<()> {
        let abs = |p: &Path| {
            std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
        };
        if let StoreCommand::Failover(FailoverArgs { spec: a, .. }) = self {
            a.out = abs(&a.out)?;
            if let Some(r) = &mut a.transform.rules {
                *r = abs(r)?;
            }
            for d in &mut a.devices {
                if let Some((name, path)) = d.split_once('=') {
                    *d = format!("{name}={}", abs(Path::new(path))?.display());
                }
            }
        }
        Ok(())
    }

    /// Runs the command against an open store; `progress` draws progress bars (local runs only).
    pub fn run(&self, store: &Store, progress: bool) -> Result<Reply> {
        match self {
            StoreCommand::Points(a) => points(store, a),
            StoreCommand::Inspect(a) => inspect(store, a),
            StoreCommand::Verify(a) => verify(store, a, progress),
            StoreCommand::Retention(a) => retention(store, a),
            StoreCommand::Gc(a) => {
                let r = store.gc()?;
                Ok(Reply::ok(render(&r, a.json, || {
                    format!(
                        "removed {} chunks, deleted {} packs, compacted {}, freed {} bytes",
                        r.chunks_removed, r.packs_deleted, r.packs_compacted, r.bytes_freed
                    )
                })))
            }
            StoreCommand::Failover(a) => failover_cmd(store, &a.spec, progress),
        }
    }
}

fn render<T: Serialize>(v: &T, json: bool, text: impl FnOnce() -> String) -> String {
    if json {
        serde_json::to_string_pretty(v).expect("serialisable") + "\n"
    } else {
        text() + "\n"
    }
}

fn points(store: &Store, a: &PointsArgs) -> Result<Reply> {
    let groups = match &a.group {
        Some(g) => vec![g.clone()],
        None => store.groups()?,
    };
    let mut all = Vec::new();
    for g in groups {
        all.extend(store.points(&g)?);
    }
    Ok(Reply::ok(render(&all, a.store.json, || {
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
    })))
}

fn inspect(store: &Store, a: &InspectArgs) -> Result<Reply> {
    let p = select_point(store, &a.group, &a.point)?;
    Ok(Reply::ok(render(&p, a.store.json, || {
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
    })))
}

fn verify(store: &Store, a: &StoreArgs, progress: bool) -> Result<Reply> {
    let total = if progress { store.packed_bytes()? } else { 0 };
    let pb = understudy_common::progress::bytes(total, "verify");
    let report = store.verify(&|b| pb.set_position(b))?;
    pb.finish_and_clear();
    let output = render(&report, a.json, || {
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
    Ok(Reply {
        output,
        code: if report.ok() { 0 } else { 2 },
    })
}

fn retention(store: &Store, a: &RetentionArgs) -> Result<Reply> {
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
    Ok(Reply::ok(render(
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
    )))
}

/// Fails over to a point of `store` as `a` says; `progress` draws a bar per volume.
pub(crate) fn failover_cmd(store: &Store, a: &FailoverSpec, progress: bool) -> Result<Reply> {
    let devices = parse_map(&a.devices, "device")?
        .into_iter()
        .map(|(k, v)| (k, PathBuf::from(v)))
        .collect();
    let req = FailoverRequest {
        group: a.group.clone(),
        point: a.point.clone(),
        out: a.out.clone(),
        devices,
        rules: a.transform.rules()?,
        dry_run: a.dry_run,
        read_back: a.read_back,
        age_guard: a.max_point_age.map(|max_age| AgeGuard {
            max_age,
            on_older: a.rpo_guard,
            words: crate::failover::GuardWords::CLI,
        }),
    };
    let bars =
        std::sync::Mutex::new(std::collections::HashMap::<String, indicatif::ProgressBar>::new());
    let report = failover(store, &req, &|vol, done, total| {
        if !progress {
            return;
        }
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
    Ok(Reply {
        output: render(&report, a.json, || report.render()),
        code: if report.ok { 0 } else { 2 },
    })
}
