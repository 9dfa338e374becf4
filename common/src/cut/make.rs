//! Making a cut: take the instant ([`CutInstant`]: standalone, a freeze by the pre hook),
//! capture the manifests, scan every volume against the base, end the hold (the post hook), and
//! record the result durably as the pending cut.

use super::base::BaseInfo;
use super::instant::{CutInstant, FrozenLive, TakenInstant};
use super::manifests::ManifestSource;
use super::scan::{BaseStream, ScanObserver, ScanSettings, scan_volume};
use super::spool::{Feed, SpoolIndex, SpoolWriter};
use super::state::GroupState;
use crate::block_map::BlockChange;
use crate::change::ChangeSource;
use crate::error::Interrupted;
use crate::hooks::Hook;
use crate::protocol::OfferKind;
use crate::protocol::source_session::Offer;
use crate::store::{CutMeta, ManifestRef, VolumeMeta};
use crate::volume::VolumeSpec;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How the source cuts a group.
#[derive(Clone, Debug)]
pub struct CutConfig {
    /// Volumes, in order.
    pub volumes: Vec<VolumeSpec>,
    /// Where the application's manifests come from.
    pub manifests: Arc<dyn ManifestSource>,
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

impl CutConfig {
    /// The standalone instant: the configured volumes, live, frozen by the hooks while read.
    pub fn live_instant(&self) -> FrozenLive<'_> {
        FrozenLive {
            volumes: &self.volumes,
            pre_hook: self.pre_hook.as_ref(),
            post_hook: self.post_hook.as_ref(),
        }
    }
}

/// A cut made and spooled, waiting for the target to commit it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingCut {
    /// What is offered: the cut and, per volume, its changes against the base.
    pub offer: Offer,
    /// Where each spooled frame is.
    pub spool: SpoolIndex,
    /// Bytes read from volumes to make it.
    pub bytes_read: u64,
    /// Bytes of frames spooled.
    pub bytes_spooled: u64,
    /// Per volume (in the cut's order), the change source that named what to read.
    pub change_sources: Vec<String>,
}

impl PendingCut {
    /// The base this cut becomes once the target committed it as point `seq`.
    pub fn base_info(&self, seq: u64) -> BaseInfo {
        let cut = &self.offer.cut;
        BaseInfo {
            seq,
            cut_id: cut.cut_id.clone(),
            block_size: cut.block_size,
            volumes: cut
                .volumes
                .iter()
                .map(|v| (v.name.clone(), v.size))
                .collect(),
        }
    }
}

/// What a cut reports to, and hears from, the agent making it.
pub struct CutObserver<'a> {
    /// Where frames are announced as they reach the spool file (see [`Feed`]), if anywhere.
    pub feed: Option<Feed>,
    /// Called with (volume, bytes covered, volume size) as the scan goes.
    pub progress: &'a (dyn Fn(&str, u64, u64) + Sync),
    /// True once the agent was asked to stop: the cut ends at the next block batch with
    /// [`Interrupted`] (after its thaw), and nothing of it is kept.
    pub stop: &'a (dyn Fn() -> bool + Sync),
}

/// Makes a cut of the group at an instant `instant` takes, delta against the group's base when
/// it has one. The hold on the instant (a freeze) ends when the volumes are read, whether the
/// cut succeeds, fails or is stopped; manifests are captured inside it.
pub fn make_cut(
    cfg: &CutConfig,
    state: &GroupState,
    instant: &dyn CutInstant,
    change: &dyn ChangeSource,
    obs: CutObserver<'_>,
) -> Result<PendingCut> {
    let base = state.base()?.filter(|b| b.block_size == cfg.block_size);
    state.clear_pending()?;
    let spool_path = state.cut_dir().join("spool.frames");
    let mut spool = SpoolWriter::create(&spool_path)?;
    let taken = instant.take()?;
    if (obs.stop)() {
        return Err(Interrupted.into()); // dropping `taken` ends the hold (the thaw runs)
    }
    let scanned = scan_all(cfg, state, &taken, base.as_ref(), change, &mut spool, obs);
    let created_ms = taken.created_ms;
    drop(taken);
    let scanned = scanned?;
    let bytes_spooled = spool.bytes();
    let index = spool.finish()?;
    let cut = CutMeta {
        cut_id: cut_id(&cfg.source_id, created_ms),
        source: cfg.source_id.clone(),
        created_ms,
        block_size: cfg.block_size,
        volumes: scanned.metas,
        manifests: scanned.manifests,
    };
    let kind = base.map_or(OfferKind::Full, |b| OfferKind::Delta { base: b.seq });
    let pending = PendingCut {
        offer: Offer {
            kind,
            cut,
            entries: scanned.changes,
            parts: None,
        },
        spool: index,
        bytes_read: scanned.bytes_read,
        bytes_spooled,
        change_sources: scanned.change_sources,
    };
    state.set_pending(&pending)?;
    Ok(pending)
}

/// What scanning every volume of a cut found.
struct Scanned {
    metas: Vec<VolumeMeta>,
    changes: Vec<Vec<BlockChange>>,
    bytes_read: u64,
    manifests: ManifestRef,
    change_sources: Vec<String>,
}

fn scan_all(
    cfg: &CutConfig,
    state: &GroupState,
    taken: &TakenInstant,
    base: Option<&BaseInfo>,
    change: &dyn ChangeSource,
    spool: &mut SpoolWriter,
    obs: CutObserver<'_>,
) -> Result<Scanned> {
    let manifests = cfg
        .manifests
        .capture()?
        .spool(cfg.block_size, cfg.zstd_level, spool)?;
    // Volume blocks are pushed; the manifest chunks, usually unchanged and so already held,
    // wait for the target's Need.
    spool.set_feed(obs.feed);
    let settings = ScanSettings {
        block_size: cfg.block_size,
        zstd_level: cfg.zstd_level,
        workers: cfg.workers,
    };
    let reader = state.base_reader()?;
    let mut out = Scanned {
        metas: Vec::new(),
        changes: Vec::new(),
        bytes_read: 0,
        manifests,
        change_sources: Vec::new(),
    };
    for (name, vol) in &taken.volumes {
        let size = vol.size();
        let mut stream = reader.volume(name)?;
        let vbase = base
            .filter(|b| b.volume_size(name).is_some())
            .map(|_| &mut stream as BaseStream<'_>);
        let progress = |done| (obs.progress)(name, done, size);
        let scan_obs = ScanObserver {
            stop: obs.stop,
            progress: &progress,
        };
        let s = scan_volume(name, vol, vbase, change, settings, spool, scan_obs)
            .with_context(|| format!("scan of volume {name} ({}) failed", vol.path().display()))?;
        out.metas.push(VolumeMeta {
            name: name.clone(),
            size,
            digest: s.digest,
        });
        out.changes.push(s.changes);
        out.bytes_read += s.bytes_read;
        out.change_sources.push(s.change_source.to_string());
    }
    Ok(out)
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
