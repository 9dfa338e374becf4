//! The scan: read a volume's candidate blocks in parallel, hash them, compare with the base, frame
//! the changed ones (compressed) into the spool.

use super::spool::SpoolWriter;
use crate::change::{ChangeSource, VolumeBase, batches};
use crate::chunk;
use crate::hash::{BlockRef, ChunkHash, VolumeDigest, block_count, block_len, is_zero};
use crate::volume::Volume;
use anyhow::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// Blocks per read batch (4 MiB at 64 KiB blocks).
const BATCH_BLOCKS: u64 = 64;

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
    /// The volume's full block map at the cut.
    pub map: Vec<BlockRef>,
    /// Entries that differ from the base (all data blocks when there is no base).
    pub entries: Vec<(u64, BlockRef)>,
    /// Volume digest at the cut.
    pub digest: String,
    /// Bytes read from the volume.
    pub bytes_read: u64,
}

struct Block {
    index: u64,
    block: BlockRef,
    frame: Option<Vec<u8>>,
}

/// Scans one volume. `progress` is called with bytes covered so far.
pub fn scan_volume(
    name: &str,
    vol: &Volume,
    base: Option<&VolumeBase>,
    change: &dyn ChangeSource,
    s: ScanSettings,
    spool: &mut SpoolWriter,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<VolumeScan> {
    let size = vol.size();
    let blocks = block_count(size, s.block_size);
    let base = base.filter(|b| b.name == name);
    let mut map: Vec<BlockRef> = match base {
        Some(b) => (0..blocks)
            .map(|i| b.blocks.get(i as usize).copied().unwrap_or(BlockRef::Hole))
            .collect(),
        None => vec![BlockRef::Hole; blocks as usize],
    };
    let work = batches(
        &change.candidates(name, size, s.block_size, base)?,
        BATCH_BLOCKS,
    );
    let next = AtomicUsize::new(0);
    let read = std::sync::atomic::AtomicU64::new(0);
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<Block>>>(s.workers * 2);
    let mut entries = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..s.workers.max(1) {
            let tx = tx.clone();
            let (work, next, read) = (&work, &next, &read);
            scope.spawn(move || {
                let mut buf = vec![0u8; (BATCH_BLOCKS * s.block_size as u64) as usize];
                while let Some(range) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let r = scan_batch(vol, range.clone(), base, s, &mut buf, read);
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut covered = 0u64;
        for batch in rx {
            for b in batch? {
                map[b.index as usize] = b.block;
                if let (Some(frame), BlockRef::Data(h)) = (b.frame, b.block) {
                    spool.add(h, frame)?;
                }
                entries.push((b.index, b.block));
                covered += 1;
            }
            progress((covered * s.block_size as u64).min(size));
        }
        Ok(())
    })?;
    entries.sort_unstable_by_key(|(i, _)| *i);
    if base.is_none() {
        entries.retain(|(_, b)| *b != BlockRef::Hole);
    }
    let digest = VolumeDigest::of_map(size, s.block_size, &map);
    Ok(VolumeScan {
        map,
        entries,
        digest,
        bytes_read: read.into_inner(),
    })
}

/// Reads the data extents of the batch starting at `start` into `buf` and zeroes the holes
/// between them: only data is read from the volume.
fn read_extents(
    vol: &Volume,
    start: u64,
    extents: &[std::ops::Range<u64>],
    buf: &mut [u8],
    read: &std::sync::atomic::AtomicU64,
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

/// Reads, hashes and frames one batch; returns only blocks that differ from the base.
fn scan_batch(
    vol: &Volume,
    range: std::ops::Range<u64>,
    base: Option<&VolumeBase>,
    s: ScanSettings,
    buf: &mut [u8],
    read: &std::sync::atomic::AtomicU64,
) -> Result<Vec<Block>> {
    let bs = s.block_size as u64;
    let size = vol.size();
    let start = range.start * bs;
    let len = ((range.end - range.start) * bs).min(size - start);
    let buf = &mut buf[..len as usize];
    let extents = vol.data_extents(start, len);
    read_extents(vol, start, &extents, buf, read)?;
    let mut out = Vec::new();
    for index in range {
        let off = ((index * bs) - start) as usize;
        let bl = block_len(size, s.block_size, index) as usize;
        let data = &buf[off..off + bl];
        let block_start = start + off as u64;
        let in_hole = !extents
            .iter()
            .any(|e| e.start < block_start + bl as u64 && block_start < e.end);
        let block = if in_hole || is_zero(data) {
            BlockRef::Hole
        } else {
            BlockRef::Data(ChunkHash::of(data))
        };
        let old = base.and_then(|b| b.blocks.get(index as usize)).copied();
        if base.is_some() && old == Some(block) {
            continue;
        }
        let frame = match block {
            BlockRef::Data(h) => Some(chunk::encode_with_hash(data, h, s.zstd_level)),
            BlockRef::Hole => None,
        };
        out.push(Block {
            index,
            block,
            frame,
        });
    }
    Ok(out)
}
