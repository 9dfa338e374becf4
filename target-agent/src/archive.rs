//! The archive tier from the target agent: `serve --archive-bucket ...` archives behind the
//! commits; `archive list` and `archive restore` read the bucket (read-only credentials do).

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use understudy_archive::{Archiver, Bucket, BucketArgs, Policy};
use understudy_common::metrics::Metrics;

/// `serve`'s archive settings.
#[derive(clap::Args, Debug, Clone)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    /// Time between archive rounds (each seals the pack being written, so shorter rounds make
    /// smaller packs); the archive's lag is about this plus the upload time.
    #[arg(long = "archive-every", value_parser = humantime::parse_duration, default_value = "5m")]
    pub every: Duration,
    /// Catalog snapshots the archive keeps (the newest); the points they hold are what the
    /// archive can restore.
    #[arg(long = "archive-keep", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub keep: u64,
}

/// Starts the archiver beside the server when a bucket is configured.
pub fn start(
    a: &ArchiveArgs,
    dir: PathBuf,
    ctx: Arc<crate::session::SessionContext>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let Some(bucket) = Bucket::from_args(&a.bucket)? else {
        return Ok(());
    };
    tracing::info!(bucket = %bucket.describe(), every = ?a.every, keep = a.keep, "archiving the store");
    let policy = Policy {
        every: a.every,
        keep: a.keep as usize,
    };
    let archiver = Archiver::new(ctx.store.clone(), bucket, dir, policy, metrics);
    tokio::spawn(async move { archiver.run(&ctx.gc_gate, std::future::pending()).await });
    Ok(())
}

/// `archive` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ArchiveCommand {
    /// List the archived catalog snapshots and their points.
    List(ListArgs),
    /// Rebuild a store from the archive into an empty agent directory (then `serve` it).
    Restore(RestoreArgs),
    /// Check the archive as `verify` checks a store: every pack and snapshot whole, every chunk
    /// re-hashed, every point's volume digests re-derived (exit 2 on damage).
    Verify(VerifyArgs),
}

/// `archive verify` arguments.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Every snapshot the archive keeps (default: the newest).
    #[arg(long)]
    pub all: bool,
    /// Where to download what is checked (needs room for the packs; default: a temporary
    /// directory, removed after).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub bucket: BucketArgs,
}

/// `archive list` arguments.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `archive restore` arguments.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Agent directory to restore into (its `store/` must not exist yet).
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// The snapshot to restore (a stamp `archive list` shows); default: the newest.
    #[arg(long)]
    pub snapshot: Option<String>,
    #[command(flatten)]
    pub bucket: BucketArgs,
}

impl ArchiveCommand {
    /// Runs the subcommand.
    pub fn run(self) -> Result<ExitCode> {
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async {
            match self {
                ArchiveCommand::List(a) => list(a).await,
                ArchiveCommand::Restore(a) => restore(a).await,
                ArchiveCommand::Verify(a) => verify(a).await,
            }
        })
    }
}

fn bucket(args: &BucketArgs) -> Result<Bucket> {
    Bucket::from_args(args)?.context(
        "no archive: pass --archive-bucket (and --archive-endpoint for a server other than AWS)",
    )
}

async fn list(a: ListArgs) -> Result<ExitCode> {
    let all = understudy_archive::archiver::manifests(&bucket(&a.bucket)?).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    for m in &all {
        let points: Vec<String> = m
            .points
            .iter()
            .map(|p| format!("{}/{}", p.group, p.seq))
            .collect();
        let bytes: u64 = m.packs.iter().map(|(_, l)| l).sum::<u64>() + m.snapshot_bytes;
        println!(
            "{}  {}  {} packs, {} MiB  points {}",
            m.stamp,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(m.created_ms.max(0) as u64)
            ),
            m.packs.len(),
            bytes >> 20,
            points.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn restore(a: RestoreArgs) -> Result<ExitCode> {
    let b = bucket(&a.bucket)?;
    let root = a.dir.join("store");
    let (_store, r) =
        understudy_archive::restore::restore(&b, &root, a.snapshot.as_deref()).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    eprintln!(
        "restored snapshot {} from {} into {} ({} points, {} packs, {} MiB); put the agent's identity in {} (or pass --identity) and run `serve`",
        r.stamp,
        b.describe(),
        root.display(),
        r.points.len(),
        r.packs,
        r.bytes >> 20,
        a.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let b = bucket(&a.bucket)?;
    let temp;
    let scratch = match &a.scratch {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("understudy-archive-verify-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let r = understudy_archive::verify::verify(&b, &scratch, a.all).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "checked {} snapshots of {}: {} points, {} chunks",
            r.snapshots_checked,
            b.describe(),
            r.points_checked,
            r.chunks_checked
        );
        for p in &r.problems {
            println!("PROBLEM in snapshot {}: {}", p.snapshot, p.problem.what);
            if let Some(o) = &p.problem.pack_file {
                println!("  in {o} at offset {}", p.problem.offset.unwrap_or(0));
            }
            for u in &p.problem.used_by {
                println!("  used by {u}");
            }
        }
        println!(
            "{}",
            if r.ok() {
                "archive is sound"
            } else {
                "archive is DAMAGED: restore an older snapshot (--snapshot), or archive again from a sound store"
            }
        );
    }
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
