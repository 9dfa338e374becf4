//! Restore: stream a point's blocks into an image file or a device, verifying every chunk hash,
//! the volume digest the source recorded at the cut, and (optionally) the written bytes read back.
//! Blocks are processed in batches by two workers per core (one's reads from the packs overlap
//! another's decoding), each decoding into its own batch buffer and writing each run of adjacent
//! blocks with one call; chunk locations come from one catalog read.

use super::Store;
use super::pack::Location;
use crate::hash::{BlockRef, ChunkHash, VolumeDigest, block_len};
use crate::volume::{Volume, VolumeWriter};
use anyhow::{Context, Result};
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Blocks per work batch.
const BATCH: u64 = 64;

/// Outcome of restoring one volume.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VolumeRestore {
    /// Volume name.
    pub volume: String,
    /// Where it was written.
    pub path: String,
    /// Volume size.
    pub size: u64,
    /// Bytes of data written (holes not counted).
    pub bytes_written: u64,
    /// Digest the source recorded at the cut.
    pub expected_digest: String,
    /// Digest of what was written (read back from the output when read-back is on).
    pub actual_digest: String,
    /// True when the two digests match.
    pub ok: bool,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Options for [`Store::restore_volume`].
pub struct RestoreOptions<'a> {
    /// Re-read the output after writing and hash what is actually there.
    pub read_back: bool,
    /// True when the output is a freshly created sparse image (holes need no writes).
    pub fresh_image: bool,
    /// Called with bytes processed so far.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

/// Runs `work` over every batch of `blocks` on two workers per core and returns the batches'
/// results in block order; the first error stops the rest.
fn parallel_batches<T: Send>(
    blocks: u64,
    work: impl Fn(Range<u64>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(u64, T)>> = Mutex::new(Vec::new());
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let start = next.fetch_add(1, Ordering::Relaxed) as u64 * BATCH;
                    if start >= blocks || failed.lock().expect("lock").is_some() {
                        return;
                    }
                    match work(start..(start + BATCH).min(blocks)) {
                        Ok(t) => results.lock().expect("lock").push((start, t)),
                        Err(e) => {
                            failed.lock().expect("lock").get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("lock") {
        return Err(e);
    }
    let mut r = results.into_inner().expect("lock");
    r.sort_unstable_by_key(|(start, _)| *start);
    Ok(r.into_iter().map(|(_, t)| t).collect())
}

impl Store {
    /// Rebuilds `volume` of point `seq` of `group` into `out`.
    pub fn restore_volume(
        &self,
        group: &str,
        seq: u64,
        volume: &str,
        out: &VolumeWriter,
        path: &str,
        opts: &RestoreOptions,
    ) -> Result<VolumeRestore> {
        let point = self
            .point(group, seq)?
            .with_context(|| format!("group {group} has no point {seq}"))?;
        let meta = point
            .cut
            .volume(volume)
            .with_context(|| format!("point {seq} has no volume {volume}"))?
            .clone();
        let bs = point.cut.block_size;
        let map = self.block_map(group, seq, volume)?;
        let locations = self.locations_of(&map)?;
        let written = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let job = BatchJob {
            volume,
            map: &map,
            locations: &locations,
            size: meta.size,
            bs,
            out,
            zeros: out.holes_need_zeros(opts.fresh_image),
        };
        parallel_batches(map.len() as u64, |range| {
            let start = range.start * bs as u64;
            written.fetch_add(self.restore_batch(&job, range)?, Ordering::Relaxed);
            out.start_writeback(start, (BATCH * bs as u64).min(meta.size - start));
            (opts.progress)(
                done.fetch_add(BATCH * bs as u64, Ordering::Relaxed)
                    .min(meta.size),
            );
            Ok(())
        })?;
        out.sync()?;
        let actual = if opts.read_back {
            read_back_digest(&out.reopen()?, meta.size, bs)?
        } else {
            VolumeDigest::of_map(meta.size, bs, &map)
        };
        (opts.progress)(meta.size);
        let ok = actual == meta.digest;
        Ok(VolumeRestore {
            volume: volume.to_string(),
            path: path.to_string(),
            size: meta.size,
            bytes_written: written.into_inner(),
            ok,
            error: (!ok).then(|| "restored bytes do not match the source digest".to_string()),
            expected_digest: meta.digest,
            actual_digest: actual,
        })
    }

    /// Decodes one batch of blocks into this worker's buffer and writes each run of adjacent
    /// blocks with one call; returns the data bytes written.
    fn restore_batch(&self, job: &BatchJob, range: Range<u64>) -> Result<u64> {
        BUFFERS.with(|b| {
            let (buf, frame) = &mut *b.borrow_mut();
            let bs = job.bs as u64;
            let start = range.start * bs;
            buf.resize(((range.end - range.start) * bs).min(job.size - start) as usize, 0);
            let mut written = 0;
            // The run of blocks decoded into `buf` and not yet written: [run, pos).
            let mut run = 0usize;
            for i in range {
                let pos = (i * bs - start) as usize;
                let len = block_len(job.size, job.bs, i) as usize;
                let block = &mut buf[pos..pos + len];
                match (job.map[i as usize], job.locations[i as usize]) {
                    (BlockRef::Hole, _) if job.zeros => block.fill(0),
                    (BlockRef::Hole, _) => {
                        job.write(&buf[run..pos], start + run as u64)?;
                        run = pos + len;
                    }
                    (BlockRef::Data(h), Some(loc)) => {
                        let offset = start + pos as u64;
                        self.read_chunk_into(&h, loc, frame, block).with_context(|| {
                            format!("volume {}, block at byte {offset}", job.volume)
                        })?;
                        written += len as u64;
                    }
                    (BlockRef::Data(h), None) => anyhow::bail!(
                        "volume {}, block at byte {}: chunk {h} is not in the store: run `target-agent verify`",
                        job.volume,
                        start + pos as u64
                    ),
                }
            }
            job.write(&buf[run..], start + run as u64)?;
            Ok(written)
        })
    }

    /// Location of every data block of a map (`None` for holes and missing chunks).
    fn locations_of(&self, map: &[BlockRef]) -> Result<Vec<Option<Location>>> {
        let hashes: Vec<ChunkHash> = map
            .iter()
            .map(|b| match b {
                BlockRef::Data(h) => *h,
                BlockRef::Hole => ChunkHash([0; 32]),
            })
            .collect();
        let mut locs = self.locate_all(&hashes)?;
        for (l, b) in locs.iter_mut().zip(map) {
            if *b == BlockRef::Hole {
                *l = None;
            }
        }
        Ok(locs)
    }
}

thread_local! {
    /// Each restore worker's batch buffer and frame buffer, kept from one batch to the next.
    static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// What every batch of one volume's restore shares.
struct BatchJob<'a> {
    volume: &'a str,
    map: &'a [BlockRef],
    locations: &'a [Option<Location>],
    size: u64,
    bs: u32,
    out: &'a VolumeWriter,
    /// Holes are written as zeros (a device or a reused file).
    zeros: bool,
}

impl BatchJob<'_> {
    /// Writes a run of decoded blocks at `offset`; an empty run writes nothing.
    fn write(&self, run: &[u8], offset: u64) -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        self.out.write_at(run, offset)
    }
}

/// Hashes what a volume actually holds, block by block, on all cores; holes of a sparse image are
/// not read.
fn read_back_digest(v: &Volume, size: u64, bs: u32) -> Result<String> {
    let batches = parallel_batches(crate::hash::block_count(size, bs), |range| {
        let start = range.start * bs as u64;
        let has_data = !v
            .data_extents(
                start,
                ((range.end - range.start) * bs as u64).min(size - start),
            )
            .is_empty();
        let mut buf = vec![0u8; bs as usize];
        range
            .map(|i| {
                if !has_data {
                    return Ok(BlockRef::Hole);
                }
                let n = block_len(size, bs, i) as usize;
                v.read_at(&mut buf[..n], i * bs as u64)?;
                Ok(BlockRef::Data(ChunkHash::of(&buf[..n])))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut digest = VolumeDigest::new(size, bs);
    batches.into_iter().flatten().for_each(|b| digest.push(b));
    Ok(digest.finish())
}
