//! The pack files of a store: the pack being written, the chunks written to it that the catalog
//! does not record yet, and the open readers. This module only writes, syncs, reads and deletes
//! files; which chunks the catalog records, and when, is [`super::Store::flush`]'s decision (made
//! when the target session asks for it).

use super::pack::{self, Location, PackWriter};
use crate::chunk;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// File of the highest pack id ever used, beside the packs.
const HIGH: &str = ".high";

/// The pack files under `<store>/packs`.
pub(crate) struct Packs {
    dir: PathBuf,
    writing: Mutex<Writing>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
}

/// The pack being written and what went into it since the last flush.
#[derive(Default)]
pub(crate) struct Writing {
    /// The open pack, if any.
    pub(crate) writer: Option<PackWriter>,
    /// Chunks written to it that the catalog does not record yet.
    pub(crate) unrecorded: Vec<([u8; 32], Location)>,
}

impl Writing {
    /// Gives up the pack being written and its unrecorded chunks after a write, fsync or catalog
    /// failure (a full disk, say). After a failed fsync the kernel may have dropped dirty pages
    /// while a later fsync reports success, so nothing unrecorded in that pack is trusted: the
    /// pack keeps the length the catalog recorded (its tail is cut at the next open), later chunks
    /// go to a new pack, and the lost ones are simply missing, so the source sends them again.
    pub(crate) fn abandon(&mut self, e: anyhow::Error) -> anyhow::Error {
        if let Some(w) = self.writer.take() {
            tracing::warn!(pack = w.id(), chunks = self.unrecorded.len(), error = %format!("{e:#}"), "store write failed; the pack is closed and its unrecorded chunks will be received again");
        }
        self.unrecorded.clear();
        e
    }

    /// The id of the pack being written.
    pub(crate) fn current(&self) -> Option<u32> {
        self.writer.as_ref().map(|w| w.id())
    }
}

impl Packs {
    /// The packs in `dir` (created owner-only if missing).
    pub(crate) fn open(dir: PathBuf) -> Result<Self> {
        crate::files::private_dir(&dir)?;
        Ok(Packs {
            dir,
            writing: Mutex::new(Writing::default()),
            readers: Mutex::new(HashMap::new()),
        })
    }

    /// Path of pack `id`.
    pub(crate) fn path(&self, id: u32) -> PathBuf {
        pack::pack_path(&self.dir, id)
    }

    /// The writing state, locked.
    pub(crate) fn writing(&self) -> MutexGuard<'_, Writing> {
        self.writing.lock().expect("pack writer lock")
    }

    /// Creates pack `id` (header only).
    pub(crate) fn create(&self, id: u32) -> Result<PackWriter> {
        PackWriter::create(&self.dir, id)
    }

    /// The highest pack id ever used here (0 for none), from `packs/.high`. A pack id is never
    /// used twice, even after its pack was deleted, so a copy of pack N (in the archive) always
    /// holds the same bytes.
    pub(crate) fn high(&self) -> Result<u32> {
        match std::fs::read_to_string(self.dir.join(HIGH)) {
            Ok(s) => Ok(s.trim().parse().unwrap_or(0)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => {
                Err(e).with_context(|| format!("cannot read {}", self.dir.join(HIGH).display()))
            }
        }
    }

    /// Raises the highest pack id ever used to `id` (written atomically).
    pub(crate) fn raise_high(&self, id: u32) -> Result<()> {
        if id > self.high()? {
            crate::files::write_atomic(&self.dir.join(HIGH), id.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Ids of the pack files on disk.
    pub(crate) fn files(&self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list packs in {}", self.dir.display()))?;
        for e in entries {
            if let Some(id) = e?.file_name().to_str().and_then(pack::pack_id_of) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Truncates every committed pack to its committed length (bytes past it were never
    /// referenced: the torn tail of a crash). Packs not listed are left alone: after a lost
    /// catalog they would be the only copy of the data.
    pub(crate) fn truncate_torn_tails(&self, committed: &[(u32, u64)]) -> Result<()> {
        for &(id, len) in committed {
            let path = self.path(id);
            let f = match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(pack = %path.display(), error = %e, "a committed pack is missing: run `target-agent verify`");
                    continue;
                }
            };
            if f.metadata()?.len() > len {
                tracing::info!(pack = %path.display(), len, "truncating torn tail of pack");
                f.set_len(len)?;
                f.sync_all()?;
            }
        }
        Ok(())
    }

    fn reader(&self, id: u32) -> Result<Arc<File>> {
        let mut r = self.readers.lock().expect("reader lock");
        if let Some(f) = r.get(&id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(
            File::open(&path).with_context(|| format!("pack {} is missing", path.display()))?,
        );
        r.insert(id, f.clone());
        Ok(f)
    }

    /// Reads the frame at `loc` into `buf`, resized to it (unverified).
    pub(crate) fn read_frame_into(&self, loc: Location, buf: &mut Vec<u8>) -> Result<()> {
        let f = self.reader(loc.pack)?;
        chunk::read_stored(&f, loc.offset, loc.len as usize, buf).with_context(|| {
            format!(
                "cannot read {} bytes at offset {} of pack {}: the pack is truncated or unreadable",
                loc.len,
                loc.offset,
                self.path(loc.pack).display()
            )
        })
    }

    /// Deletes pack `id`'s file (and closes its reader).
    pub(crate) fn remove(&self, id: u32) -> Result<()> {
        self.readers.lock().expect("reader lock").remove(&id);
        let path = self.path(id);
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot delete pack {}", path.display()))
    }
}
