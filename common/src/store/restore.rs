//! Restore: stream a point's blocks into an image file or a device, verifying every chunk hash,
//! the volume digest the source recorded at the cut, and (optionally) the written bytes read back.

use super::Store;
use crate::hash::{BlockRef, ChunkHash, VolumeDigest, block_len};
use crate::volume::VolumeWriter;
use anyhow::{Context, Result};

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
    pub progress: &'a dyn Fn(u64),
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
        let mut digest = VolumeDigest::new(meta.size, bs);
        let mut written = 0u64;
        for (i, b) in map.iter().enumerate() {
            let offset = i as u64 * bs as u64;
            let len = block_len(meta.size, bs, i as u64);
            match b {
                BlockRef::Hole => out.zero_range(offset, len, opts.fresh_image)?,
                BlockRef::Data(h) => {
                    let raw = self
                        .read_chunk(h)
                        .with_context(|| format!("volume {volume}, block at byte {offset}"))?;
                    anyhow::ensure!(
                        raw.len() == len as usize,
                        "volume {volume}: block at byte {offset} should be {len} bytes, chunk {h} holds {}",
                        raw.len()
                    );
                    out.write_at(&raw, offset)?;
                    written += len as u64;
                }
            }
            digest.push(*b);
            if i % 64 == 0 {
                (opts.progress)(offset);
            }
        }
        out.sync()?;
        let actual = if opts.read_back {
            read_back_digest(out, meta.size, bs, opts.progress)?
        } else {
            digest.finish()
        };
        (opts.progress)(meta.size);
        Ok(VolumeRestore {
            volume: volume.to_string(),
            path: path.to_string(),
            size: meta.size,
            bytes_written: written,
            ok: actual == meta.digest,
            error: (actual != meta.digest)
                .then(|| "restored bytes do not match the source digest".to_string()),
            expected_digest: meta.digest,
            actual_digest: actual,
        })
    }
}

/// Hashes what the output actually holds, block by block.
fn read_back_digest(
    out: &VolumeWriter,
    size: u64,
    bs: u32,
    progress: &dyn Fn(u64),
) -> Result<String> {
    let v = out.reopen()?;
    let mut digest = VolumeDigest::new(size, bs);
    let mut buf = vec![0u8; bs as usize];
    let mut offset = 0;
    while offset < size {
        let n = v.read_at(&mut buf, offset)?;
        digest.push(BlockRef::Data(ChunkHash::of(&buf[..n])));
        offset += bs as u64;
        if (offset / bs as u64).is_multiple_of(64) {
            progress(offset.min(size));
        }
    }
    Ok(digest.finish())
}
