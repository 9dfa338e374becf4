//! Restore: stream a point's blocks into an image file or a device, verifying every chunk hash,
//! the volume digest the source recorded at the cut, and (optionally) the written bytes read back.
//! The work follows the point's sparse block map: batches of data blocks run on the shared
//! worker pool ([`crate::pool`], two workers per core: one's reads from the packs overlap
//! another's decoding), each decoding into its own buffer and writing each run of adjacent
//! blocks with one call; holes are written only where they must be (a device or a reused
//! file). Chunk locations come from one catalog read.

use super::Store;
use super::pack::Location;
use crate::block_map::BlockMap;
use crate::hash::{ChunkHash, VolumeDigest, block_len, is_zero};
use crate::volume::{Volume, VolumeWriter};
use anyhow::{Context, Result};
use std::ops::Range;

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

/// One piece of a restore's work.
enum Job {
    /// Decode and write these data entries of the map (indices into `map.data()`).
    Data(Range<usize>),
    /// Write zeros over these bytes (holes on a device or a reused file).
    Zeros(Range<u64>),
}

/// Splits a map's data entries into batches spanning at most [`BATCH`] blocks, and, when holes must
/// be written, the holes between them into zero ranges of at most [`BATCH`] blocks: the work
/// follows the data (and the holes only where they must be written), never the capacity.
fn jobs(map: &BlockMap, size: u64, bs: u32, zeros: bool) -> Vec<Job> {
    let bs = bs as u64;
    let mut out = Vec::new();
    let data = map.data();
    let mut hole_from = 0u64; // first byte not yet covered
    let zero_until = |out: &mut Vec<Job>, from: u64, to: u64| {
        let mut at = from;
        while zeros && at < to {
            let end = (at + BATCH * bs).min(to);
            out.push(Job::Zeros(at..end));
            at = end;
        }
    };
    let mut i = 0;
    while i < data.len() {
        // A batch spans at most BATCH blocks, so its buffer stays small however sparse the map.
        let mut end = i + 1;
        while end < data.len() && data[end].0 < data[i].0 + BATCH {
            end += 1;
        }
        zero_until(&mut out, hole_from, data[i].0 * bs);
        // Holes inside the batch are zeroed by the batch itself (it fills its buffer).
        out.push(Job::Data(i..end));
        hole_from = ((data[end - 1].0 + 1) * bs).min(size);
        i = end;
    }
    zero_until(&mut out, hole_from, size);
    out
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
        let hashes: Vec<ChunkHash> = map.data().iter().map(|(_, h)| *h).collect();
        let locations = self.locate_all(&hashes)?;
        let job = BatchJob {
            volume,
            map: &map,
            locations: &locations,
            size: meta.size,
            bs,
            out,
            zeros: out.holes_need_zeros(opts.fresh_image),
        };
        let (mut written, mut done) = (0u64, 0u64);
        crate::pool::ordered(
            jobs(&map, meta.size, bs, job.zeros).into_iter().map(Ok),
            crate::pool::default_workers(),
            crate::pool::default_workers() * 2,
            || (Vec::new(), Vec::new()),
            |(buf, frame), j| self.restore_job(&job, j, buf, frame),
            |(data, covered)| {
                written += data;
                done += covered;
                (opts.progress)(done.min(meta.size));
                Ok(())
            },
        )?;
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
            bytes_written: written,
            ok,
            error: (!ok).then(|| "restored bytes do not match the source digest".to_string()),
            expected_digest: meta.digest,
            actual_digest: actual,
        })
    }

    /// Runs one job; returns (data bytes written, bytes covered).
    fn restore_job(
        &self,
        job: &BatchJob,
        j: Job,
        buf: &mut Vec<u8>,
        frame: &mut Vec<u8>,
    ) -> Result<(u64, u64)> {
        match j {
            Job::Zeros(r) => {
                // BLKZEROOUT on a device, a punched hole in a file: a thin volume stays thin.
                job.out.zero_range(r.start, r.end - r.start)?;
                Ok((0, r.end - r.start))
            }
            Job::Data(r) => {
                let (data, covered, start) = self.restore_batch(job, r, buf, frame)?;
                job.out.start_writeback(start, covered);
                Ok((data, covered))
            }
        }
    }

    /// Decodes a batch of data entries into `buf`, laid out as their blocks lie on the volume
    /// (with zeros between them when holes must be written), and writes each run with one call.
    /// Returns (data bytes written, bytes covered, first byte).
    fn restore_batch(
        &self,
        job: &BatchJob,
        entries: Range<usize>,
        buf: &mut Vec<u8>,
        frame: &mut Vec<u8>,
    ) -> Result<(u64, u64, u64)> {
        let bs = job.bs as u64;
        let data = &job.map.data()[entries.clone()];
        let first = data[0].0;
        let last = data[data.len() - 1].0;
        let start = first * bs;
        let end = ((last + 1) * bs).min(job.size);
        if job.zeros {
            buf.clear(); // the gaps between blocks are written: they must be zeros
        }
        buf.resize((end - start) as usize, 0);
        let mut written = 0;
        // The run of adjacent blocks decoded into `buf` and not yet written: [run, pos).
        let (mut run, mut pos) = (0usize, 0usize);
        for (k, (index, hash)) in data.iter().enumerate() {
            let at = (index * bs - start) as usize;
            if at != pos && !job.zeros {
                job.write(&buf[run..pos], start + run as u64)?;
                run = at;
            }
            let len = block_len(job.size, job.bs, *index) as usize;
            let offset = start + at as u64;
            let loc = job.locations[entries.start + k].with_context(|| {
                format!(
                    "volume {}, block at byte {offset}: chunk {hash} is not in the store: run `target-agent verify`",
                    job.volume
                )
            })?;
            self.read_chunk_into(hash, loc, frame, &mut buf[at..at + len])
                .with_context(|| format!("volume {}, block at byte {offset}", job.volume))?;
            written += len as u64;
            pos = at + len;
        }
        job.write(&buf[run..pos], start + run as u64)?;
        Ok((written, end - start, start))
    }
}

/// What every batch of one volume's restore shares.
struct BatchJob<'a> {
    volume: &'a str,
    map: &'a BlockMap,
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

/// Hashes what a volume actually holds, in block order on all cores, into its digest: only its
/// data is read (SEEK_DATA on an image; a device is read whole), and all-zero blocks are holes,
/// as the scan takes them.
pub fn read_back_digest(v: &Volume, size: u64, bs: u32) -> Result<String> {
    use crate::change::ChangeSource;
    let ranges = crate::change::HashDiff
        .candidates("read-back", v, bs, false)?
        .ranges;
    digest_of_blocks(v, size, bs, ranges)
}

/// The digest of a volume whose data can only be in `ranges` (block indices, increasing; every
/// other block reads as zeros): the blocks in them are read and hashed on all cores, all-zero
/// ones taken as holes.
pub fn digest_of_blocks(
    v: &Volume,
    size: u64,
    bs: u32,
    ranges: crate::change::Ranges<'_>,
) -> Result<String> {
    let mut digest = VolumeDigest::new(size, bs);
    crate::pool::ordered(
        crate::change::batches(ranges, BATCH),
        crate::pool::default_workers(),
        crate::pool::default_workers() * 2,
        || vec![0u8; bs as usize],
        |buf, range| {
            range
                .filter_map(|i| {
                    let n = block_len(size, bs, i) as usize;
                    match v.read_at(&mut buf[..n], i * bs as u64) {
                        Ok(_) if is_zero(&buf[..n]) => None,
                        Ok(_) => Some(Ok((i, ChunkHash::of(&buf[..n])))),
                        Err(e) => Some(Err(e)),
                    }
                })
                .collect::<Result<Vec<_>>>()
        },
        |blocks| {
            blocks.iter().for_each(|(i, h)| digest.push(*i, h));
            Ok(())
        },
    )?;
    Ok(digest.finish())
}
