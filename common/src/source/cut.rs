//! Making a cut: freeze (pre hook), note the instant, capture manifests, scan every volume, thaw
//! (post hook), and record the result durably as the pending cut.

use super::scan::{ScanSettings, scan_volume};
use super::spool::{Feed, SpoolIndex, SpoolWriter};
use super::state::{Base, GroupState};
use crate::change::{ChangeSource, VolumeBase};
use crate::cluster::capture::CaptureSpec;
use crate::hash::ChunkHash;
use crate::hooks::Hook;
use crate::manifest::Bundle;
use crate::protocol::OfferKind;
use crate::protocol::source_session::Offer;
use crate::store::{CutMeta, ManifestRef, VolumeMeta};
use crate::volume::{Volume, VolumeSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How the source cuts a group.
#[derive(Clone, Debug)]
pub struct CutConfig {
    /// Volumes, in order.
    pub volumes: Vec<VolumeSpec>,
    /// Where the application's manifests come from.
    pub manifests: ManifestSource,
    /// Block size.
    pub block_size: u32,
    /// zstd level.
    pub zstd_level: i32,
    /// Reader threads.
    pub workers: usize,
    /// Freeze command.
    pub pre_hook: Option<Hook>,
    /// Thaw command.
    pub post_hook: Option<Hook>,
    /// This agent's identity (certificate fingerprint).
    pub source_id: String,
}

/// Where a cut's manifests come from; they are captured at the cut, after the pre hook.
#[derive(Clone, Debug, Default)]
pub enum ManifestSource {
    /// No manifests (volumes only).
    #[default]
    None,
    /// A directory of YAML files (standalone mode).
    Directory(PathBuf),
    /// The application's objects on a cluster.
    Cluster {
        /// Kubeconfig (default: the usual inference).
        kubeconfig: Option<PathBuf>,
        /// Namespaces and selector.
        spec: CaptureSpec,
    },
}

impl ManifestSource {
    /// Captures the manifests now. Call from a blocking thread: a cluster capture runs on the
    /// current Tokio runtime (or a private one when there is none).
    pub fn capture(&self) -> Result<Bundle> {
        match self {
            ManifestSource::None => Ok(Bundle::default()),
            ManifestSource::Directory(dir) => Bundle::capture(dir),
            ManifestSource::Cluster { kubeconfig, spec } => {
                let work = async {
                    let client = crate::cluster::connect(kubeconfig.as_deref()).await?;
                    let c = crate::cluster::capture::capture(&client, spec).await?;
                    for w in &c.warnings {
                        tracing::warn!(warning = %w, "capture");
                    }
                    Ok::<_, anyhow::Error>(c.bundle)
                };
                let bundle = match tokio::runtime::Handle::try_current() {
                    Ok(h) => h.block_on(work),
                    Err(_) => tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(work),
                };
                bundle.context("capturing the application's objects from the cluster failed")
            }
        }
    }
}

/// A cut made and spooled, waiting for the target to commit it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingCut {
    /// What is offered (cut meta and entries).
    pub offer: Offer,
    /// Full block maps at the cut (the next base).
    pub maps: Vec<VolumeBase>,
    /// Where each spooled frame is.
    pub spool: SpoolIndex,
    /// Bytes read from volumes to make it.
    pub bytes_read: u64,
    /// Bytes of frames spooled.
    pub bytes_spooled: u64,
}

/// Makes a cut of the group, delta against `base` when there is one. With a `feed`, frames are
/// announced on it as they reach the spool file (see [`Feed`]).
pub fn make_cut(
    cfg: &CutConfig,
    state: &GroupState,
    base: Option<&Base>,
    change: &dyn ChangeSource,
    feed: Option<Feed>,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<PendingCut> {
    let base = base.filter(|b| b.block_size == cfg.block_size);
    let volumes: Vec<Volume> = cfg
        .volumes
        .iter()
        .map(|v| Volume::open(&v.path))
        .collect::<Result<_>>()?;
    state.clear_pending()?;
    let spool_path = state.cut_dir().join("spool.frames");
    let mut spool = SpoolWriter::create(&spool_path)?;
    if let Some(h) = &cfg.pre_hook {
        h.run("pre").inspect_err(|_| run_post(cfg))?;
    }
    let created_ms = crate::now_ms();
    let scanned = scan_all(cfg, &volumes, base, change, (&mut spool, feed), progress);
    run_post(cfg);
    let (metas, maps, entries, bytes_read, manifests) = scanned?;
    let bytes_spooled = spool.bytes();
    let index = spool.finish()?;
    let cut = CutMeta {
        cut_id: cut_id(&cfg.source_id, created_ms),
        source: cfg.source_id.clone(),
        created_ms,
        block_size: cfg.block_size,
        volumes: metas,
        manifests,
    };
    let kind = base.map_or(OfferKind::Full, |b| OfferKind::Delta { base: b.seq });
    let pending = PendingCut {
        offer: Offer { kind, cut, entries },
        maps,
        spool: index,
        bytes_read,
        bytes_spooled,
    };
    state.set_pending(&pending)?;
    Ok(pending)
}

fn run_post(cfg: &CutConfig) {
    if let Some(h) = &cfg.post_hook
        && let Err(e) = h.run("post")
    {
        tracing::error!(error = %format!("{e:#}"), "post hook failed: the application may still be frozen");
    }
}

type Scanned = (
    Vec<VolumeMeta>,
    Vec<VolumeBase>,
    Vec<Vec<(u64, crate::hash::BlockRef)>>,
    u64,
    ManifestRef,
);

fn scan_all(
    cfg: &CutConfig,
    volumes: &[Volume],
    base: Option<&Base>,
    change: &dyn ChangeSource,
    (spool, feed): (&mut SpoolWriter, Option<Feed>),
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Scanned> {
    let manifests = spool_manifests(&cfg.manifests.capture()?, cfg, spool)?;
    // Volume blocks are pushed; the manifest chunks, usually unchanged and so already held,
    // wait for the target's Need.
    spool.set_feed(feed);
    let settings = ScanSettings {
        block_size: cfg.block_size,
        zstd_level: cfg.zstd_level,
        workers: cfg.workers,
    };
    let (mut metas, mut maps, mut entries, mut read) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (spec, vol) in cfg.volumes.iter().zip(volumes) {
        let vbase = base.and_then(|b| b.volume(&spec.name));
        let size = vol.size();
        let s = scan_volume(&spec.name, vol, vbase, change, settings, spool, &|done| {
            progress(&spec.name, done, size)
        })
        .with_context(|| {
            format!(
                "scan of volume {} ({}) failed",
                spec.name,
                spec.path.display()
            )
        })?;
        metas.push(VolumeMeta {
            name: spec.name.clone(),
            size,
            digest: s.digest,
        });
        maps.push(VolumeBase {
            name: spec.name.clone(),
            size,
            blocks: s.map,
        });
        entries.push(s.entries);
        read += s.bytes_read;
    }
    Ok((metas, maps, entries, read, manifests))
}

fn spool_manifests(
    bundle: &Bundle,
    cfg: &CutConfig,
    spool: &mut SpoolWriter,
) -> Result<ManifestRef> {
    let bytes = bundle.encode();
    let mut chunks = Vec::new();
    for piece in bytes.chunks(cfg.block_size as usize) {
        let h = ChunkHash::of(piece);
        if !spool.contains(&h) {
            spool.add(h, crate::chunk::encode_with_hash(piece, h, cfg.zstd_level))?;
        }
        chunks.push(h);
    }
    Ok(ManifestRef {
        len: bytes.len() as u64,
        digest: blake3::hash(&bytes).to_hex().to_string(),
        files: bundle.files.len() as u32,
        chunks,
    })
}

fn cut_id(source: &str, created_ms: i64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(source.as_bytes());
    h.update(&created_ms.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(&nanos.to_le_bytes());
    format!("{}-{}", created_ms, &h.finalize().to_hex()[..12])
}
