//! The archive tier from the target agent: `serve --archive-bucket ...` archives behind the
//! commits; `archive list`, `restore`, `verify` and `failover` only read the bucket (read-only
//! credentials do).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use understudy_archive::{Archiver, Bucket, BucketArgs, KeyArgs, Policy};
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
    /// Also delete archived snapshots older than this (e.g. `30d`); the newest is always kept.
    #[arg(id = "archive_max_age", long = "archive-max-age", value_parser = humantime::parse_duration)]
    pub max_age: Option<Duration>,
    #[command(flatten)]
    pub key: KeyArgs,
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
    let kek = a.key.kek()?;
    tracing::info!(bucket = %bucket.describe(), every = ?a.every, keep = a.keep, encrypted = kek.is_some(), "archiving the store");
    let policy = Policy {
        every: a.every,
        keep: a.keep as usize,
        max_age: a.max_age,
    };
    let archiver = Archiver::new(ctx.store.clone(), bucket, dir, policy, metrics, kek);
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
    /// Fail over to a point straight from the archive, with no store of this agent's: the
    /// snapshot is staged in a scratch directory, then `failover` runs on it (same flags,
    /// same report). For a standby whose disk or cluster is gone.
    Failover(FailoverArgs),
    /// Start a new key generation of an encrypted archive: what is archived from then on is
    /// sealed with it; what is there stays readable with the older ones (docs/operations.md,
    /// "Archive key rotation"). Needs write access and the archive's key.
    RotateKey(RotateKeyArgs),
}

/// `archive rotate-key` arguments.
#[derive(clap::Args, Debug)]
pub struct RotateKeyArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `archive failover` arguments.
#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// The snapshot to fail over from (a stamp `archive list` shows); default: the newest.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Where the snapshot's packs and catalog are staged (needs room for them; default: a
    /// temporary directory, removed after). An empty directory, or one an earlier `archive
    /// failover` or `archive verify` staged in (packs already there are not fetched again).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    #[command(flatten)]
    pub failover: crate::commands::FailoverSpec,
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// `archive verify` arguments.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Every snapshot the archive keeps (default: the newest).
    #[arg(long)]
    pub all: bool,
    /// Where to download what is checked (needs room for the packs; default: a temporary
    /// directory, removed after): an empty directory, or one an earlier `archive verify` or
    /// `archive failover` staged in (packs already there are not fetched again).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[command(flatten)]
    pub key: KeyArgs,
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
    #[command(flatten)]
    pub key: KeyArgs,
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
                ArchiveCommand::Failover(a) => failover(a).await,
                ArchiveCommand::RotateKey(a) => rotate_key(a).await,
            }
        })
    }
}

fn bucket(args: &BucketArgs) -> Result<Bucket> {
    Bucket::from_args(args)?.context(
        "no archive: pass --archive-bucket (and --archive-endpoint for a server other than AWS)",
    )
}

/// The keys to read `b` with (none for an archive that is not encrypted).
async fn reading_keys(
    b: &Bucket,
    key: &KeyArgs,
) -> Result<Option<understudy_common::keys::Keyring>> {
    understudy_archive::keys::for_reading(b, key.kek()?.as_ref()).await
}

async fn rotate_key(a: RotateKeyArgs) -> Result<ExitCode> {
    let b = bucket(&a.bucket)?;
    let kek = a.key.kek()?.context(
        "rotate-key needs the archive's key: --archive-key-file, --archive-passphrase-file or $UNDERSTUDY_ARCHIVE_KEY",
    )?;
    let g = understudy_archive::keys::rotate(&b, &kek).await?;
    println!(
        "key generation {g} of {} created: archive rounds seal with it from their next round; data sealed before stays readable with the older generations",
        b.describe()
    );
    Ok(ExitCode::SUCCESS)
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
    let keys = reading_keys(&b, &a.key).await?;
    let (_store, r) =
        understudy_archive::restore::restore(&b, keys.as_ref(), &root, a.snapshot.as_deref())
            .await?;
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

/// A directory that archive downloads are staged in: one given by the user, which must be
/// empty or staged in before (never a live store: its catalog is replaced), or a temporary one
/// removed when this is dropped.
struct Scratch {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// The file that marks a directory as staged in by `archive`.
const SCRATCH_MARK: &str = "archive-scratch";

impl Scratch {
    fn new(given: Option<&Path>, command: &str) -> Result<Self> {
        let Some(dir) = given else {
            let temp = tempfile::Builder::new()
                .prefix(&format!("understudy-archive-{command}-"))
                .tempdir()
                .context("cannot create a temporary scratch directory: pass --scratch DIR")?;
            return Ok(Scratch {
                path: temp.path().to_path_buf(),
                _temp: Some(temp),
            });
        };
        let used = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        if used && !dir.join(SCRATCH_MARK).exists() {
            anyhow::bail!(
                "--scratch {} is not empty and was not staged in by `target-agent archive`: give an empty directory (it must never be an agent's own)",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --scratch {}", dir.display()))?;
        std::fs::write(
            dir.join(SCRATCH_MARK),
            b"staged archive downloads; safe to delete\n",
        )
        .with_context(|| format!("cannot write in --scratch {}", dir.display()))?;
        Ok(Scratch {
            path: dir.to_path_buf(),
            _temp: None,
        })
    }
}

async fn failover(a: FailoverArgs) -> Result<ExitCode> {
    let b = bucket(&a.bucket)?;
    let scratch = Scratch::new(a.scratch.as_deref(), "failover")?;
    let root = scratch.path.join("store");
    understudy_common::files::remove_if_present(&root.join("catalog.redb"))?;
    let keys = reading_keys(&b, &a.key).await?;
    let (store, r) =
        understudy_archive::restore::restore(&b, keys.as_ref(), &root, a.snapshot.as_deref())
            .await
            .context("cannot stage the archive for failover")?;
    tracing::info!(snapshot = %r.stamp, packs = r.packs, mib = r.bytes >> 20, "staged the archive");
    let spec = a.failover;
    // Bars show only on a terminal.
    let reply =
        tokio::task::spawn_blocking(move || crate::commands::failover_cmd(&store, &spec, true))
            .await??;
    print!("{}", reply.output);
    Ok(ExitCode::from(reply.code))
}

async fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let b = bucket(&a.bucket)?;
    let scratch = Scratch::new(a.scratch.as_deref(), "verify")?;
    let keys = reading_keys(&b, &a.key).await?;
    let r = understudy_archive::verify::verify(&b, keys.as_ref(), &scratch.path, a.all).await?;
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
