//! Change detection: which blocks of a volume may differ from the last committed point.
//!
//! A [`ChangeSource`] names candidate block ranges; the scanner reads only those, hashes them and
//! compares each hash with the base, so a source can over-report but never under-report. Without
//! changed-block tracking, [`FullScan`] names every block (the volume is read, only changed blocks
//! are sent). A CSI SnapshotMetadata client (GetMetadataDelta) plugs in here as another
//! implementation without touching the scanner, the protocol or the store.

use crate::hash::{BlockRef, block_count};
use anyhow::Result;
use std::ops::Range;

/// What the source knows of a volume at the last committed point.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeBase {
    /// Volume name.
    pub name: String,
    /// Size at that point.
    pub size: u64,
    /// Block map at that point.
    pub blocks: Vec<BlockRef>,
}

/// Names the blocks of a volume that may have changed since its base.
pub trait ChangeSource: Send + Sync {
    /// Short name for logs ("full-scan", "csi-delta").
    fn name(&self) -> &'static str;

    /// Block ranges, increasing and non-overlapping, that may differ from `base` (or, with no base,
    /// that may hold data). Blocks outside them are taken as unchanged (or as holes).
    fn candidates(
        &self,
        volume: &str,
        size: u64,
        block_size: u32,
        base: Option<&VolumeBase>,
    ) -> Result<Vec<Range<u64>>>;
}

/// No changed-block tracking: every block is a candidate.
pub struct FullScan;

impl ChangeSource for FullScan {
    fn name(&self) -> &'static str {
        "full-scan"
    }

    fn candidates(
        &self,
        _volume: &str,
        size: u64,
        block_size: u32,
        _base: Option<&VolumeBase>,
    ) -> Result<Vec<Range<u64>>> {
        #[allow(clippy::single_range_in_vec_init)] // one range of every block, not a vec of indices
        Ok(vec![0..block_count(size, block_size)])
    }
}

/// Splits ranges into batches of at most `max` blocks.
pub fn batches(ranges: &[Range<u64>], max: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for r in ranges {
        let mut s = r.start;
        while s < r.end {
            let e = (s + max).min(r.end);
            out.push(s..e);
            s = e;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_ranges_exactly() {
        let b = batches(&[0..5, 10..11, 20..150], 64);
        assert_eq!(b, vec![0..5, 10..11, 20..84, 84..148, 148..150]);
    }
}
