//! The scan: read a volume's candidate blocks in parallel, hash them, merge them with the base as
//! a stream, and frame the changed ones (compressed) into the spool.
//!
//! The planner walks the change source's ranges and the base's map (both in block order) once:
//! each job is a batch of candidate blocks with the base entries inside it (so a worker frames
//! only the blocks that changed), or a run of base entries outside every candidate range
//! (holes now, or unchanged, as the change source says). Workers hash and frame; one consumer
//! takes their results in block order, feeds the volume digest, collects the changes and writes
//! the spool. Memory is a constant (the pool's window of batches) plus the changes; a hole costs
//! nothing, an unchanged block one comparison.

use super::spool::FrameSink;
use crate::block_map::BlockChange;
use crate::change::{Candidates, ChangeSource, Unlisted, batches};
use crate::chunk;
use crate::error::Interrupted;
use crate::hash::{BlockRef, ChunkHash, VolumeDigest, block_count, block_len, is_zero};
use crate::volume::Volume;
use anyhow::Result;
use std::iter::Peekable;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Blocks per read batch (4 MiB at 64 KiB blocks).
const BATCH_BLOCKS: u64 = 64;
/// Base entries per pass-through job (entries outside every candidate range).
const UNLISTED_PER_JOB: usize = 4096;

/// Settings of a scan.
#[derive(Clone, Copy, Debug)]
pub struct ScanSettings {
    /// Block size.
    pub block_size: u32,
    /// zstd level for changed blocks.
    pub zstd_level: i32,
    /// Reader/hasher threads.
    pub workers: usize,
}

/// What the scan found in one volume.
#[derive(Debug)]
pub struct VolumeScan {
    /// Blocks that differ from the base, in block order (with no base: every data block).
    pub changes: Vec<BlockChange>,
    /// Volume digest at the cut.
    pub digest: String,
    /// Bytes read from the volume.
    pub bytes_read: u64,
    /// The change source's name.
    pub change_source: &'static str,
}

/// The base map of the volume being scanned: its data blocks in order, as a stream.
pub type BaseStream<'a> = &'a mut (dyn Iterator<Item = Result<(u64, ChunkHash)>> + Send);

/// What the scan asks of, and tells, its caller while it runs.
pub struct ScanObserver<'a> {
    /// True once the scan should stop: it ends with [`Interrupted`] at the next batch.
    pub stop: &'a (dyn Fn() -> bool + Sync),
    /// Called with the bytes covered so far.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

enum Job {
    /// Read and hash these blocks; `base` holds the base's entries among them.
    Scan {
        range: Range<u64>,
        base: Vec<(u64, ChunkHash)>,
    },
    /// Base entries no candidate range covers.
    Unlisted(Vec<(u64, ChunkHash)>),
}

enum Done {
    Scanned {
        /// Every data block of the batch, for the digest.
        data: Vec<(u64, ChunkHash)>,
        /// Blocks that differ from the base, with the frame of each changed data block.
        changed: Vec<(u64, BlockRef, Option<Vec<u8>>)>,
        /// Bytes the batch covered.
        covered: u64,
    },
    Unlisted(Vec<(u64, ChunkHash)>),
}

/// Scans one volume against its base (`None`: no base, every data block is new).
pub fn scan_volume(
    name: &str,
    vol: &Volume,
    base: Option<BaseStream<'_>>,
    change: &dyn ChangeSource,
    s: ScanSettings,
    spool: &mut dyn FrameSink,
    obs: ScanObserver<'_>,
) -> Result<VolumeScan> {
    let size = vol.size();
    let blocks = block_count(size, s.block_size);
    let has_base = base.is_some();
    let Candidates { unlisted, ranges } = change.candidates(name, vol, s.block_size, has_base)?;
    anyhow::ensure!(
        has_base || unlisted == Unlisted::Holes,
        "change source {} names only changed blocks, but volume {name} has no base to compare with",
        change.name()
    );
    let mut empty = std::iter::empty();
    let base: &mut (dyn Iterator<Item = Result<(u64, ChunkHash)>> + Send) = match base {
        Some(b) => b,
        None => &mut empty,
    };
    let planner = Planner {
        batches: batches(ranges, BATCH_BLOCKS),
        base: base.peekable(),
        blocks,
        range: None,
        ended: false,
    };
    let read = AtomicU64::new(0);
    let mut merge = Merge {
        digest: VolumeDigest::new(size, s.block_size),
        changes: Vec::new(),
        unlisted,
        covered: 0,
    };
    let batch_bytes = (BATCH_BLOCKS * s.block_size as u64) as usize;
    crate::pool::ordered(
        planner,
        s.workers.max(1),
        s.workers.max(1) * 2,
        || vec![0u8; batch_bytes],
        |buf, job| {
            crate::failpoint::hit("source.cut.scanning");
            if (obs.stop)() {
                return Err(Interrupted.into());
            }
            match job {
                Job::Scan { range, base } => scan_batch(vol, range, &base, s, buf, &read),
                Job::Unlisted(entries) => Ok(Done::Unlisted(entries)),
            }
        },
        |done| {
            merge.take(done, spool)?;
            (obs.progress)(merge.covered.min(size));
            Ok(())
        },
    )?;
    Ok(VolumeScan {
        changes: merge.changes,
        digest: merge.digest.finish(),
        bytes_read: read.into_inner(),
        change_source: change.name(),
    })
}

/// Walks the candidate batches and the base map together (see the module docs).
struct Planner<'a, B: Iterator<Item = Result<Range<u64>>>> {
    batches: B,
    base: Peekable<&'a mut (dyn Iterator<Item = Result<(u64, ChunkHash)>> + Send)>,
    blocks: u64,
    range: Option<Range<u64>>,
    ended: bool,
}

impl<B: Iterator<Item = Result<Range<u64>>>> Planner<'_, B> {
    /// Base entries below `end` (at most `max`), dropping those past the volume's end.
    fn base_below(&mut self, end: u64, max: usize) -> Result<Vec<(u64, ChunkHash)>> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.base.peek() {
                Some(Ok((i, _))) if *i < end => {}
                Some(Err(_)) => return Err(self.base.next().expect("peeked").unwrap_err()),
                _ => break,
            }
            let (i, h) = self.base.next().expect("peeked")?;
            if i < self.blocks {
                out.push((i, h));
            }
        }
        Ok(out)
    }
}

impl<B: Iterator<Item = Result<Range<u64>>>> Iterator for Planner<'_, B> {
    type Item = Result<Job>;
    fn next(&mut self) -> Option<Result<Job>> {
        if self.ended {
            return None;
        }
        let r = (|| {
            if self.range.is_none() {
                self.range = self.batches.next().transpose()?;
            }
            let start = self.range.as_ref().map_or(u64::MAX, |r| r.start);
            let before = self.base_below(start, UNLISTED_PER_JOB)?;
            if !before.is_empty() {
                return Ok(Some(Job::Unlisted(before)));
            }
            let Some(range) = self.range.take() else {
                return Ok(None);
            };
            if range.end > self.blocks {
                anyhow::bail!(
                    "change source named blocks {range:?}, past the volume's end ({} blocks)",
                    self.blocks
                );
            }
            let base = self.base_below(range.end, usize::MAX)?;
            Ok(Some(Job::Scan { range, base }))
        })();
        match r {
            Ok(Some(job)) => Some(Ok(job)),
            Ok(None) => {
                self.ended = true;
                None
            }
            Err(e) => {
                self.ended = true;
                Some(Err(e))
            }
        }
    }
}

/// The consumer's side: the digest, the changes and the spool, fed in block order.
struct Merge {
    digest: VolumeDigest,
    changes: Vec<BlockChange>,
    unlisted: Unlisted,
    covered: u64,
}

impl Merge {
    fn take(&mut self, done: Done, spool: &mut dyn FrameSink) -> Result<()> {
        match done {
            Done::Scanned {
                data,
                changed,
                covered,
            } => {
                // Both lists are in block order; the digest takes data blocks, the changes
                // list every changed block (holes included).
                data.iter().for_each(|(i, h)| self.digest.push(*i, h));
                for (i, block, frame) in changed {
                    if let (Some(frame), BlockRef::Data(h)) = (frame, block) {
                        spool.put(i, h, frame)?;
                    }
                    self.changes.push((i, block));
                }
                self.covered += covered;
            }
            Done::Unlisted(entries) => match self.unlisted {
                Unlisted::Holes => self
                    .changes
                    .extend(entries.iter().map(|(i, _)| (*i, BlockRef::Hole))),
                Unlisted::Unchanged => entries.iter().for_each(|(i, h)| self.digest.push(*i, h)),
            },
        }
        Ok(())
    }
}

/// Reads the data extents of the batch starting at `start` into `buf` and zeroes the holes
/// between them: only data is read from the volume.
fn read_extents(
    vol: &Volume,
    start: u64,
    extents: &[Range<u64>],
    buf: &mut [u8],
    read: &AtomicU64,
) -> Result<()> {
    let mut pos = 0usize;
    for e in extents {
        let (a, b) = ((e.start - start) as usize, (e.end - start) as usize);
        buf[pos..a].fill(0);
        vol.read_at(&mut buf[a..b], e.start)?;
        read.fetch_add(e.end - e.start, Ordering::Relaxed);
        pos = b;
    }
    buf[pos..].fill(0);
    Ok(())
}

/// Reads and hashes one batch; frames the data blocks that differ from `base` (the base's
/// entries within the batch; with no base, every data block is new).
fn scan_batch(
    vol: &Volume,
    range: Range<u64>,
    base: &[(u64, ChunkHash)],
    s: ScanSettings,
    buf: &mut [u8],
    read: &AtomicU64,
) -> Result<Done> {
    let bs = s.block_size as u64;
    let size = vol.size();
    let start = range.start * bs;
    let len = ((range.end - range.start) * bs).min(size - start);
    let buf = &mut buf[..len as usize];
    let extents = vol.data_extents(start, len);
    read_extents(vol, start, &extents, buf, read)?;
    let (mut data, mut changed) = (Vec::new(), Vec::new());
    for index in range {
        let off = ((index * bs) - start) as usize;
        let bl = block_len(size, s.block_size, index) as usize;
        let bytes = &buf[off..off + bl];
        let block_start = start + off as u64;
        let in_hole = !extents
            .iter()
            .any(|e| e.start < block_start + bl as u64 && block_start < e.end);
        let block = if in_hole || is_zero(bytes) {
            BlockRef::Hole
        } else {
            BlockRef::Data(ChunkHash::of(bytes))
        };
        let old = match base.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(at) => BlockRef::Data(base[at].1),
            Err(_) => BlockRef::Hole,
        };
        if let BlockRef::Data(h) = block {
            data.push((index, h));
        }
        // With no base every old block is a hole: data is new, holes are not listed.
        if old == block {
            continue;
        }
        let frame = match block {
            BlockRef::Data(h) => Some(chunk::encode_with_hash(bytes, h, s.zstd_level)),
            BlockRef::Hole => None,
        };
        changed.push((index, block, frame));
    }
    Ok(Done::Scanned {
        data,
        changed,
        covered: len,
    })
}
