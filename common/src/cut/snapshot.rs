//! A cut of a volume that does not change while it is read (a snapshot a mover reads): nothing
//! is spooled. The scan hands each new frame straight to the push, through a bounded channel
//! (so the scan waits for the link instead of filling a disk), and remembers only which block
//! each chunk came from; a chunk the target asks for later is read from the volume and framed
//! again, and must still hash to its address.

use super::spool::{FrameSink, FrameSource};
use crate::chunk;
use crate::hash::{ChunkHash, block_len};
use crate::volume::Volume;
use anyhow::{Result, bail};
use std::collections::HashMap;

/// Frames handed to the push as the scan makes them.
pub type FrameFeed = tokio::sync::mpsc::Sender<Vec<u8>>;

/// The scan's sink for an unchanging volume: pushes new frames (when a feed is given) and keeps
/// where each chunk's block is.
pub struct DirectSink {
    at: HashMap<ChunkHash, u64>,
    feed: Option<FrameFeed>,
}

impl DirectSink {
    /// A sink pushing to `feed` (none: the target takes no push; frames are made on request).
    pub fn new(feed: Option<FrameFeed>) -> Self {
        DirectSink {
            at: HashMap::new(),
            feed,
        }
    }

    /// Ends the feed; returns where each chunk's block is.
    pub fn finish(self) -> HashMap<ChunkHash, u64> {
        self.at
    }
}

impl FrameSink for DirectSink {
    /// Called from the scan's blocking thread: waits while the push is behind.
    fn put(&mut self, index: u64, hash: ChunkHash, frame: Vec<u8>) -> Result<()> {
        if self.at.insert(hash, index).is_some() {
            return Ok(());
        }
        if let Some(feed) = &self.feed
            && feed.blocking_send(frame).is_err()
        {
            // The push ended (its error is reported by the push task); the target asks for
            // what it lacks after the offer.
            self.feed = None;
        }
        Ok(())
    }
}

/// Frames read again from the unchanging volume, by the block each chunk came from.
pub struct Reread {
    vol: Volume,
    at: HashMap<ChunkHash, u64>,
    block_size: u32,
    zstd_level: i32,
}

impl Reread {
    /// Frames of `vol`'s chunks at the blocks `at` names.
    pub fn new(vol: Volume, at: HashMap<ChunkHash, u64>, block_size: u32, zstd_level: i32) -> Self {
        Reread {
            vol,
            at,
            block_size,
            zstd_level,
        }
    }
}

impl FrameSource for Reread {
    fn len_of(&self, h: &ChunkHash) -> Option<u64> {
        let i = self.at.get(h)?;
        Some(block_len(self.vol.size(), self.block_size, *i) as u64)
    }

    fn frame_into(&self, h: &ChunkHash, buf: &mut Vec<u8>) -> Result<()> {
        let Some(&index) = self.at.get(h) else {
            bail!("chunk {h} is not in this cut");
        };
        let len = block_len(self.vol.size(), self.block_size, index) as usize;
        let mut raw = vec![0u8; len];
        let offset = index * self.block_size as u64;
        let n = self.vol.read_at(&mut raw, offset)?;
        if n < len {
            bail!(
                "volume {} ended at {} while block {index} was read again: it must not change while a cut of it is sent",
                self.vol.path().display(),
                offset + n as u64
            );
        }
        if ChunkHash::of(&raw) != *h {
            bail!(
                "block {index} of {} changed after it was scanned: a mover reads a snapshot, which must not change (is the restored PVC written by something else?)",
                self.vol.path().display()
            );
        }
        *buf = chunk::encode_with_hash(&raw, *h, self.zstd_level);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_framed_again_from_its_block_and_a_changed_block_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let bs = 4096u32;
        let mut data = vec![0u8; 3 * bs as usize];
        data[bs as usize..2 * bs as usize].fill(7);
        std::fs::write(&path, &data).unwrap();
        let block = &data[bs as usize..2 * bs as usize];
        let h = ChunkHash::of(block);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut sink = DirectSink::new(Some(tx));
        let frame = chunk::encode_with_hash(block, h, 1);
        sink.put(1, h, frame.clone()).unwrap();
        sink.put(1, h, frame.clone()).unwrap();
        let at = sink.finish();
        assert_eq!(rx.try_recv().unwrap(), frame, "pushed once");
        assert!(rx.try_recv().is_err(), "each hash once");
        let frames = Reread::new(Volume::open(&path).unwrap(), at.clone(), bs, 1);
        let mut buf = Vec::new();
        frames.frame_into(&h, &mut buf).unwrap();
        assert_eq!(buf, frame);
        assert_eq!(frames.len_of(&h), Some(bs as u64));
        data[bs as usize] = 8;
        std::fs::write(&path, &data).unwrap();
        let frames = Reread::new(Volume::open(&path).unwrap(), at, bs, 1);
        let e = frames.frame_into(&h, &mut buf).unwrap_err();
        assert!(
            format!("{e:#}").contains("changed after it was scanned"),
            "{e:#}"
        );
    }
}
