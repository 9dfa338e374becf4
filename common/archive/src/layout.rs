//! Where things are in the bucket, below the archive's prefix (docs/store-format.md, "Archive"):
//!
//! ```text
//! packs/<id, 8 hex digits>.pack    a sealed pack, byte for byte as the store has it
//! catalog/<ms, 16 digits>.snap     a catalog snapshot (common::store::snapshot)
//! catalog/<ms, 16 digits>.json     its manifest, written last: a snapshot counts once it is there
//! keys/<generation, 8 digits>.json an encrypted archive's key generation, wrapped by the KEK
//! ```
//! In an encrypted archive packs and snapshots are sealed (crate::sealed); manifests and key
//! objects hold no data.
//!
//! A manifest is written only after its snapshot and every pack it lists are complete objects,
//! so the archive never lists a point whose data is not in the bucket.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use understudy_common::store::snapshot::PointSummary;

/// Directory of the packs.
pub const PACKS: &str = "packs/";
/// Directory of the snapshots and their manifests.
pub const CATALOG: &str = "catalog/";
/// Directory of the key objects.
pub const KEYS: &str = "keys/";

/// The object of pack `id`.
pub fn pack_name(id: u32) -> String {
    format!("{PACKS}{id:08x}.pack")
}

/// The pack id of a pack object's name.
pub fn pack_id(name: &str) -> Option<u32> {
    let hex = name.strip_prefix(PACKS)?.strip_suffix(".pack")?;
    u32::from_str_radix(hex, 16).ok()
}

/// A snapshot's stamp: its time in ms, 16 digits, so names sort by time.
pub fn stamp(ms: i64) -> String {
    format!("{:016}", ms.max(0))
}

/// The snapshot object of `stamp`.
pub fn snapshot_name(stamp: &str) -> String {
    format!("{CATALOG}{stamp}.snap")
}

/// The manifest object of `stamp`.
pub fn manifest_name(stamp: &str) -> String {
    format!("{CATALOG}{stamp}.json")
}

/// The stamp of a manifest object's name.
pub fn manifest_stamp(name: &str) -> Option<&str> {
    name.strip_prefix(CATALOG)?.strip_suffix(".json")
}

/// What one archived snapshot holds: the last object written for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of this manifest's format (1).
    pub format: u32,
    /// Its stamp (names its objects).
    pub stamp: String,
    /// When it was taken (ms since epoch).
    pub created_ms: i64,
    /// Size of the snapshot object.
    pub snapshot_bytes: u64,
    /// BLAKE3 of the snapshot object (hex).
    pub snapshot_blake3: String,
    /// The packs (id, length) its chunks are in; all in the bucket.
    pub packs: Vec<(u32, u64)>,
    /// Its points.
    pub points: Vec<PointSummary>,
    /// The key generation its snapshot is sealed with; `None`: the archive is not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_generation: Option<u32>,
}

/// Version of [`Manifest`].
pub const MANIFEST_FORMAT: u32 = 1;

impl Manifest {
    /// Parses a manifest object.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(bytes)
            .with_context(|| format!("archive manifest {name} is damaged"))?;
        anyhow::ensure!(
            m.format == MANIFEST_FORMAT,
            "archive manifest {name} has format {}; this agent reads {MANIFEST_FORMAT}",
            m.format
        );
        Ok(m)
    }

    /// Whether it holds the same points in the same packs as a new snapshot would.
    pub fn same_as(&self, packs: &[(u32, u64)], points: &[PointSummary]) -> bool {
        self.packs == packs && self.points == points
    }
}
