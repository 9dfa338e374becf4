//! What the source keeps between cycles, per group, under `<state>/groups/<group>/`:
//! `base.redb` (the block maps of the last point the target committed, see [`super::base`]) and
//! `cut/` (a cut made but not yet committed: `cut.bin`, its changes, plus its spool). Files are
//! replaced atomically (write, fsync, rename, fsync directory), and a lock file keeps two cycles
//! of a group from running at once.

use super::base::{BaseInfo, BaseReader, SourceBase, VolumeChanges};
use super::make::PendingCut;
use crate::files::{remove_if_present, write_atomic};
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A group's state directory, locked for the lifetime of this value.
pub struct GroupState {
    dir: PathBuf,
    base: SourceBase,
    _lock: File,
}

impl GroupState {
    /// Opens (creating) and locks the state of `group` under `state_dir`.
    pub fn lock(state_dir: &Path, group: &str) -> Result<Self> {
        let dir = state_dir.join("groups").join(group);
        crate::files::private_dir(state_dir)?;
        crate::files::private_dir(&dir.join("cut"))
            .context("cannot create the source state directory")?;
        let lock = crate::files::private_file()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .with_context(|| format!("cannot create {}", dir.join("lock").display()))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!("another cycle of group {group} is running (lock {} is held); wait for it to finish", dir.join("lock").display())
        })?;
        // Agents before the on-disk base kept whole maps in base.bin: start over with a full sync.
        remove_if_present(&dir.join("base.bin"))?;
        let base = SourceBase::open(&dir.join("base.redb"))?;
        Ok(GroupState {
            dir,
            base,
            _lock: lock,
        })
    }

    /// Directory of the pending cut.
    pub fn cut_dir(&self) -> PathBuf {
        self.dir.join("cut")
    }

    /// What the committed base is, if there is one.
    pub fn base(&self) -> Result<Option<BaseInfo>> {
        self.base.info()
    }

    /// A stable read view of the base's maps.
    pub fn base_reader(&self) -> Result<BaseReader> {
        self.base.reader()
    }

    /// Forgets the base: the next cut is full.
    pub fn clear_base(&self) -> Result<()> {
        self.base.clear()
    }

    /// The pending cut, if one was made and not yet committed.
    pub fn pending(&self) -> Result<Option<PendingCut>> {
        read_file(&self.cut_dir().join("cut.bin"))
    }

    /// Records a finished cut (its spool must already be durable).
    pub fn set_pending(&self, cut: &PendingCut) -> Result<()> {
        write_atomic(&self.cut_dir().join("cut.bin"), &postcard::to_stdvec(cut)?)
    }

    /// Forgets the pending cut and its spool.
    pub fn clear_pending(&self) -> Result<()> {
        remove_if_present(&self.cut_dir().join("cut.bin"))?;
        remove_if_present(&self.cut_dir().join("spool.frames"))
    }

    /// After the target committed `cut` as `seq`: its changes are applied to the base (one
    /// transaction, in proportion to what changed), and the cut is dropped. A crash between the
    /// two leaves a base already at the cut, which a second call leaves as it is.
    pub fn promote(&self, cut: &PendingCut, seq: u64) -> Result<()> {
        let volumes: Vec<VolumeChanges<'_>> = cut
            .offer
            .cut
            .volumes
            .iter()
            .zip(&cut.offer.entries)
            .map(|(v, changes)| VolumeChanges {
                name: &v.name,
                size: v.size,
                changes,
            })
            .collect();
        let full = cut.offer.kind == crate::protocol::OfferKind::Full;
        self.base.commit(&cut.base_info(seq), full, &volumes)?;
        self.clear_pending()
    }
}

fn read_file<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => postcard::from_bytes(&b).map(Some).with_context(|| {
            format!(
                "source state {} is unreadable: delete it to start over with a full sync",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
