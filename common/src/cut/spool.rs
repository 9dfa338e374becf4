//! The spool: a cut's changed chunks, framed once while the group is frozen and sent from here
//! afterwards (and again after a restart), so a cut never depends on the live volume.

use crate::hash::ChunkHash;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Where a frame sits in the spool file: (offset, length).
pub type SpoolIndex = HashMap<ChunkHash, (u64, u32)>;

/// Where a spool announces frames once they are in the file: batches of (offset, length), in
/// order. The push of a cut being made reads them back from the file (the page cache) at the
/// link's pace, so the scan never waits for the network.
pub type Feed = tokio::sync::mpsc::UnboundedSender<Vec<(u64, u32)>>;

/// Where a scan puts the frames of the blocks it found changed: a spool file, or (for a volume
/// that does not change) straight to the push ([`super::snapshot`]).
pub trait FrameSink {
    /// Takes the frame of chunk `hash`, the data of block `index` (each hash once is enough).
    fn put(&mut self, index: u64, hash: ChunkHash, frame: Vec<u8>) -> Result<()>;
}

/// Where the frames a session is asked for are read from.
pub trait FrameSource: Send + Sync {
    /// Frame length of a chunk (an estimate where frames are made on demand), if held.
    fn len_of(&self, h: &ChunkHash) -> Option<u64>;
    /// The frame of a chunk, into `buf` (a buffer the caller keeps between chunks).
    fn frame_into(&self, h: &ChunkHash, buf: &mut Vec<u8>) -> Result<()>;
}

impl FrameSink for SpoolWriter {
    fn put(&mut self, _index: u64, hash: ChunkHash, frame: Vec<u8>) -> Result<()> {
        self.add(hash, frame)
    }
}

impl FrameSource for SpoolReader {
    fn len_of(&self, h: &ChunkHash) -> Option<u64> {
        SpoolReader::len_of(self, h)
    }
    fn frame_into(&self, h: &ChunkHash, buf: &mut Vec<u8>) -> Result<()> {
        SpoolReader::frame_into(self, h, buf)
    }
}

/// Appends frames to a spool file, each hash once.
pub struct SpoolWriter {
    out: BufWriter<File>,
    len: u64,
    index: SpoolIndex,
    bytes_added: u64,
    feed: Option<Feed>,
    unannounced: Vec<(u64, u32)>,
    flushed: u64,
}

/// Spool bytes between flushes: each flush announces its frames to the feed and starts their
/// write-behind, so the final fsync finds little to write.
const FLUSH_EVERY: u64 = 8 << 20;

impl SpoolWriter {
    /// Creates the spool file.
    pub fn create(path: &Path) -> Result<Self> {
        let f = crate::files::create_private(path).context("cannot create the cut's spool")?;
        Ok(SpoolWriter {
            out: BufWriter::with_capacity(4 << 20, f),
            len: 0,
            index: HashMap::new(),
            bytes_added: 0,
            feed: None,
            unannounced: Vec::new(),
            flushed: 0,
        })
    }

    /// From now on, also announces every new frame to `feed` once it is in the file (see
    /// [`Feed`]).
    pub fn set_feed(&mut self, feed: Option<Feed>) {
        self.feed = feed;
    }

    /// True when the spool already holds this chunk.
    pub fn contains(&self, h: &ChunkHash) -> bool {
        self.index.contains_key(h)
    }

    /// Adds a frame unless its hash is already there.
    pub fn add(&mut self, hash: ChunkHash, frame: Vec<u8>) -> Result<()> {
        if self.index.contains_key(&hash) {
            return Ok(());
        }
        self.out
            .write_all(&frame)
            .context("write to spool failed: is the source state disk full?")?;
        self.index.insert(hash, (self.len, frame.len() as u32));
        if self.feed.is_some() {
            self.unannounced.push((self.len, frame.len() as u32));
        }
        self.len += frame.len() as u64;
        self.bytes_added += frame.len() as u64;
        if self.len - self.flushed >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes out the buffer, starts its write-behind and announces its frames.
    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .context("write to spool failed: is the source state disk full?")?;
        crate::volume::start_writeback(self.out.get_ref(), self.flushed, self.len - self.flushed);
        self.flushed = self.len;
        if let Some(feed) = &self.feed
            && !self.unannounced.is_empty()
            && feed.send(std::mem::take(&mut self.unannounced)).is_err()
        {
            self.feed = None;
        }
        Ok(())
    }

    /// Bytes of frames written.
    pub fn bytes(&self) -> u64 {
        self.bytes_added
    }

    /// Flushes and fsyncs; returns the index. Ends the feed.
    pub fn finish(mut self) -> Result<SpoolIndex> {
        self.flush()?;
        self.feed = None;
        let f = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .context("flush of spool failed")?;
        f.sync_all().context("fsync of spool failed")?;
        Ok(self.index)
    }
}

/// Reads frames back from a spool: a finished one by hash (with its index), or one still being
/// written by the location its [`Feed`] announced. The one reader of spool files.
pub struct SpoolReader {
    file: File,
    index: SpoolIndex,
}

impl SpoolReader {
    /// Opens a finished spool with its index.
    pub fn open(path: &Path, index: SpoolIndex) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("spool {} is missing", path.display()))?;
        Ok(SpoolReader { file, index })
    }

    /// Opens a spool the cut is still writing, to read the frames its feed announces.
    pub fn growing(path: &Path) -> Result<Self> {
        Self::open(path, SpoolIndex::new())
    }

    /// Frame length of a chunk, if spooled.
    pub fn len_of(&self, h: &ChunkHash) -> Option<u64> {
        self.index.get(h).map(|(_, l)| *l as u64)
    }

    /// The frame of a chunk, read into `buf` (a buffer the caller keeps between chunks).
    pub fn frame_into(&self, h: &ChunkHash, buf: &mut Vec<u8>) -> Result<()> {
        let (off, len) = *self
            .index
            .get(h)
            .with_context(|| format!("chunk {h} is not in this cut's spool"))?;
        self.frame_at(off, len, buf)
    }

    /// The frame at `offset` of `len` bytes (as a [`Feed`] announced it), read into `buf`.
    pub fn frame_at(&self, offset: u64, len: u32, buf: &mut Vec<u8>) -> Result<()> {
        crate::chunk::read_stored(&self.file, offset, len as usize, buf)
            .context("read from spool failed")
    }
}
