//! Change detection: which blocks of a volume the scan must read.
//!
//! A [`ChangeSource`] names candidate block ranges as a stream that may arrive page by page (the
//! CSI GetMetadataDelta and GetMetadataAllocated streams are paged, and a broken stream resumes
//! from its last offset inside the source). The scanner reads only those ranges, hashes each
//! block and compares it with the base, so a source may over-report but never under-report.
//! What the blocks outside the ranges are is the source's to say ([`Unlisted`]): holes (the
//! ranges cover every block that may hold data: SEEK_DATA on an image file, GetMetadataAllocated)
//! or unchanged since the base (GetMetadataDelta). Everything after the ranges (read, hash,
//! compare, frame, spool, digest) is the same for every source.
//!
//! Contract for implementers: ranges are block indices, each non-empty, strictly increasing and
//! non-overlapping, within the volume; an error ends the scan (the cut is not made) and says
//! what failed. With `Unlisted::Unchanged`, a base must exist: without one, nothing is unchanged.

use crate::volume::Volume;
use anyhow::Result;
use std::ops::Range;

/// What the blocks outside a source's ranges hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unlisted {
    /// All zero: the ranges cover every block that may hold data.
    Holes,
    /// As in the base: the ranges cover every block that may have changed since it.
    Unchanged,
}

/// A stream of candidate block ranges.
pub type Ranges<'a> = Box<dyn Iterator<Item = Result<Range<u64>>> + Send + 'a>;

/// The candidates of one volume.
pub struct Candidates<'a> {
    /// What unlisted blocks hold.
    pub unlisted: Unlisted,
    /// The ranges, in increasing order.
    pub ranges: Ranges<'a>,
}

/// Names the blocks of a volume that may have changed since its base (or may hold data).
pub trait ChangeSource: Send + Sync {
    /// Short name for logs and status ("hash-diff", "csi-delta").
    fn name(&self) -> &'static str;

    /// The candidates of volume `name` (opened as `vol`) at `block_size`; `has_base` says
    /// whether the scan compares against a base.
    fn candidates<'a>(
        &'a self,
        name: &str,
        vol: &'a Volume,
        block_size: u32,
        has_base: bool,
    ) -> Result<Candidates<'a>>;
}

/// No changed-block tracking: every block that may hold data is read and hashed, and compared
/// with the base. On an image file the file system names the data (SEEK_DATA / SEEK_HOLE), so a
/// sparse volume costs its data, not its capacity; a block device is read whole.
pub struct HashDiff;

impl ChangeSource for HashDiff {
    fn name(&self) -> &'static str {
        "hash-diff"
    }

    fn candidates<'a>(
        &'a self,
        _name: &str,
        vol: &'a Volume,
        block_size: u32,
        _has_base: bool,
    ) -> Result<Candidates<'a>> {
        let extents = vol.data_extents(0, vol.size()).into_iter();
        Ok(Candidates {
            unlisted: Unlisted::Holes,
            ranges: Box::new(Coalesce::new(block_ranges(extents, vol.size(), block_size))),
        })
    }
}

/// Byte ranges named up front by a tracker outside the volume (CSI changed-block tracking:
/// GetMetadataAllocated for a first sync, with [`Unlisted::Holes`]; GetMetadataDelta against the
/// base's snapshot, with [`Unlisted::Unchanged`]). Ranges are rounded out to whole blocks, so a
/// tracker with smaller blocks than the group's never hides a change.
pub struct Listed {
    /// Name for logs and status (`csi-allocated`, `csi-delta`).
    pub name: &'static str,
    /// What the blocks outside the ranges hold.
    pub unlisted: Unlisted,
    /// Byte ranges, increasing and not overlapping.
    pub extents: Vec<Range<u64>>,
}

impl ChangeSource for Listed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn candidates<'a>(
        &'a self,
        name: &str,
        vol: &'a Volume,
        block_size: u32,
        has_base: bool,
    ) -> Result<Candidates<'a>> {
        anyhow::ensure!(
            has_base || self.unlisted == Unlisted::Holes,
            "{}: volume {name} has no base, so only the allocated ranges can name its blocks",
            self.name
        );
        let mut last = 0u64;
        for e in &self.extents {
            anyhow::ensure!(
                e.start >= last && e.start < e.end,
                "{}: ranges of volume {name} are not increasing ({}..{} after {last})",
                self.name,
                e.start,
                e.end
            );
            last = e.end;
        }
        let ranges = block_ranges(self.extents.iter().cloned(), vol.size(), block_size);
        Ok(Candidates {
            unlisted: self.unlisted,
            ranges: Box::new(Coalesce::new(ranges)),
        })
    }
}

/// Byte ranges rounded out to whole blocks, clamped to a volume of `size` bytes.
fn block_ranges(
    bytes: impl Iterator<Item = Range<u64>>,
    size: u64,
    block_size: u32,
) -> impl Iterator<Item = Result<Range<u64>>> {
    let bs = block_size as u64;
    let blocks = size.div_ceil(bs);
    bytes.map(move |e| Ok((e.start / bs).min(blocks)..e.end.div_ceil(bs).min(blocks)))
}

/// Merges touching or overlapping ranges of an increasing stream (extents rounded out to whole
/// blocks can share a block).
struct Coalesce<I> {
    inner: I,
    pending: Option<Range<u64>>,
}

impl<I> Coalesce<I> {
    fn new(inner: I) -> Self {
        Coalesce {
            inner,
            pending: None,
        }
    }
}

impl<I: Iterator<Item = Result<Range<u64>>>> Iterator for Coalesce<I> {
    type Item = Result<Range<u64>>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.inner.next() {
                Some(Ok(r)) if r.is_empty() => continue,
                Some(Ok(r)) => match &mut self.pending {
                    Some(p) if r.start <= p.end => p.end = p.end.max(r.end),
                    Some(_) => return self.pending.replace(r).map(Ok),
                    None => self.pending = Some(r),
                },
                Some(Err(e)) => return Some(Err(e)),
                None => return self.pending.take().map(Ok),
            }
        }
    }
}

/// Splits a stream of ranges into batches of at most `max` blocks, keeping their order.
pub fn batches(ranges: Ranges<'_>, max: u64) -> impl Iterator<Item = Result<Range<u64>>> + '_ {
    let mut current: Option<Range<u64>> = None;
    let mut ranges = ranges;
    std::iter::from_fn(move || {
        loop {
            if let Some(r) = &mut current
                && r.start < r.end
            {
                let e = (r.start + max).min(r.end);
                let b = r.start..e;
                r.start = e;
                return Some(Ok(b));
            }
            match ranges.next()? {
                Ok(r) => current = Some(r),
                Err(e) => return Some(Err(e)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(v: Vec<Range<u64>>) -> Ranges<'static> {
        Box::new(v.into_iter().map(Ok))
    }

    #[test]
    fn batches_cover_ranges_exactly() {
        let b: Vec<_> = batches(stream(vec![0..5, 10..11, 20..150]), 64)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(b, vec![0..5, 10..11, 20..84, 84..148, 148..150]);
    }

    #[test]
    fn touching_ranges_merge() {
        let c: Vec<_> = Coalesce::new(vec![0..2, 1..3, 3..4, 6..7, 7..7].into_iter().map(Ok))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(c, vec![0..4, 6..7]);
    }

    #[test]
    fn listed_byte_ranges_become_whole_blocks_and_must_increase() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        crate::volume::VolumeWriter::create_image(&p, 1 << 20).unwrap();
        let v = Volume::open(&p).unwrap();
        let l = Listed {
            name: "csi-delta",
            unlisted: Unlisted::Unchanged,
            extents: vec![
                4096..8192,
                65536..65537,
                70000..80000,
                (1 << 20) - 1..(1 << 20) + 5,
            ],
        };
        let c = l.candidates("v", &v, 64 << 10, true).unwrap();
        let r: Vec<_> = c.ranges.collect::<Result<_>>().unwrap();
        assert_eq!(r, vec![0..2, 15..16]);
        assert!(
            l.candidates("v", &v, 64 << 10, false).is_err(),
            "a delta needs a base"
        );
        let bad = Listed {
            extents: vec![8192..9000, 4096..5000],
            ..l
        };
        assert!(bad.candidates("v", &v, 4096, true).is_err());
    }

    #[test]
    fn hash_diff_names_the_data_of_a_sparse_image_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        let w = crate::volume::VolumeWriter::create_image(&p, 1 << 40).unwrap();
        w.write_at(&[1u8; 4096], 5 << 30).unwrap();
        w.write_at(&[2u8; 100], (1 << 40) - 100).unwrap();
        w.sync().unwrap();
        let v = Volume::open(&p).unwrap();
        let c = HashDiff.candidates("v", &v, 64 << 10, false).unwrap();
        assert_eq!(c.unlisted, Unlisted::Holes);
        let r: Vec<_> = c.ranges.collect::<Result<_>>().unwrap();
        let blocks: u64 = r.iter().map(|r| r.end - r.start).sum();
        assert!(blocks <= 64, "a 1 TiB image with two writes: {r:?}");
        assert!(r.iter().any(|r| r.contains(&((5 << 30) / (64 << 10)))));
        assert_eq!(r.last().unwrap().end, (1 << 40) / (64 << 10));
    }
}
