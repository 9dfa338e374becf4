//! What the source keeps between cycles, per group, under `<state>/groups/<group>/`:
//! `base.bin` (the block maps of the last point the target committed) and `cut/` (a cut made but
//! not yet committed: `cut.bin` plus its spool). Files are replaced atomically (write, fsync,
//! rename, fsync directory), and a lock file keeps two cycles of a group from running at once.

use super::cut::PendingCut;
use crate::change::VolumeBase;
use crate::files::{remove_if_present, write_atomic};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The last point the target committed, as the source knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// Point sequence number on the target.
    pub seq: u64,
    /// Cut id of that point.
    pub cut_id: String,
    /// Block size of the maps.
    pub block_size: u32,
    /// Block maps per volume.
    pub volumes: Vec<VolumeBase>,
}

impl Base {
    /// The base of one volume.
    pub fn volume(&self, name: &str) -> Option<&VolumeBase> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// A group's state directory, locked for the lifetime of this value.
pub struct GroupState {
    dir: PathBuf,
    _lock: File,
}

impl GroupState {
    /// Opens (creating) and locks the state of `group` under `state_dir`.
    pub fn lock(state_dir: &Path, group: &str) -> Result<Self> {
        let dir = state_dir.join("groups").join(group);
        std::fs::create_dir_all(dir.join("cut")).with_context(|| {
            format!(
                "cannot create source state {}: check permissions",
                dir.display()
            )
        })?;
        let lock = File::create(dir.join("lock"))?;
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!("another cycle of group {group} is running (lock {} is held); wait for it to finish", dir.join("lock").display())
        })?;
        Ok(GroupState { dir, _lock: lock })
    }

    /// Directory of the pending cut.
    pub fn cut_dir(&self) -> PathBuf {
        self.dir.join("cut")
    }

    /// The committed base, if any.
    pub fn base(&self) -> Result<Option<Base>> {
        read_file(&self.dir.join("base.bin"))
    }

    /// Replaces the base.
    pub fn set_base(&self, base: Option<&Base>) -> Result<()> {
        match base {
            Some(b) => write_atomic(&self.dir.join("base.bin"), &postcard::to_stdvec(b)?),
            None => remove_if_present(&self.dir.join("base.bin")),
        }
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

    /// After the target committed `cut` as `seq`: it becomes the base, and the cut is dropped.
    pub fn promote(&self, cut: &PendingCut, seq: u64) -> Result<()> {
        let base = Base {
            seq,
            cut_id: cut.offer.cut.cut_id.clone(),
            block_size: cut.offer.cut.block_size,
            volumes: cut.maps.clone(),
        };
        self.set_base(Some(&base))?;
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
