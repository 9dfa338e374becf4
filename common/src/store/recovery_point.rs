//! Recovery points: what a point records and how it is encoded in the catalog.

use crate::hash::{BlockRef, ChunkHash};
use serde::{Deserialize, Serialize};

/// Block-map entries declared for one volume of a cut: (volume name, [(block index, new ref)]).
pub type VolumeEntries = (String, Vec<(u64, BlockRef)>);

/// One volume of a cut, as declared by the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Volume name within the group.
    pub name: String,
    /// Size in bytes at the cut.
    pub size: u64,
    /// Volume digest (see hash.rs) the source computed from the cut: restore must reproduce it.
    pub digest: String,
}

/// The manifest bundle of a cut: a byte blob stored as chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRef {
    /// Length of the bundle in bytes.
    pub len: u64,
    /// BLAKE3 of the bundle.
    pub digest: String,
    /// Number of manifest files in it.
    pub files: u32,
    /// The bundle's chunks in order.
    pub chunks: Vec<ChunkHash>,
}

/// A cut as the source declares it: the group's volumes and manifests at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutMeta {
    /// Unique id the source gave the cut; makes a retried commit idempotent.
    pub cut_id: String,
    /// Identity (certificate fingerprint) of the source agent that made it.
    pub source: String,
    /// When the cut was taken (ms since epoch): RPO is measured from here.
    pub created_ms: i64,
    /// Block size of every volume.
    pub block_size: u32,
    /// The volumes, in the group's order.
    pub volumes: Vec<VolumeMeta>,
    /// The manifests.
    pub manifests: ManifestRef,
}

impl CutMeta {
    /// The volume of this cut with that name.
    pub fn volume(&self, name: &str) -> Option<&VolumeMeta> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// Figures of one commit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointStats {
    /// Block-map entries that differ from the previous point.
    pub blocks_changed: u64,
    /// Chunks the target received for this point (not counting ones it already held).
    pub chunks_received: u64,
    /// Bytes of chunk frames received for this point.
    pub bytes_received: u64,
}

/// What a commit makes a point of (see `Store::commit_point`).
#[derive(Clone, Copy, Debug)]
pub struct CommitRequest<'a> {
    /// The group.
    pub group: &'a str,
    /// The cut.
    pub cut: &'a CutMeta,
    /// The group's latest point when `entries` are a delta against it; `None` when they declare
    /// every block (a full offer).
    pub base: Option<u64>,
    /// Block-map entries per volume.
    pub entries: &'a [VolumeEntries],
    /// Chunks and bytes of frames received for it.
    pub received: (u64, u64),
    /// When it commits (ms since the Unix epoch).
    pub committed_ms: i64,
    /// The pending migration this point ends, marked in the same transaction.
    pub final_for: Option<&'a str>,
}

/// A committed recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRecord {
    /// Protection group.
    pub group: String,
    /// Sequence number within the group, given by the target at commit (1, 2, ...).
    pub seq: u64,
    /// The cut.
    pub cut: CutMeta,
    /// When the target committed it.
    pub committed_ms: i64,
    /// Commit figures.
    pub stats: PointStats,
}

impl PointRecord {
    /// Encodes for the catalog.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a point record always serialises")
    }

    /// Decodes a catalog value.
    pub fn decode(b: &[u8]) -> anyhow::Result<Self> {
        postcard::from_bytes(b).map_err(|e| {
            anyhow::anyhow!(
                "catalog holds an unreadable recovery point record ({e}): run `target-agent verify`"
            )
        })
    }
}

/// One volume a data mover staged for a cut (protocol 4): durable on the target, invisible until
/// the source commits the cut with `UseParts`, and dropped by the group's next commit either way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedPart {
    /// The cut it was staged for (the source's stage id).
    pub stage: String,
    /// The volume as the mover read it (name, size, digest).
    pub volume: VolumeMeta,
    /// Block size the mover read at.
    pub block_size: u32,
    /// The point its entries are a delta against (`None`: the group had no point; the entries
    /// list every data block).
    pub base: Option<u64>,
    /// Block-map entries against `base`, block indices increasing.
    pub entries: Vec<(u64, BlockRef)>,
}

/// The header of a staged part as the catalog keeps it (its entries are rows of their own).
#[derive(Serialize, Deserialize)]
pub(crate) struct PartHeader {
    pub(crate) volume: VolumeMeta,
    pub(crate) block_size: u32,
    pub(crate) base: Option<u64>,
    pub(crate) entries: u64,
}
