//! Pack files: append-only files of chunk frames, exactly as they came off the wire.
//!
//! ```text
//! offset size field
//!      0    8 magic "UPACK001"
//!      8    4 pack id (u32 LE), also the file name: packs/<id as 8 hex digits>.pack
//!     12    4 reserved, zero
//!     16    . chunk frames back to back (see chunk.rs)
//! ```
//! Bytes past the length the catalog records as committed are a torn tail from a crash; the store
//! truncates them when it opens.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Length of a pack's header.
pub const PACK_HEADER_LEN: u64 = 16;
const PACK_MAGIC: &[u8; 8] = b"UPACK001";
/// A pack is sealed and a new one started past this size.
pub const PACK_TARGET_SIZE: u64 = 512 << 20;

/// Where a chunk frame sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Pack id.
    pub pack: u32,
    /// Offset of the frame's first byte in the pack file.
    pub offset: u64,
    /// Length of the whole frame.
    pub len: u32,
}

/// Path of pack `id` under the store's `packs/` directory.
pub fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.pack"))
}

/// The header of pack `id`.
pub fn pack_header(id: u32) -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&id.to_le_bytes());
    h
}

/// Parses a pack file name back into its id.
pub fn pack_id_of(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".pack")?;
    (hex.len() == 8)
        .then(|| u32::from_str_radix(hex, 16).ok())
        .flatten()
}

/// The pack being appended to.
pub struct PackWriter {
    id: u32,
    file: File,
    path: PathBuf,
    len: u64,
    buf: Vec<u8>,
}

impl PackWriter {
    /// Creates pack `id` in `dir` (which must not hold it yet) and makes its entry durable.
    pub fn create(dir: &Path, id: u32) -> Result<Self> {
        let path = pack_path(dir, id);
        let mut file = crate::files::private_file()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create pack {}", path.display()))?;
        file.write_all(&pack_header(id))
            .with_context(|| format!("cannot write pack header {}", path.display()))?;
        crate::files::sync_dir(dir)?;
        Ok(PackWriter {
            id,
            file,
            path,
            len: PACK_HEADER_LEN,
            buf: Vec::with_capacity(8 << 20),
        })
    }

    /// This pack's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Length including buffered bytes.
    pub fn len(&self) -> u64 {
        self.len + self.buf.len() as u64
    }

    /// True when nothing but the header was written.
    pub fn is_empty(&self) -> bool {
        self.len() == PACK_HEADER_LEN
    }

    /// Appends a frame; returns where it will be once flushed.
    pub fn append(&mut self, frame: &[u8]) -> Result<Location> {
        let loc = Location {
            pack: self.id,
            offset: self.len(),
            len: frame.len() as u32,
        };
        self.buf.extend_from_slice(frame);
        if self.buf.len() >= 8 << 20 {
            self.write_buffer()?;
        }
        Ok(loc)
    }

    fn write_buffer(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.len)
            .with_context(|| {
                format!(
                    "write to pack {} failed: is the store's disk full?",
                    self.path.display()
                )
            })?;
        crate::volume::start_writeback(&self.file, self.len, self.buf.len() as u64);
        self.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes buffered frames and fsyncs; returns the now-durable length.
    pub fn sync(&mut self) -> Result<u64> {
        self.write_buffer()?;
        self.file.sync_data().with_context(|| {
            format!(
                "fsync of pack {} failed: the store's disk may be full or failing",
                self.path.display()
            )
        })?;
        Ok(self.len)
    }
}

/// Checks a pack file's header.
pub fn check_header(file: &File, id: u32) -> Result<()> {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0)
        .context("pack is shorter than its header")?;
    check_header_bytes(&h, id)
}

/// Checks a pack header's bytes (magic and pack id) against the id its file name gives.
pub fn check_header_bytes(h: &[u8], id: u32) -> Result<()> {
    anyhow::ensure!(
        h.len() >= PACK_HEADER_LEN as usize,
        "pack is shorter than its header"
    );
    anyhow::ensure!(&h[..8] == PACK_MAGIC, "pack header magic is wrong");
    let got = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    anyhow::ensure!(
        got == id,
        "pack header names pack {got:08x}, file name says {id:08x}"
    );
    Ok(())
}
